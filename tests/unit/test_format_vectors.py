"""The test vectors of docs/repository-format.md, computed again from the code.

The page shows every value literally, in fenced blocks: ```` ```vectors ```` blocks of
``name = value`` lines (a value wrapped over several lines goes on in the indented lines that
follow it) and ```` ```json NAME ```` blocks whose text is the value of NAME. This module reads
them from the page and checks each against what keepwell's own functions give for the same
inputs, and against the page's own description of the format where the page says how a value
is made (subkeys, object encryption, the chunker's algorithm and tables). A vector on the page
that no check reads fails the last test, so the page and the code cannot drift apart.
"""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import blake3
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pyfastcdc.py.constants import GEAR, MASKS

from keepwell.chunker import Chunker, ChunkerParams
from keepwell.compression import pack_payload, unpack_payload
from keepwell.crypto import (
    KdfParams,
    MasterKey,
    content_name,
    derive_password_key,
    keyed_id,
    unwrap_master_key,
)
from keepwell.repository.format import (
    DATA,
    KIND_CONFIG,
    KIND_INDEX,
    KIND_PACK_HEADER,
    KIND_SNAPSHOT,
    TRAILER_SIZE,
    PackEntry,
    decode_pack_header,
    encode_pack_header,
    pack_object_name,
    pack_trailer,
    parse_trailer,
)
from keepwell.repository.index import IndexContent, decode_index, encode_entries, encode_index
from keepwell.repository.snapshot import decode_snapshot, encode_snapshot
from keepwell.repository.tree import DIR, FILE, SYMLINK, Node, decode_tree, encode_tree

DOC = Path(__file__).resolve().parents[2] / "docs" / "repository-format.md"
ZERO_NONCE = bytes(12)
M64 = (1 << 64) - 1
_FENCE = re.compile(r"^```(\w+)(?: (\S+))?\s*$")
_LINE = re.compile(r"^([a-z][a-z0-9_.]*) = (.*)$")


def read_vectors(text: str) -> dict[str, str]:
    """Every vector of the page: name -> its text (wrapped lines joined by one blank)."""
    values: dict[str, str] = {}
    block: str | None = None  # "vectors", or the name a text block holds
    lines: list[str] = []
    last: str | None = None

    def put(name: str, value: str) -> None:
        assert name not in values, f"vector {name} is given twice"
        values[name] = value

    for line in text.splitlines():
        fence = _FENCE.match(line)
        if block is None:
            if fence and fence.group(1) == "vectors":
                block, last = "vectors", None
            elif fence and fence.group(2):
                block, lines = fence.group(2), []
            continue
        if line.startswith("```"):
            if block != "vectors":
                put(block, "\n".join(lines))
            block = None
        elif block != "vectors":
            lines.append(line)
        elif line.startswith(" ") and last is not None:
            values[last] += " " + line.strip()
        elif line.strip():
            m = _LINE.match(line)
            assert m, f"not a vector line: {line!r}"
            last = m.group(1)
            put(last, m.group(2).strip())
    assert block is None, "a vectors block is not closed"
    return values


class Vectors:
    """The page's vectors, typed on reading; remembers which were read."""

    def __init__(self, values: dict[str, str]) -> None:
        self.values = values
        self.read: set[str] = set()

    def text(self, name: str) -> str:
        self.read.add(name)
        return self.values[name]

    def hex(self, name: str) -> bytes:
        return bytes.fromhex(self.text(name).replace(" ", ""))

    def number(self, name: str) -> int:
        return int(self.text(name))

    def numbers(self, name: str) -> list[int]:
        return [int(x) for x in json.loads(self.text(name))]

    def words(self, name: str) -> list[int]:
        """A list of 64-bit words written as 16 hex digits each."""
        return [int(w, 16) for w in self.text(name).split()]


@pytest.fixture
def v() -> Vectors:
    return Vectors(read_vectors(DOC.read_text(encoding="utf-8")))


def keys(v: Vectors) -> tuple[MasterKey, bytes, bytes, bytes]:
    """The master key, its enc_key and mac_key halves, and the id key."""
    raw = v.hex("master_key")
    return MasterKey(raw), raw[:32], raw[32:], v.hex("id_key")


def seal_object(enc_key: bytes, kind: bytes, plain: bytes, salt: bytes) -> bytes:
    """An object as the page describes it: 01 ‖ salt ‖ AES-256-GCM under a subkey of the salt."""
    subkey = blake3.blake3(b"kw-object" + salt, key=enc_key).digest()
    return b"\x01" + salt + AESGCM(subkey).encrypt(ZERO_NONCE, plain, kind)


def check_object(v: Vectors, prefix: str, kind: bytes, plain: bytes) -> bytes:
    """The stored object of `prefix` is `plain` sealed with its salt, and the code opens it."""
    master, enc_key, _, _ = keys(v)
    stored = v.hex(f"{prefix}.stored")
    assert stored == seal_object(enc_key, kind, plain, v.hex(f"{prefix}.salt"))
    assert master.decrypt_object(kind, stored, prefix) == plain
    return stored


# -- the checks, one per part of the page --------------------------------------------------------
def check_blob1(v: Vectors) -> None:
    master, enc_key, mac_key, id_key = keys(v)
    plain = v.hex("blob1.plaintext")
    blob_id = keyed_id(id_key, plain)
    assert blob_id == v.hex("blob1.id")
    payload = pack_payload(plain, 3)
    assert payload == v.hex("blob1.payload") == b"\x00" + plain
    siv = blake3.blake3(payload, key=mac_key).digest(16)
    assert siv == v.hex("blob1.siv")
    subkey = blake3.blake3(b"kw-blob" + blob_id + siv, key=enc_key).digest()
    assert subkey == v.hex("blob1.subkey")
    aad = blob_id + bytes((DATA,))
    assert aad == v.hex("blob1.aad")
    stored = bytes(master.encrypt_blob(blob_id, DATA, payload))
    assert stored == v.hex("blob1.stored") == siv + AESGCM(subkey).encrypt(ZERO_NONCE, payload, aad)
    assert unpack_payload(master.decrypt_blob(blob_id, DATA, stored), len(plain)) == plain


def check_blob2(v: Vectors) -> None:
    master, _, _, id_key = keys(v)
    plain = v.hex("blob2.plaintext")
    blob_id = keyed_id(id_key, plain)
    assert blob_id == v.hex("blob2.id")
    payload = v.hex("blob2.payload")
    assert payload[0] == 1 and len(payload) - 1 <= 0.97 * len(plain)
    assert unpack_payload(payload, len(plain)) == plain
    ours = pack_payload(plain, 3)  # this build's zstd: compressed too, to the same plaintext
    assert ours[0] == 1 and unpack_payload(ours, len(plain)) == plain
    assert bytes(master.encrypt_blob(blob_id, DATA, payload)) == v.hex("blob2.stored")


def check_pack(v: Vectors) -> None:
    master, _, _, _ = keys(v)
    blobs = [(v.hex(f"blob{n}.id"), v.hex(f"blob{n}.stored"), len(v.hex(f"blob{n}.plaintext")))
             for n in (1, 2)]
    entries, offset = [], 0
    for blob_id, stored, raw in blobs:
        entries.append(PackEntry(DATA, blob_id, offset, len(stored), raw))
        offset += len(stored)
    header = encode_pack_header(entries)
    assert header == v.hex("pack.header.plain")
    header_stored = check_object(v, "pack.header", KIND_PACK_HEADER, header)
    pack = b"".join(b[1] for b in blobs) + header_stored + pack_trailer(len(header_stored))
    assert pack == v.hex("pack.bytes")
    name = content_name(pack)
    assert bytes.fromhex(name) == v.hex("pack.name")
    assert pack_object_name(DATA, name) == f"data/{name[:2]}/{name}"
    # and the page's pack, read as any reader reads one: trailer, header, blobs
    length = parse_trailer(pack[-TRAILER_SIZE:])
    plain = master.decrypt_object(KIND_PACK_HEADER, pack[-TRAILER_SIZE - length:-TRAILER_SIZE],
                                  "pack header")
    read = decode_pack_header(plain)
    assert read == entries
    texts = [v.hex("blob1.plaintext"), v.hex("blob2.plaintext")]
    for e, text in zip(read, texts, strict=True):
        payload = master.decrypt_blob(e.id, e.type, pack[e.offset:e.offset + e.length])
        assert unpack_payload(payload, e.raw_length) == text


def check_index(v: Vectors) -> None:
    pack = v.hex("pack.name")
    rows, offset = [], 0
    for n in (1, 2):
        stored = v.hex(f"blob{n}.stored")
        rows.append((v.hex(f"blob{n}.id"), 0, offset, len(stored), len(v.hex(f"blob{n}.plaintext")),
                     DATA))
        offset += len(stored)
    plain = encode_index(IndexContent([pack], [DATA], encode_entries(rows), []))
    assert plain == v.hex("index.plain")
    decoded = decode_index(plain)
    assert (decoded.packs, decoded.pack_types, decoded.supersedes) == ([pack], [DATA], [])
    assert bytes(decoded.entries) == encode_entries(rows)
    stored = check_object(v, "index", KIND_INDEX, plain)
    assert bytes.fromhex(content_name(stored)) == v.hex("index.name")


MTIME_NS = 1_796_472_000 * 10**9  # 2026-12-05 12:00:00 UTC


def tree_nodes(v: Vectors) -> list[Node]:
    """The root tree of the page: a file, a symlink to it and an empty directory."""
    owner = (1000, 1000, "alice", "alice", MTIME_NS, MTIME_NS)
    size = len(v.hex("blob1.plaintext"))
    return [
        Node("hello.txt", FILE, 0o644, *owner, size, 1234, 2049, 1, [v.hex("blob1.id")]),
        Node("link", SYMLINK, 0o777, *owner, 9, 1235, 2049, 1, target="hello.txt"),
        Node("sub", DIR, 0o755, *owner, 0, 1236, 2049, 2, subtree=v.hex("tree.empty_id")),
    ]


def check_trees(v: Vectors) -> None:
    _, _, _, id_key = keys(v)
    empty = encode_tree([])
    assert empty == v.hex("tree.v2.empty")
    assert keyed_id(id_key, empty) == v.hex("tree.v2.empty_id")
    nodes = tree_nodes(v)
    nodes[0].xattrs = ((b"user.mime_type", b"text/plain"),)
    nodes[2].subtree = v.hex("tree.v2.empty_id")
    root = encode_tree(list(reversed(nodes)))  # the encoding sorts them
    assert root == v.hex("tree.v2.root")
    assert keyed_id(id_key, root) == v.hex("tree.v2.root_id")
    assert decode_tree(root) == nodes


def check_trees_v1(v: Vectors) -> None:
    """Version 1 trees are read: their nodes record no extended attributes (None)."""
    _, _, _, id_key = keys(v)
    assert decode_tree(v.hex("tree.empty")) == []
    assert keyed_id(id_key, v.hex("tree.empty")) == v.hex("tree.empty_id")
    nodes = tree_nodes(v)
    for n in nodes:
        n.xattrs = None
    assert decode_tree(v.hex("tree.root")) == nodes
    assert keyed_id(id_key, v.hex("tree.root")) == v.hex("tree.root_id")


def check_snapshot(v: Vectors) -> None:
    fields = {
        "time": datetime(2026, 12, 5, 12, 0, 0, tzinfo=UTC), "host": "vector-host",
        "username": "alice", "paths": ["/home/alice"], "tags": ["daily"], "kind": "files",
        "tree": v.hex("tree.root_id").hex(), "parent": None,
        "summary": {"bytes_read": len(v.hex("blob1.plaintext"))}, "source": {},
        "program_version": "0.1.0",
    }
    plain = encode_snapshot(fields)
    assert plain == v.text("snapshot.plain").encode()
    stored = check_object(v, "snapshot", KIND_SNAPSHOT, plain)
    name = content_name(stored)
    assert bytes.fromhex(name) == v.hex("snapshot.name")
    snap = decode_snapshot(name, plain)
    assert (snap.id, snap.tree, snap.time) == (name, fields["tree"], fields["time"])


def check_config(v: Vectors) -> None:
    _, _, _, id_key = keys(v)
    plain = v.text("config.plain").encode()
    check_object(v, "config", KIND_CONFIG, plain)
    config = json.loads(plain)
    assert config["version"] == 1 and bytes.fromhex(config["id_key"]) == id_key
    assert ChunkerParams.from_dict(config["chunker"]) == ChunkerParams(seed=v.number("chunker.seed"))


def check_key_file(v: Vectors) -> None:
    master, _, _, _ = keys(v)
    password = v.text("key.password")
    params = KdfParams(v.number("key.time_cost"), v.number("key.memory_kib"), v.number("key.parallelism"))
    kek = derive_password_key(password, v.hex("key.salt"), params)
    assert kek == v.hex("key.kek")
    sealed = v.hex("key.sealed")
    assert AESGCM(kek).encrypt(ZERO_NONCE, master.raw, b"kw-master-key") == sealed
    keyfile: dict[str, object] = {
        "kdf": "argon2id", "time_cost": params.time_cost, "memory_kib": params.memory_kib,
        "parallelism": params.parallelism, "salt": v.hex("key.salt").hex(), "sealed": sealed.hex(),
    }
    assert unwrap_master_key(keyfile, password).raw == master.raw


def cuts_as_documented(data: bytes, gear_table: list[int], masks: list[int], seed: int,
                       min_size: int, avg_size: int, max_size: int) -> list[int]:
    """The chunker as the page describes it, byte by byte: where each chunk ends."""
    gear = [g ^ seed for g in gear_table]
    bits = math.floor(math.log2(avg_size) + 0.5)
    mask_s, mask_l = masks[bits + 1], masks[bits - 1]
    cuts: list[int] = []
    start = 0
    while start < len(data):
        n = len(data) - start
        length = n
        if n > min_size:
            limit, normal = min(n, max_size), min(n, avg_size)
            length, h = limit, 0
            for i in range(2 * (min_size // 2), 2 * (limit // 2)):
                h = (2 * h + gear[data[start + i]]) & M64
                if not h & (mask_s if i < 2 * (normal // 2) else mask_l):
                    length = i
                    break
        start += length
        cuts.append(start)
    return cuts


def code_cuts(params: ChunkerParams, data: bytes) -> list[int]:
    cuts, end = [], 0
    for chunk in Chunker(params).chunks(io.BytesIO(data)):
        end += len(chunk)
        cuts.append(end)
    return cuts


def vector_input(length: int) -> bytes:
    return blake3.blake3(b"keepwell chunker vector").digest(length=length)


def check_chunker(v: Vectors) -> None:
    gear, masks = v.words("chunker.gear"), v.words("chunker.masks")
    assert gear == list(GEAR) and masks == list(MASKS)  # the library's own tables
    seed = v.number("chunker.seed")
    small = ChunkerParams(seed, v.number("chunker.small.min"), v.number("chunker.small.avg"),
                          v.number("chunker.small.max"))
    data = vector_input(v.number("chunker.small.length"))
    expected = v.numbers("chunker.small.cuts")
    assert code_cuts(small, data) == expected
    assert cuts_as_documented(data, gear, masks, seed, small.min_size, small.avg_size,
                              small.max_size) == expected
    data = vector_input(v.number("chunker.default.length"))  # longer than the stream buffer
    assert code_cuts(ChunkerParams(seed), data) == v.numbers("chunker.default.cuts")


CHECKS: list[Callable[[Vectors], None]] = [
    check_blob1, check_blob2, check_pack, check_index, check_trees, check_trees_v1, check_snapshot,
    check_config,
    check_key_file, check_chunker,
]


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
def test_vector(v: Vectors, check: Callable[[Vectors], None]) -> None:
    check(v)


def test_every_vector_on_the_page_is_checked(v: Vectors) -> None:
    for check in CHECKS:
        check(v)
    assert set(v.values) - v.read == set()
    assert len(v.values) > 40


def test_reader_of_the_page() -> None:
    page = ("text\n```vectors\na.b = 0011\n      2233\nc = [1,\n     2]\n```\n"
            "```json d.e\n{\"x\": 1}\n```\n```python\nignored = 1\n```\n")
    assert read_vectors(page) == {"a.b": "0011 2233", "c": "[1, 2]", "d.e": '{"x": 1}'}
    with pytest.raises(AssertionError, match="given twice"):
        read_vectors("```vectors\na = 1\na = 2\n```\n")
