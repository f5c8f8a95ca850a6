"""`RepositoryView` served to the kernel through FUSE (pyfuse3, on libfuse 3), read-only.

pyfuse3 runs its request loop in trio; every answer that may read the repository (a directory's
tree, a file's blobs) is computed in a worker thread (`trio.to_thread`), so several requests are
served at once and decryption, decompression and hashing, which release the GIL, use every core.
bench/mount.sh measures this binding against the same view served through mfusepy and against
restic's mount: reads are faster than restic's, listings slower than mfusepy's (pyfuse3's
per-request cost in trio); only this module knows the binding, so another can replace it.

The mount is read-only twice over: the kernel is told so (``ro``, so writes fail before they
reach keepwell), and every request that would change something answers EROFS anyway. A damaged
or missing blob makes the read of that file fail with EIO (a warning event names it); no
unverified byte is ever returned.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
from collections.abc import Callable, Sequence
from typing import Any

import pyfuse3
import trio

from keepwell.errors import BackendError, IntegrityError, KeepwellError
from keepwell.sources.files.mount import Attributes, NotFound, RepositoryView

# the tree of a snapshot never changes: the kernel may keep what it was told
_TIMEOUT = 3600.0


async def _read_only(*_args: Any, **_kwargs: Any) -> Any:
    raise pyfuse3.FUSEError(errno.EROFS)


class ViewOperations(pyfuse3.Operations):
    """The FUSE requests, answered from a `RepositoryView`."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, view: RepositoryView) -> None:
        super().__init__()
        self.view = view
        self._warned: set[str] = set()

    def _attrs(self, a: Attributes) -> pyfuse3.EntryAttributes:
        out = pyfuse3.EntryAttributes()
        out.st_ino = a.ino  # type: ignore[assignment]
        out.generation = 0
        out.entry_timeout = _TIMEOUT
        out.attr_timeout = _TIMEOUT
        out.st_mode = a.mode  # type: ignore[assignment]
        out.st_nlink = a.nlink
        out.st_uid = a.uid
        out.st_gid = a.gid
        out.st_rdev = a.rdev
        out.st_size = a.size
        out.st_blksize = 128 * 1024
        out.st_blocks = (a.size + 511) // 512
        out.st_atime_ns = a.atime_ns
        out.st_mtime_ns = a.mtime_ns
        out.st_ctime_ns = a.ctime_ns
        return out

    async def _call(self, fn: Callable[..., Any], *args: Any, inline: bool = False) -> Any:
        """``fn(*args)`` in a worker thread (or here, ``inline``, when it cannot block: a
        thread costs more than most answers from memory), its failures as the errno the caller
        gets."""
        try:
            return fn(*args) if inline else await trio.to_thread.run_sync(fn, *args)
        except NotFound:
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        except NotADirectoryError:
            raise pyfuse3.FUSEError(errno.ENOTDIR) from None
        except IsADirectoryError:
            raise pyfuse3.FUSEError(errno.EISDIR) from None
        except (IntegrityError, BackendError) as exc:
            said = exc.line()
            if said not in self._warned:  # the kernel asks again; one line is enough
                if len(self._warned) < 10_000:
                    self._warned.add(said)
                self.view.repo.events.emit("warning", message=f"mount: {said}")
            raise pyfuse3.FUSEError(errno.EIO) from None

    # -- reading -----------------------------------------------------------------------------------
    async def lookup(self, parent_inode: Any, name: Any, ctx: Any = None) -> Any:
        return self._attrs(await self._call(self.view.lookup, parent_inode, os.fsdecode(name),
                                            inline=self.view.listed(parent_inode)))

    async def forget(self, inode_list: Sequence[tuple[Any, int]]) -> None:
        for ino, count in inode_list:
            self.view.forget(ino, count)

    async def getattr(self, inode: Any, ctx: Any = None) -> Any:
        try:
            return self._attrs(self.view.attributes(inode))
        except NotFound:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    async def readlink(self, inode: Any, ctx: Any) -> Any:
        try:
            return os.fsencode(self.view.readlink(inode))
        except NotFound:
            raise pyfuse3.FUSEError(errno.EINVAL) from None

    async def opendir(self, inode: Any, ctx: Any) -> Any:
        # reads the tree blob; ENOTDIR if a file
        await self._call(self.view.children, inode, inline=self.view.listed(inode))
        return inode

    async def readdir(self, fh: Any, start_id: int, token: Any) -> None:
        entries = await self._call(self.view.listing, fh, inline=self.view.listed(fh))
        for i in range(start_id, len(entries)):
            name, ino = entries[i]
            try:
                attrs = self._attrs(self.view.attributes(ino))
            except NotFound:
                continue  # forgotten while listed: the next listing names it again
            if not pyfuse3.readdir_reply(token, os.fsencode(name), attrs, i + 1):
                return
            self.view.remember(ino)

    async def releasedir(self, fh: Any) -> None:
        return None

    async def open(self, inode: Any, flags: Any, ctx: Any) -> Any:
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & (os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        a = self.view.attributes(inode)
        if stat.S_ISDIR(a.mode):
            raise pyfuse3.FUSEError(errno.EISDIR)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh: Any, off: int, size: int) -> bytes:
        data: bytes = await self._call(self.view.read, fh, off, size)
        return data

    async def release(self, fh: Any) -> None:
        return None

    async def flush(self, fh: Any) -> None:
        return None

    async def access(self, inode: Any, mode: Any, ctx: Any) -> bool:
        return not mode & os.W_OK

    async def getxattr(self, inode: Any, name: Any, ctx: Any) -> bytes:
        for key, value in self.view.xattrs(inode):
            if key == name:
                return value
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    async def listxattr(self, inode: Any, ctx: Any) -> Any:
        return [key for key, _ in self.view.xattrs(inode)]

    async def statfs(self, ctx: Any) -> Any:
        out = pyfuse3.StatvfsData()
        out.f_bsize = out.f_frsize = 4096
        out.f_blocks = out.f_bfree = out.f_bavail = 0
        out.f_files = self.view.live_entries()
        out.f_ffree = out.f_favail = 0
        out.f_namemax = 255
        return out

    # -- every change is refused -------------------------------------------------------------------
    setattr = _read_only
    mknod = _read_only
    mkdir = _read_only
    unlink = _read_only
    rmdir = _read_only
    symlink = _read_only
    rename = _read_only
    link = _read_only
    write = _read_only
    create = _read_only
    setxattr = _read_only
    removexattr = _read_only


def serve(view: RepositoryView, mountpoint: str, *, allow_other: bool = False,
          on_mounted: Callable[[], None] | None = None) -> None:
    """Mount ``view`` at ``mountpoint`` and answer requests until the filesystem is unmounted
    (``fusermount3 -u``) or SIGINT or SIGTERM arrives; then unmount it and return."""
    options = set(pyfuse3.default_options) | {"ro", "fsname=keepwell", "subtype=keepwell"}
    if allow_other:
        options.add("allow_other")
    try:
        pyfuse3.init(ViewOperations(view), mountpoint, options)
    except RuntimeError as exc:  # libfuse said why on stderr
        raise KeepwellError(f"cannot mount at {mountpoint}: {exc}",
                            hint="see the line above from libfuse") from None
    try:
        trio.run(_loop, on_mounted)
    finally:
        pyfuse3.close(unmount=True)


async def _loop(on_mounted: Callable[[], None] | None) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signal, nursery.cancel_scope)
        if on_mounted is not None:
            on_mounted()
        await pyfuse3.main(min_tasks=4, max_tasks=32)
        nursery.cancel_scope.cancel()  # unmounted from outside: the signal watch ends too


async def _stop_on_signal(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            scope.cancel()
            return

