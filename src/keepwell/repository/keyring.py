"""What one opened key can do: the keys of a *full* key or of an *append* key, behind one face.

Words:
    full key     a password that unwraps the master key: reads, writes and deletes everything.
    append key   a password that unwraps only what adding backups needs (docs/security.md): the
                 config (id key, chunker), the *shared key* and the repository's public key. It
                 writes blobs and objects that only full keys can read, and reads nothing but
                 shared objects.
    shared key   encrypts the objects both roles read and write (0x02): index objects, damage
                 records and sessions of a repository made for append keys (config version 2).
    sender       a writing process of an append key: its ephemeral X25519 key encrypts every
                 blob, pack header and sealed object (0x03) it writes (keepwell.crypto.Sender);
                 a pack's sender is recorded in its header and in the index.

The `Keyring` has the methods of a master key that the engine calls (``encrypt_blob``,
``decrypt_blob``, ``encrypt_object``, ``decrypt_object``), so most of the engine does not know
which role it runs with; what an append key cannot do raises `AppendOnlyError`.
"""

from __future__ import annotations

import json
import threading
from typing import Any

from keepwell.crypto import (
    OBJECT_MASTER,
    OBJECT_SEALED,
    OBJECT_SHARED,
    PUBLIC_KEY_SIZE,
    MasterKey,
    Sender,
    open_sender,
    public_bytes,
)
from keepwell.errors import AppendOnlyError, IntegrityError
from keepwell.repository.format import KIND_DAMAGED, KIND_INDEX, KIND_SESSION

FULL = "full"
APPEND = "append"
ROLES = (FULL, APPEND)
# objects both roles read (and write) in a repository made for append keys
SHARED_KINDS = frozenset({KIND_INDEX, KIND_DAMAGED, KIND_SESSION})
_APPEND_RAW = b"kw-append:"
NEEDS_FULL = "this key can only add backups (append role)"


class Keyring:
    """The keys of one opened key. ``master``: a full key's (None for an append key);
    ``shared``: the shared key (None in a repository of version 1); ``public``: the
    repository's X25519 public key (None in version 1)."""

    def __init__(self, master: MasterKey | None, shared: MasterKey | None, public: bytes | None) -> None:
        self.master = master
        self.shared = shared
        self.public = public
        self._private = master.repository_private_key() if master is not None and public else None
        self._senders: dict[bytes, MasterKey] = {}
        self._sender: Sender | None = None
        self._lock = threading.Lock()

    @classmethod
    def full(cls, master: MasterKey, config: dict[str, Any]) -> Keyring:
        if int(config.get("version", 1)) < 2:
            return cls(master, None, None)
        public = public_bytes(master.repository_private_key())
        if config.get("public_key") != public.hex():
            raise IntegrityError("the config's public key is not this master key's",
                                 hint="restore config and keys/ from a copy of the repository")
        return cls(master, master.shared_key(), public)

    @property
    def role(self) -> str:
        return FULL if self.master is not None else APPEND

    # -- what worker processes get (keepwell.repository.repo.reopen_repository) ----------------
    @property
    def raw(self) -> bytes:
        if self.master is not None:
            return self.master.raw
        assert self.shared is not None and self.public is not None
        return _APPEND_RAW + self.shared.raw + self.public

    @classmethod
    def from_raw(cls, raw: bytes, config: dict[str, Any]) -> Keyring:
        if raw.startswith(_APPEND_RAW):
            rest = raw[len(_APPEND_RAW):]
            return cls(None, MasterKey(rest[:64]), rest[64:])
        return cls.full(MasterKey(raw), config)

    def _need_master(self, what: str) -> MasterKey:
        if self.master is None:
            raise AppendOnlyError(f"{NEEDS_FULL}: {what} needs a full key")
        return self.master

    # -- writing --------------------------------------------------------------------------------
    @property
    def sender(self) -> bytes | None:
        """The public key this process writes blobs under (None: under the master key)."""
        if self.master is not None:
            return None
        return self._writer().public

    def _writer(self) -> Sender:
        with self._lock:
            if self._sender is None:
                assert self.public is not None
                self._sender = Sender(self.public)
            return self._sender

    def encrypt_blob(self, blob_id: bytes, blob_type: int, payload: bytes) -> bytearray:
        key = self.master if self.master is not None else self._writer().key
        return key.encrypt_blob(blob_id, blob_type, payload)

    def encrypt_object(self, kind: bytes, payload: bytes) -> bytes:
        if self.shared is not None and kind in SHARED_KINDS:
            return bytes((OBJECT_SHARED,)) + self.shared.seal_body(kind, payload)
        if self.master is not None:
            return self.master.encrypt_object(kind, payload)
        return self._writer().seal_object(kind, payload)

    # -- reading --------------------------------------------------------------------------------
    def decrypt_blob(self, blob_id: bytes, blob_type: int, stored: bytes | memoryview,
                     sender: bytes | None = None) -> bytes:
        """A blob's payload; ``sender``: the public key of the pack's writer, if not the master key."""
        if sender is None:
            return self._need_master("reading data").decrypt_blob(blob_id, blob_type, stored)
        return self.sender_key(sender).decrypt_blob(blob_id, blob_type, stored)

    def sender_key(self, sender: bytes) -> MasterKey:
        if self._sender is not None and sender == self._sender.public:
            return self._sender.key  # what this process wrote itself
        key = self._senders.get(sender)
        if key is None:
            self._need_master("reading data")
            if self._private is None:
                raise IntegrityError("a blob is encrypted for a repository made for append keys, "
                                     "but this repository is not one")
            key = self._senders[sender] = open_sender(self._private, sender)
        return key

    def decrypt_object(self, kind: bytes, stored: bytes | memoryview, what: str) -> bytes:
        tag = stored[0] if len(stored) else -1
        if tag == OBJECT_MASTER:
            return self._need_master(f"reading {what}").decrypt_object(kind, bytes(stored), what)
        if tag == OBJECT_SHARED and self.shared is not None:
            return self.shared.open_body(kind, memoryview(stored)[1:], what)
        if tag == OBJECT_SEALED and len(stored) > 1 + PUBLIC_KEY_SIZE:
            sender = bytes(stored[1:1 + PUBLIC_KEY_SIZE])
            if self.master is None and (self._sender is None or sender != self._sender.public):
                raise AppendOnlyError(f"{NEEDS_FULL}: reading {what} needs a full key")
            return self.sender_key(sender).open_body(kind, memoryview(stored)[1 + PUBLIC_KEY_SIZE:], what)
        raise IntegrityError(f"{what} is truncated or of an unknown version")

    @staticmethod
    def object_sender(stored: bytes | memoryview) -> bytes | None:
        """The public key of the sender of a sealed object (a pack header: the pack's sender)."""
        if len(stored) > 1 + PUBLIC_KEY_SIZE and stored[0] == OBJECT_SEALED:
            return bytes(stored[1:1 + PUBLIC_KEY_SIZE])
        return None


def append_material(config: dict[str, Any], shared: MasterKey) -> bytes:
    """What an append key's file seals: the config and the shared key."""
    return json.dumps({"config": config, "shared_key": shared.raw.hex()}).encode()


def append_keyring(material: bytes) -> tuple[Keyring, dict[str, Any]]:
    doc = json.loads(material)
    config = doc["config"]
    return Keyring(None, MasterKey(bytes.fromhex(doc["shared_key"])),
                   bytes.fromhex(config["public_key"])), config
