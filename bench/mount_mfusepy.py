"""keepwell's `RepositoryView` served through mfusepy (ctypes over libfuse 3, path-based) instead of
pyfuse3: only for bench/mount.sh, which measures both bindings against restic's mount.

Usage: KEEPWELL_PASSWORD=... python bench/mount_mfusepy.py REPO MOUNTPOINT
"""

from __future__ import annotations

import errno
import os
import sys
import threading
from typing import Any

import mfusepy

from keepwell.repository import open_repository
from keepwell.sources.files.mount import ROOT_INO, NotFound, RepositoryView


class PathOperations(mfusepy.Operations):  # type: ignore[misc]
    use_ns = True

    def __init__(self, view: RepositoryView) -> None:
        self.view = view
        self.inos: dict[str, int] = {"/": ROOT_INO}
        self.lock = threading.Lock()

    def _ino(self, path: str) -> int:
        found = self.inos.get(path)
        if found is not None:
            return found
        parent, _, name = path.rpartition("/")
        try:
            ino = self.view.lookup(self._ino(parent or "/"), name).ino
        except NotFound:
            raise mfusepy.FuseOSError(errno.ENOENT) from None
        self.inos[path] = ino
        return ino

    def getattr(self, path: str, fh: Any = None) -> dict[str, Any]:
        a = self.view.attributes(self._ino(path))
        return {"st_ino": a.ino, "st_mode": a.mode, "st_nlink": a.nlink, "st_uid": a.uid,
                "st_gid": a.gid, "st_rdev": a.rdev, "st_size": a.size, "st_atime": a.atime_ns,
                "st_mtime": a.mtime_ns, "st_ctime": a.ctime_ns}

    def readdir(self, path: str, fh: Any) -> list[str]:
        return [".", "..", *sorted(self.view.children(self._ino(path)))]

    def readlink(self, path: str) -> str:
        return self.view.readlink(self._ino(path))

    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        for key, value in self.view.xattrs(self._ino(path)):
            if key == os.fsencode(name):
                return value
        raise mfusepy.FuseOSError(errno.ENODATA)

    def listxattr(self, path: str) -> list[str]:
        return [os.fsdecode(key) for key, _ in self.view.xattrs(self._ino(path))]

    def open(self, path: str, flags: int) -> int:
        return self._ino(path)

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        return self.view.read(fh, offset, size)


def main() -> None:
    repo_location, mountpoint = sys.argv[1:3]
    repo = open_repository(repo_location, os.environ["KEEPWELL_PASSWORD"])
    view = RepositoryView(repo)
    mfusepy.FUSE(PathOperations(view), mountpoint, foreground=True, ro=True, nothreads=False)
    view.close()


if __name__ == "__main__":
    main()
