"""The keys of full and append keys (keepwell.repository.keyring): what each can open."""

from __future__ import annotations

import pytest

from keepwell.crypto import MasterKey, public_bytes
from keepwell.errors import AppendOnlyError, IntegrityError
from keepwell.repository.format import KIND_INDEX, KIND_SNAPSHOT
from keepwell.repository.index import IndexContent, decode_index, encode_entries, encode_index
from keepwell.repository.keyring import Keyring, append_keyring, append_material


def _pair() -> tuple[Keyring, Keyring]:
    master = MasterKey(bytes(range(64)))
    config = {"version": 2, "public_key": public_bytes(master.repository_private_key()).hex()}
    full = Keyring.full(master, config)
    assert full.shared is not None
    append, got = append_keyring(append_material(config, full.shared))
    assert got == config
    return full, append


def test_full_key_reads_what_an_append_key_wrote() -> None:
    full, append = _pair()
    stored = append.encrypt_blob(b"i" * 32, 0, b"\x00payload")
    assert full.decrypt_blob(b"i" * 32, 0, stored, append.sender) == b"\x00payload"
    sealed = append.encrypt_object(KIND_SNAPSHOT, b"{}")
    assert Keyring.object_sender(sealed) == append.sender
    assert full.decrypt_object(KIND_SNAPSHOT, sealed, "s") == b"{}"
    # a new process of the same append key cannot read it back: another sender
    again = Keyring.from_raw(append.raw, {"version": 2})
    with pytest.raises(AppendOnlyError):
        again.decrypt_object(KIND_SNAPSHOT, sealed, "s")
    with pytest.raises(AppendOnlyError):
        again.decrypt_blob(b"i" * 32, 0, stored, append.sender)


def test_append_key_reads_shared_objects_only() -> None:
    full, append = _pair()
    index = full.encrypt_object(KIND_INDEX, b"index")
    assert index[0] == 2 and append.decrypt_object(KIND_INDEX, index, "i") == b"index"
    with pytest.raises(AppendOnlyError):
        append.decrypt_object(KIND_SNAPSHOT, full.encrypt_object(KIND_SNAPSHOT, b"{}"), "s")
    with pytest.raises(AppendOnlyError):
        append.decrypt_blob(b"i" * 32, 0, full.encrypt_blob(b"i" * 32, 0, b"\x00x"))


def test_a_changed_sender_or_ciphertext_fails_authentication() -> None:
    full, append = _pair()
    sealed = bytearray(append.encrypt_object(KIND_SNAPSHOT, b"{}"))
    other = Keyring.from_raw(append.raw, {"version": 2}).encrypt_object(KIND_SNAPSHOT, b"{}")
    sealed[1:33] = other[1:33]  # another sender's public key
    with pytest.raises(IntegrityError):
        full.decrypt_object(KIND_SNAPSHOT, bytes(sealed), "s")
    stored = append.encrypt_blob(b"i" * 32, 0, b"\x00payload")
    stored[20] ^= 1
    with pytest.raises(IntegrityError):
        full.decrypt_blob(b"i" * 32, 0, stored, append.sender)


def test_index_records_each_packs_sender() -> None:
    packs = [b"a" * 32, b"b" * 32]
    entries = encode_entries([(b"x" * 32, 0, 0, 10, 5, 0), (b"y" * 32, 1, 0, 10, 5, 0)])
    plain = IndexContent(packs, [0, 0], entries, [])
    assert encode_index(plain)[4] == 1  # no sender: version 1, as before
    content = IndexContent(packs, [0, 0], entries, [], {b"b" * 32: b"s" * 32})
    stored = encode_index(content)
    assert stored[4] == 2
    back = decode_index(stored)
    assert back.senders == {b"b" * 32: b"s" * 32} and back.packs == packs
    assert bytes(back.entries) == entries
