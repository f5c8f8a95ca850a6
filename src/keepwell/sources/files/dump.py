"""A directory of a snapshot as an archive stream, tar or zip (``keepwell dump SNAPSHOT DIR``).

The archive is written to a stream that need not seek (a pipe): entries carry the mode, owner,
modification time, symlink targets (and in tar special files), and file contents are read blob
by blob, each verified against its id as a restore does. Names inside the archive are relative:
the dumped directory's own name, then the path below it (``/`` dumps everything, from the root's
entries on). Every name is checked component by component: a name the repository gives that is
empty, ``.``, ``..`` or holds a ``/`` or a NUL stops the dump (`FormatError`), so an archive never
holds a name that would escape the directory it is unpacked in.
"""

from __future__ import annotations

import os
import stat
import tarfile
import zipfile
from collections.abc import Iterator
from typing import BinaryIO

from keepwell.errors import FormatError
from keepwell.repository.repo import BlobReader, Repository
from keepwell.repository.snapshot import Snapshot
from keepwell.repository.tree import BLOCKDEV, CHARDEV, DIR, FIFO, FILE, SYMLINK, Node

ARCHIVE_FORMATS = ("tar", "zip")
_TAR_TYPES = {DIR: tarfile.DIRTYPE, SYMLINK: tarfile.SYMTYPE, FIFO: tarfile.FIFOTYPE,
              CHARDEV: tarfile.CHRTYPE, BLOCKDEV: tarfile.BLKTYPE}


class _FullReads:
    """A file's blobs as tarfile reads them: ``read(n)`` returns n bytes unless the file ends."""

    def __init__(self, reader: BlobReader) -> None:
        self.reader = reader

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            return self.reader.read()
        parts, left = [], n
        while left:
            piece = self.reader.read(left)
            if not piece:
                break
            parts.append(piece)
            left -= len(piece)
        return b"".join(parts)


def _checked(name: str) -> str:
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        raise FormatError(f"the snapshot holds an entry named {name!r}, which no archive may "
                          "hold: dump stopped")
    return name


def entries(repo: Repository, snap: Snapshot, path: str) -> Iterator[tuple[str, Node]]:
    """(relative name, node) of the directory ``path`` and all below it, parents first."""
    top = repo.find_node(snap, path)
    stack: list[tuple[str, Node]] = []
    if path.strip("/"):
        stack.append((_checked(top.name), top))
    elif top.subtree is not None:  # the root: its entries, without a name of its own
        stack += [(_checked(n.name), n) for n in reversed(repo.load_tree(top.subtree))]
    while stack:
        name, node = stack.pop()
        yield name, node
        if node.type == DIR and node.subtree is not None:
            stack += [(f"{name}/{_checked(n.name)}", n)
                      for n in reversed(repo.load_tree(node.subtree))]


def write_tar(repo: Repository, snap: Snapshot, path: str, out: BinaryIO) -> int:
    """Write the archive; the number of entries."""
    count = 0
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for name, node in entries(repo, snap, path):
            info = tarfile.TarInfo(name)
            info.mode = stat.S_IMODE(node.mode)
            info.mtime = node.mtime_ns // 1_000_000_000
            info.uid, info.gid, info.uname, info.gname = node.uid, node.gid, node.user, node.group
            if node.type == FILE:
                info.size = node.size
                tar.addfile(info, _FullReads(BlobReader(repo.iter_blobs(node.content))))
            elif node.type in _TAR_TYPES:
                info.type = _TAR_TYPES[node.type]
                info.linkname = node.target or ""
                info.devmajor, info.devminor = os.major(node.rdev), os.minor(node.rdev)
                tar.addfile(info)
            else:
                continue  # a socket: nothing an archive can carry
            count += 1
    return count


class _ZipInfo(zipfile.ZipInfo):
    """A zip entry whose name may hold bytes that are not UTF-8 (a Linux file name is bytes,
    kept as surrogates): such a name is written as those bytes, without the UTF-8 flag, as
    Info-ZIP and restic write it, instead of failing the dump."""

    def _encodeFilenameFlags(self) -> tuple[bytes, int]:  # noqa: N802 (zipfile's name)
        try:
            return super()._encodeFilenameFlags()  # type: ignore[misc, no-any-return]
        except UnicodeEncodeError:
            return self.filename.encode("utf-8", "surrogateescape"), self.flag_bits


def write_zip(repo: Repository, snap: Snapshot, path: str, out: BinaryIO) -> int:
    """Write the archive (directories, files and symlinks); the number of entries."""
    import time

    count = 0
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name, node in entries(repo, snap, path):
            when = time.localtime(max(node.mtime_ns // 1_000_000_000, 315532800))[:6]  # >= 1980
            kind = {FILE: stat.S_IFREG, DIR: stat.S_IFDIR, SYMLINK: stat.S_IFLNK}.get(node.type)
            if kind is None:
                continue  # special files: zip has no way to hold them
            info = _ZipInfo(name + ("/" if node.type == DIR else ""), date_time=when)
            info.external_attr = (kind | stat.S_IMODE(node.mode)) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            if node.type == DIR:
                info.external_attr |= 0x10  # the MS-DOS directory flag
                z.writestr(info, b"")
            elif node.type == SYMLINK:
                z.writestr(info, (node.target or "").encode("utf-8", "surrogateescape"))
            else:
                with z.open(info, "w", force_zip64=node.size > 0x7FFFFFFF) as f:
                    for chunk in repo.iter_blobs(node.content):
                        f.write(chunk)
            count += 1
    return count
