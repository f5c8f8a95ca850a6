"""Keys, key derivation and authenticated encryption.

Words:
    master key   64 random bytes made at ``init``: ``enc_key`` (32) and ``mac_key`` (32). Every
                 password of a repository wraps the same master key.
    blob         a chunk of content or a tree, stored encrypted. Its id is BLAKE3 keyed with the
                 repository's ``id_key`` over the plaintext, so the store never learns which known
                 files it holds.
    object       a whole stored unit that is not a blob: index, snapshot, config, pack header.

Nonce reuse is impossible by construction, never a matter of luck:

* A blob is encrypted with AES-256-GCM under a one-off subkey derived from the repository's
  ``enc_key``, the blob id and a synthetic IV (a keyed BLAKE3 MAC of the exact bytes to be
  encrypted). A subkey is thus tied to exactly one plaintext: the all-zero nonce is never used
  twice with different plaintexts under one key, and identical plaintexts give identical
  ciphertexts (they already share an id, so nothing more is revealed). The blob id and type are
  the associated data, so a blob cannot be swapped for another. Blobs are position-free, so
  pruning can move them between packs without decrypting.
* An object is encrypted under a subkey derived from 32 fresh random bytes stored in front of it;
  each subkey encrypts one message only.

Objects carry their kind of key in their first byte (see docs/repository-format.md):

    0x01  master    under the master key (readable by full keys only)
    0x02  shared    under the repository's shared key, which append keys hold too (index,
                    damage records, sessions of a repository made for append keys)
    0x03  sealed    to the repository's X25519 public key: ``epk ‖`` the rest of an 0x01 object
                    under a *sender key* that the writer and the repository's private key alone
                    can derive (see `SenderKey`)

The password wraps the master key with a key from Argon2id (memory-hard).
``KEEPWELL_TESTONLY_WEAK_KDF=1`` selects tiny parameters so test suites stay fast; it is recorded
in the key file, so such a key stays weak and is visibly so.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from keepwell import tokens
from keepwell.errors import IntegrityError, WrongPasswordError

_ZERO_NONCE = bytes(12)
SIV_SIZE = 16
TAG_SIZE = 16
BLOB_OVERHEAD = SIV_SIZE + TAG_SIZE
_OBJECT_SALT = 32
_OBJECT_VERSION = 1
OBJECT_MASTER = 1
OBJECT_SHARED = 2
OBJECT_SEALED = 3
PUBLIC_KEY_SIZE = 32


@dataclass(frozen=True)
class KdfParams:
    """Argon2id's costs for new key files (each key file records its own).

    32 MiB and 12 passes: an attacker's cost per guess (memory × time, as area × time on an
    ASIC) equals that of 64 MiB and 3 passes, and the memory traffic per guess (what bounds a
    GPU) is twice as much; opening a repository takes 0.1 s instead of 0.06 s on a 2-core VM,
    and its peak memory is 32 MiB lower, which every command pays at start."""

    time_cost: int = 12
    memory_kib: int = 32 * 1024
    parallelism: int = 2

    @classmethod
    def default(cls) -> KdfParams:
        if os.environ.get("KEEPWELL_TESTONLY_WEAK_KDF") == "1":
            return cls(time_cost=1, memory_kib=8, parallelism=1)
        return cls()


def derive_password_key(password: str, salt: bytes, params: KdfParams) -> bytes:
    # imported here: worker processes get the master key, never a password
    from argon2.low_level import Type, hash_secret_raw

    return hash_secret_raw(
        password.encode("utf-8"),
        salt,
        time_cost=params.time_cost,
        memory_cost=params.memory_kib,
        parallelism=params.parallelism,
        hash_len=32,
        type=Type.ID,
    )


class MasterKey:
    """The repository's secret: encrypts blobs and objects."""

    __slots__ = ("raw", "_enc", "_mac")

    def __init__(self, raw: bytes) -> None:
        if len(raw) != 64:
            raise ValueError("master key must be 64 bytes")
        self.raw = raw
        self._enc = raw[:32]
        self._mac = raw[32:]

    @classmethod
    def generate(cls) -> MasterKey:
        return cls(tokens.token_bytes(64))

    # -- blobs -------------------------------------------------------------------------------
    def encrypt_blob(self, blob_id: bytes, blob_type: int, payload: bytes) -> bytearray:
        """siv ‖ ciphertext ‖ tag, encrypted into the one buffer that is returned (a blob is
        up to 8 MiB: no second copy to prepend the siv)."""
        siv = blake3.blake3(payload, key=self._mac).digest(SIV_SIZE)
        subkey = blake3.blake3(b"kw-blob" + blob_id + siv, key=self._enc).digest()
        aad = blob_id + bytes((blob_type,))
        out = bytearray(SIV_SIZE + len(payload) + TAG_SIZE)
        out[:SIV_SIZE] = siv
        AESGCM(subkey).encrypt_into(_ZERO_NONCE, payload, aad, memoryview(out)[SIV_SIZE:])
        return out

    def decrypt_blob(self, blob_id: bytes, blob_type: int, stored: bytes | memoryview) -> bytes:
        siv = bytes(stored[:SIV_SIZE])
        subkey = blake3.blake3(b"kw-blob" + blob_id + siv, key=self._enc).digest()
        aad = blob_id + bytes((blob_type,))
        try:
            return AESGCM(subkey).decrypt(_ZERO_NONCE, stored[SIV_SIZE:], aad)
        except InvalidTag:
            raise IntegrityError(
                f"blob {blob_id.hex()[:16]} failed authentication (corrupt or tampered)"
            ) from None

    # -- objects -----------------------------------------------------------------------------
    def encrypt_object(self, kind: bytes, payload: bytes) -> bytes:
        return bytes((_OBJECT_VERSION,)) + self.seal_body(kind, payload)

    def seal_body(self, kind: bytes, payload: bytes) -> bytes:
        """``salt ‖ ciphertext`` of an object: what follows its first byte (and, sealed, its
        sender's public key)."""
        salt = tokens.token_bytes(_OBJECT_SALT)
        subkey = blake3.blake3(b"kw-object" + salt, key=self._enc).digest()
        return salt + AESGCM(subkey).encrypt(_ZERO_NONCE, payload, kind)

    def decrypt_object(self, kind: bytes, stored: bytes, what: str) -> bytes:
        if len(stored) < 1 + _OBJECT_SALT + TAG_SIZE or stored[0] != _OBJECT_VERSION:
            raise IntegrityError(f"{what} is truncated or of an unknown version")
        return self.open_body(kind, memoryview(stored)[1:], what)

    def open_body(self, kind: bytes, body: bytes | memoryview, what: str) -> bytes:
        if len(body) < _OBJECT_SALT + TAG_SIZE:
            raise IntegrityError(f"{what} is truncated")
        salt = bytes(body[:_OBJECT_SALT])
        subkey = blake3.blake3(b"kw-object" + salt, key=self._enc).digest()
        try:
            return AESGCM(subkey).decrypt(_ZERO_NONCE, body[_OBJECT_SALT:], kind)
        except InvalidTag:
            raise IntegrityError(f"{what} failed authentication (corrupt or tampered)") from None

    # -- what a full key derives for a repository made for append keys -----------------------
    def shared_key(self) -> MasterKey:
        """The key of shared objects (0x02), which append keys hold too."""
        return MasterKey(blake3.blake3(b"kw-shared-key", key=self._enc).digest(64))

    def repository_private_key(self) -> X25519PrivateKey:
        """The repository's X25519 key pair, derived from the master key: every full key holds
        it without any change to its key file."""
        return X25519PrivateKey.from_private_bytes(
            blake3.blake3(b"kw-repository-x25519", key=self._enc).digest())


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def sender_key(shared_secret: bytes, sender_public: bytes, repository_public: bytes) -> MasterKey:
    """The symmetric keys (blob and object, as a master key's) of one sender: HKDF-SHA256 of
    the X25519 shared secret, bound to both public keys."""
    return MasterKey(HKDF(hashes.SHA256(), 64, sender_public + repository_public,
                          b"kw-sender-key").derive(shared_secret))


class Sender:
    """A writer without the master key: one ephemeral X25519 key (made here, never stored) and
    the sender key it shares with the repository's public key. One per writing process: the
    X25519 work is paid once, and every pack it writes records ``public``."""

    __slots__ = ("public", "key")

    def __init__(self, repository_public: bytes) -> None:
        ephemeral = X25519PrivateKey.generate()
        self.public = public_bytes(ephemeral)
        secret = ephemeral.exchange(X25519PublicKey.from_public_bytes(repository_public))
        self.key = sender_key(secret, self.public, repository_public)

    def seal_object(self, kind: bytes, payload: bytes) -> bytes:
        return bytes((OBJECT_SEALED,)) + self.public + self.key.seal_body(kind, payload)


def open_sender(private: X25519PrivateKey, sender_public: bytes) -> MasterKey:
    """The sender key of ``sender_public``, as the repository's private key derives it."""
    if len(sender_public) != PUBLIC_KEY_SIZE:
        raise IntegrityError("a sender's public key has the wrong size")
    try:
        secret = private.exchange(X25519PublicKey.from_public_bytes(sender_public))
    except ValueError:  # an all-zero shared secret: a low-order point, never a real sender
        raise IntegrityError("a sender's public key is invalid") from None
    return sender_key(secret, sender_public, public_bytes(private))


def wrap_master_key(master: MasterKey, password: str, params: KdfParams) -> dict[str, object]:
    return wrap_secret(master.raw, password, params, b"kw-master-key")


def wrap_secret(secret: bytes, password: str, params: KdfParams, aad: bytes) -> dict[str, object]:
    salt = tokens.token_bytes(32)
    kek = derive_password_key(password, salt, params)
    sealed = AESGCM(kek).encrypt(_ZERO_NONCE, secret, aad)
    return {
        "kdf": "argon2id",
        "time_cost": params.time_cost,
        "memory_kib": params.memory_kib,
        "parallelism": params.parallelism,
        "salt": salt.hex(),
        "sealed": sealed.hex(),
    }


def unwrap_master_key(keyfile: dict[str, object], password: str) -> MasterKey:
    """Each wrap uses a fresh salt, so the KEK (and its zero nonce) encrypts one message only."""
    return MasterKey(unwrap_secret(keyfile, password, b"kw-master-key"))


def unwrap_secret(keyfile: dict[str, object], password: str, aad: bytes) -> bytes:
    params = KdfParams(
        int(keyfile["time_cost"]),  # type: ignore[call-overload]
        int(keyfile["memory_kib"]),  # type: ignore[call-overload]
        int(keyfile["parallelism"]),  # type: ignore[call-overload]
    )
    kek = derive_password_key(password, bytes.fromhex(str(keyfile["salt"])), params)
    try:
        return AESGCM(kek).decrypt(_ZERO_NONCE, bytes.fromhex(str(keyfile["sealed"])), aad)
    except InvalidTag:
        raise WrongPasswordError("wrong password: no key of this repository opens with it") from None


def keyed_id(id_key: bytes, data: bytes | bytearray | memoryview) -> bytes:
    return blake3.blake3(data, key=id_key).digest()


def content_name(data: bytes | bytearray | memoryview) -> str:
    """Name of a stored object: the hash of its stored bytes, checkable without any key."""
    return blake3.blake3(data, max_threads=blake3.blake3.AUTO if len(data) > 1 << 22 else 1).hexdigest()
