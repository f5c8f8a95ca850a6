"""Trees: one blob per directory listing its entries (nodes), sorted by name.

A tree blob's id is the keyed hash of its encoding, so an unchanged directory gives the same tree
blob and deduplicates, and so does every directory above it that did not change. Names are kept
as bytes, so names that are not valid UTF-8 survive a round trip.

Version 2 adds a node's extended attributes (POSIX ACLs among them), as (name, value) pairs of
bytes in name order. Version 1 trees are still read: their nodes' ``xattrs`` is None (not
recorded), where a version 2 node without any has an empty tuple.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import msgpack

from keepwell.errors import FormatError

TREE_VERSION = 2
FILE, DIR, SYMLINK, FIFO, CHARDEV, BLOCKDEV, SOCKET = (
    "file", "dir", "symlink", "fifo", "chardev", "blockdev", "socket"
)
_TYPES = [FILE, DIR, SYMLINK, FIFO, CHARDEV, BLOCKDEV, SOCKET]
_TYPE_CODE = {t: i for i, t in enumerate(_TYPES)}


@dataclass(slots=True)
class Node:
    name: str
    type: str
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    user: str = ""
    group: str = ""
    mtime_ns: int = 0
    ctime_ns: int = 0
    size: int = 0
    inode: int = 0
    dev: int = 0
    nlink: int = 1
    content: list[bytes] = field(default_factory=list)
    subtree: bytes | None = None
    target: str | None = None
    rdev: int = 0
    xattrs: tuple[tuple[bytes, bytes], ...] | None = ()

    @property
    def mtime(self) -> float:
        return self.mtime_ns / 1e9

    def to_json(self) -> dict[str, object]:
        d: dict[str, object] = {
            "name": self.name, "type": self.type, "mode": oct(self.mode), "uid": self.uid,
            "gid": self.gid, "user": self.user, "group": self.group, "mtime_ns": self.mtime_ns,
            "size": self.size,
        }
        if self.target is not None:
            d["target"] = self.target
        if self.subtree is not None:
            d["subtree"] = self.subtree.hex()
        if self.content:
            d["blobs"] = len(self.content)
        if self.xattrs:
            d["xattrs"] = [os.fsdecode(k) for k, _ in self.xattrs]
        return d


def encode_node(n: Node) -> list[object]:
    """A node as the items of its array in a tree blob."""
    return [
        _name_bytes(n.name), _TYPE_CODE[n.type], n.mode, n.uid, n.gid, n.user, n.group,
        n.mtime_ns, n.ctime_ns, n.size, n.inode, n.dev, n.nlink, n.content, n.subtree,
        None if n.target is None else os.fsencode(n.target), n.rdev,
        [[k, v] for k, v in n.xattrs] if n.xattrs else [],
    ]


def tree_key(n: Node) -> bytes:
    """What a tree blob orders its nodes by: the bytes of their names."""
    return _name_bytes(n.name)


def in_tree_order(nodes: list[Node]) -> list[Node]:
    """The nodes in the order a tree blob holds them (`tree_key`)."""
    return sorted(nodes, key=tree_key)


def encode_tree(nodes: list[Node], *, ordered: bool = False) -> bytes:
    """A tree blob of ``nodes`` (``ordered``: they are `in_tree_order` already)."""
    if not ordered:
        nodes = in_tree_order(nodes)
    data: bytes = msgpack.packb([TREE_VERSION, [encode_node(n) for n in nodes]], use_bin_type=True)
    return data


def encode_pieces(nodes: list[Node], known: list[bytes | None] | None = None) -> list[bytes]:
    """Each node's encoding on its own, in the order given (`join_pieces` makes the tree blob
    of them). ``known``: beside ``nodes``, the encodings already made (None where a node has
    none): the unchanged entries of a directory written again."""
    pack = msgpack.Packer(use_bin_type=True).pack
    if known is None:
        return [pack(encode_node(n)) for n in nodes]
    return [p if p is not None else pack(encode_node(n)) for n, p in zip(nodes, known, strict=True)]


def join_pieces(pieces: list[bytes]) -> bytes:
    """The tree blob of nodes encoded one by one (`encode_pieces`, in tree order): the same
    bytes as `encode_tree` of those nodes."""
    n = len(pieces)
    if n < 16:
        head = bytes((0x90 | n,))
    elif n < 1 << 16:
        head = b"\xdc" + n.to_bytes(2, "big")
    else:
        head = b"\xdd" + n.to_bytes(4, "big")
    return b"".join((_TREE_HEAD, head, *pieces))


_TREE_HEAD = bytes((0x92, TREE_VERSION))  # an array of two: the version, then the nodes


def as_decoded(nodes: list[Node]) -> bool:
    """Whether ``nodes`` equal, field by field, what decoding their encoding gives: what is
    written as an empty list of extended attributes reads back as ``()``, not as None."""
    return all(type(n.xattrs) is tuple and type(n.content) is list for n in nodes)


def decode_tree(data: bytes) -> list[Node]:
    try:
        version, raw = msgpack.unpackb(data, raw=False, use_list=True)
        if version not in (1, TREE_VERSION):
            raise ValueError(f"tree version {version}")
        intern, types = sys.intern, _TYPES
        # positional, in the order of the fields and of the encoding (a walk decodes every
        # node of the parent snapshot: keywords cost a quarter of it)
        return [
            Node(_name(r[0]), types[r[1]], r[2], r[3], r[4], intern(r[5]), intern(r[6]), r[7],
                 r[8], r[9], r[10], r[11], r[12], r[13], r[14],
                 None if r[15] is None else _name(r[15]), r[16],
                 None if version == 1 else _xattrs(r[17]))
            for r in raw
        ]
    except (ValueError, TypeError, IndexError, UnicodeDecodeError, msgpack.UnpackException) as exc:
        raise FormatError(f"tree blob cannot be decoded: {exc}") from None


_NOT_NAMES = frozenset(("", ".", ".."))


def unusable_name(nodes: list[Node]) -> str | None:
    """What makes a directory's nodes unusable as the entries of one directory, or None: a name
    that is empty, ``.``, ``..``, or holds ``/`` or NUL, or a name given twice. Backup never
    writes such names; a tree that holds one was damaged or forged, and restoring it as it is
    could write outside the restore's target."""
    for n in nodes:
        name = n.name
        if name in _NOT_NAMES or "/" in name or "\0" in name:
            return f"an unusable name {name!r}"
    if len({n.name for n in nodes}) != len(nodes):
        seen: set[str] = set()
        for n in nodes:
            if n.name in seen:
                return f"the name {n.name!r} twice"
            seen.add(n.name)
    return None
def _xattrs(raw: list[list[bytes]]) -> tuple[tuple[bytes, bytes], ...]:
    if not raw:
        return ()
    out = tuple((k, v) for k, v in raw)
    if not all(type(k) is bytes and type(v) is bytes for k, v in out):
        raise ValueError("an extended attribute is not a pair of bytes")
    return out


_UTF8 = sys.getfilesystemencoding() == "utf-8" and sys.getfilesystemencodeerrors() == "surrogateescape"


def _name_bytes(name: str) -> bytes:
    """os.fsencode of a name, straight to the codec when the filesystem encoding is UTF-8."""
    return name.encode("utf-8", "surrogateescape") if _UTF8 else os.fsencode(name)


def _name(b: bytes) -> str:
    """os.fsdecode of a name, straight to the codec when the filesystem encoding is UTF-8."""
    return b.decode("utf-8", "surrogateescape") if _UTF8 else os.fsdecode(b)
