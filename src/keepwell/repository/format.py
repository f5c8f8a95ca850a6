"""The repository's layout and the binary formats of packs (see docs/repository-format.md).

Layout of a repository (object names; every name under data/, tree/, index/ and snapshots/ is
the BLAKE3 hash of the object's stored bytes, in hex):

    config               encrypted: format version, repository id, id key, chunker parameters
    keys/<id>            JSON: the master key wrapped by one password (Argon2id + AES-GCM)
    data/<xx>/<id>       pack of content blobs
    tree/<xx>/<id>       pack of tree blobs (small; cacheable; readable without data packs)
    index/<id>           encrypted index: which blobs are in which pack, at which offset
    snapshots/<id>       encrypted snapshot
    sessions/<id>        a running backup's heartbeat (protects what it references from prune)
    pending/<id>         encrypted: packs a prune has removed from the index and will delete
                         once safe (JSON: time, sessions live then, pack names and sizes)
    locks/prune          encrypted: the prune lock (one prune at a time; backups ignore it)
    damaged/<id>         encrypted: blobs whose stored copy is damaged, left out of the index
                         (keepwell.repository.damage)

Pack: ``blob* || header_ct || u32 len(header_ct) || b"KWP1"``. The header is an encrypted object
(kind ``kw-pack-header``) listing, for each blob: type u8, id 32 bytes, offset u32, stored length
u32, raw length u32. Packs are self-describing, so the index can be rebuilt from packs alone.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# the newest config version this keepwell reads; 2 is a repository made for append keys
# (docs/security.md), written only when asked for (``init --append-keys``)
FORMAT_VERSION = 2
PACK_HEADER_VERSION = 1
DATA = 0
TREE = 1
BLOB_TYPE_NAMES = {DATA: "data", TREE: "tree"}
PACK_MAGIC = b"KWP1"
PACK_PREFIX = {DATA: "data", TREE: "tree"}
_ENTRY = struct.Struct("<B32sIII")
_TRAILER = struct.Struct("<I4s")
TRAILER_SIZE = _TRAILER.size

KIND_CONFIG = b"kw-config"
KIND_INDEX = b"kw-index"
KIND_SNAPSHOT = b"kw-snapshot"
KIND_PACK_HEADER = b"kw-pack-header"
KIND_PENDING = b"kw-pending"
KIND_DAMAGED = b"kw-damaged"
KIND_SESSION = b"kw-session"


@dataclass(frozen=True, slots=True)
class PackEntry:
    type: int
    id: bytes
    offset: int
    length: int
    raw_length: int


def pack_object_name(blob_type: int, pack_id: str) -> str:
    return f"{PACK_PREFIX[blob_type]}/{pack_id[:2]}/{pack_id}"


def encode_pack_header(entries: list[PackEntry]) -> bytes:
    out = bytearray(struct.pack("<BI", PACK_HEADER_VERSION, len(entries)))
    for e in entries:
        out += _ENTRY.pack(e.type, e.id, e.offset, e.length, e.raw_length)
    return bytes(out)


def decode_pack_header(plain: bytes) -> list[PackEntry]:
    version, count = struct.unpack_from("<BI", plain, 0)
    if version != PACK_HEADER_VERSION or len(plain) != 5 + count * _ENTRY.size:
        raise ValueError("pack header has an unexpected size or version")
    return [
        PackEntry(*_ENTRY.unpack_from(plain, 5 + i * _ENTRY.size)) for i in range(count)
    ]


def pack_trailer(header_ct_len: int) -> bytes:
    return _TRAILER.pack(header_ct_len, PACK_MAGIC)


def parse_trailer(tail: bytes) -> int:
    length, magic = _TRAILER.unpack(tail[-TRAILER_SIZE:])
    if magic != PACK_MAGIC:
        raise ValueError("not a keepwell pack (bad trailer)")
    return int(length)
