"""The metadata of files beyond their bytes: which is kept, how a backup reads it, and how a
restore applies it.

Words:

- **owner**: uid and gid (the names are kept beside them, for display);
- **extended attributes** (xattrs): (name, value) pairs as bytes, in name order. Kept: the
  ``user.``, ``security.`` and ``trusted.`` namespaces, and the POSIX ACLs as the kernel stores
  them (``system.posix_acl_access`` and ``system.posix_acl_default``, their raw values). A
  reader that may not see a namespace (``trusted.`` needs CAP_SYS_ADMIN) is not shown it;
- **privileged** metadata: the owner, the xattrs of every namespace but ``user.``, and device
  nodes: a restore without the privilege to set them counts what it could not set and says so
  once, at the end (`MetadataReport`), never once per file.

A backup reads the xattrs of a regular file through the descriptor it reads the file with (one
``flistxattr``, which finds none on most files), those of other entries by their path without
following a symlink. A filesystem that supports none is asked once per device (`XattrReader`).

A restore applies a node's metadata through a descriptor of the object itself, or through the
directory that holds it and its name, never following a symlink (`apply`): owner first (chown
clears set-id bits and file capabilities), then mode, times and xattrs.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from keepwell.sources.files import fileio

Xattrs = tuple[tuple[bytes, bytes], ...]

_ACLS = ("system.posix_acl_access", "system.posix_acl_default")
_ACL_NAMES = tuple(os.fsencode(n) for n in _ACLS)
_KEPT_PREFIXES = ("user.", "security.", "trusted.")
# errors that mean "this filesystem or this object has no such metadata" or "not permitted"
_NONE = (errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENODATA, errno.EPERM, errno.EACCES, errno.ENOENT)
# an attribute that cannot be set for want of privilege or of support (or an owner that cannot
# be given: EINVAL is an id this user namespace does not map)
_DENIED = (errno.EPERM, errno.EACCES)
_UNSUPPORTED = (errno.ENOTSUP, errno.EOPNOTSUPP)
_PROC_FD = "/proc/self/fd/"

# what `apply` could not restore, as bits (a worker process returns them with each file)
OWNER = 1  # the owner
XATTR_DENIED = 2  # an xattr of a privileged namespace (not permitted)
XATTR_UNSUPPORTED = 4  # an xattr the target filesystem does not support
XATTR_USER_DENIED = 8  # a user. xattr (not permitted: only files and directories have them)


def kept(name: str) -> bool:
    return name.startswith(_KEPT_PREFIXES) or name in _ACLS


def privileged_name(name: bytes) -> bool:
    return not name.startswith(b"user.")


def read_fd(fd: int) -> Xattrs:
    """The kept xattrs of an open file: one call when it has none."""
    try:
        names = os.listxattr(fd)
    except OSError as exc:
        if exc.errno in _NONE:
            return ()
        raise
    if not names:
        return ()
    return _values(names, lambda n: os.getxattr(fd, n))


def read_path(path: str) -> Xattrs:
    """The kept xattrs of the entry at ``path`` (a symlink's own, not its target's)."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in _NONE:
            return ()
        raise
    if not names:
        return ()
    return _values(names, lambda n: os.getxattr(path, n, follow_symlinks=False))


def _values(names: list[str], get: Callable[[str], bytes]) -> Xattrs:
    out = []
    for name in sorted(names, key=os.fsencode):
        if not kept(name):
            continue
        try:
            value = get(name)
        except OSError as exc:
            if exc.errno in _NONE:
                continue  # removed meanwhile, or not readable by this user
            raise
        out.append((os.fsencode(name), bytes(value)))
    return tuple(out)


class XattrReader:
    """Reads the xattrs of entries by path, skipping the devices whose filesystem has none."""

    def __init__(self) -> None:
        self._without: set[int] = set()

    def read(self, path: str, dev: int, directory: bool = False) -> Xattrs:
        """The kept xattrs of the entry at ``path`` on device ``dev``; none if they cannot be
        read. A directory that supports none marks its device (some filesystems support them
        on directories and files but not on symlinks)."""
        if dev in self._without:
            return ()
        try:
            names = os.listxattr(path, follow_symlinks=False)
        except OSError as exc:
            if directory and exc.errno in _UNSUPPORTED:
                self._without.add(dev)
            return ()
        if not names:
            return ()
        try:
            return _values(names, lambda n: os.getxattr(path, n, follow_symlinks=False))
        except OSError:
            return ()


@dataclass(frozen=True)
class Policy:
    """What a restore asks for: owners only with the privilege to give them (``privileged``);
    ``creator`` is the owner a new file has without a chown (None: unknown, chown every file)."""

    privileged: bool
    creator: tuple[int, int] | None
    me: tuple[int, int] = (-1, -1)  # the restoring user's euid and egid

    def owner(self, uid: int, gid: int) -> tuple[int, int] | None:
        if not self.privileged:
            return None
        return None if (uid, gid) == self.creator else (uid, gid)


def apply(policy: Policy, kind: str, mode: int, uid: int, gid: int, mtime_ns: int,
          xattrs: Xattrs | None, *, fd: int | None = None, dir_fd: int | None = None,
          name: str | None = None) -> int:
    """Give an object its owner, mode, times and xattrs, through ``fd`` (an open descriptor of
    the object) or ``dir_fd`` and ``name`` (an entry of that directory, not followed if it is a
    symlink). Returns the bits of what could not be restored for want of privilege or support;
    raises OSError for any other failure."""
    missed = 0
    owner = policy.owner(uid, gid)
    if not policy.privileged and (uid, gid) != policy.me:
        missed |= OWNER  # an unprivileged user cannot give files away
    if fd is not None:
        if not fileio.set_meta(fd, mode, mtime_ns, owner):
            missed |= OWNER
        if xattrs:
            missed |= _set_xattrs(xattrs, lambda k, v: os.setxattr(fd, k, v))
        return missed
    assert dir_fd is not None and name is not None and "/" not in name
    link = kind == "symlink"
    if owner is not None:
        try:
            os.chown(name, owner[0], owner[1], dir_fd=dir_fd, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in (*_DENIED, errno.EINVAL):
                raise
            missed |= OWNER
    if not link:
        _chmod_at(dir_fd, name, mode)
    os.utime(name, ns=(mtime_ns, mtime_ns), dir_fd=dir_fd, follow_symlinks=False)
    if xattrs and kind not in ("file", "dir"):
        # Linux has user. xattrs on files and directories only: a tree from elsewhere may
        # hold others, which nothing here could set
        xattrs = tuple(x for x in xattrs if privileged_name(x[0]))
    if xattrs:
        # the directory by its descriptor, the last name not followed
        where = f"{_PROC_FD}{dir_fd}/{name}"
        missed |= _set_xattrs(xattrs, lambda k, v: os.setxattr(where, k, v, follow_symlinks=False))
    return missed


def _chmod_at(dir_fd: int, name: str, mode: int) -> None:
    try:
        os.chmod(name, mode, dir_fd=dir_fd, follow_symlinks=False)
        return
    except (NotImplementedError, ValueError):
        pass  # a libc without fchmodat(AT_SYMLINK_NOFOLLOW): through a descriptor of the entry
    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        if not stat.S_ISLNK(os.fstat(fd).st_mode):
            os.chmod(f"{_PROC_FD}{fd}", mode)
    finally:
        os.close(fd)


def _set_xattrs(xattrs: Xattrs, put: Callable[[str, bytes], None]) -> int:
    missed = 0
    for key, value in xattrs:
        try:
            put(os.fsdecode(key), value)
        except OSError as exc:
            if exc.errno in _UNSUPPORTED:
                missed |= XATTR_UNSUPPORTED
            elif exc.errno in _DENIED or (exc.errno == errno.EINVAL and key in _ACL_NAMES):
                # EINVAL: an ACL naming an id this user namespace does not map
                missed |= XATTR_DENIED if privileged_name(key) else XATTR_USER_DENIED
            else:
                raise
    return missed


@dataclass
class MetadataReport:
    """What a restore could not restore, counted per object; said once, at the end."""

    privileged: bool
    owner: int = 0  # objects whose owner could not be given
    xattr_denied: int = 0  # objects with a privileged xattr that could not be set
    xattr_unsupported: int = 0  # objects with an xattr the target filesystem does not support
    devices: int = 0  # device nodes not made (that needs privilege)
    sockets: int = 0  # sockets in the snapshot (not restored, as they cannot be)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, missed: int) -> None:
        if not missed:
            return
        with self._lock:
            if missed & OWNER:
                self.owner += 1
            if missed & XATTR_DENIED:
                self.xattr_denied += 1
            if missed & (XATTR_UNSUPPORTED | XATTR_USER_DENIED):
                self.xattr_unsupported += 1

    def count(self, what: str) -> None:
        with self._lock:
            setattr(self, what, getattr(self, what) + 1)

    @property
    def complete(self) -> bool:
        """Whether everything the user could have asked for was restored: an unprivileged user
        cannot ask for owners, privileged xattrs or device nodes."""
        if self.xattr_unsupported:
            return False
        return not self.privileged or not (self.owner or self.xattr_denied or self.devices)

    def notes(self) -> list[str]:
        """One line per kind of metadata not restored."""
        out = []
        if self.owner:
            out.append(f"ownership not restored for {self.owner} files (not permitted)")
        if self.xattr_denied:
            out.append(f"extended attributes of a privileged namespace not restored for "
                       f"{self.xattr_denied} files (not permitted)")
        if self.xattr_unsupported:
            out.append(f"extended attributes not restored for {self.xattr_unsupported} files "
                       f"(not supported by the target filesystem)")
        if self.devices:
            out.append(f"{self.devices} device nodes not restored (not permitted)")
        if self.sockets:
            out.append(f"{self.sockets} sockets not restored (sockets cannot be restored)")
        return out

    def to_json(self) -> dict[str, int]:
        return {"owner_not_restored": self.owner, "xattrs_not_permitted": self.xattr_denied,
                "xattrs_not_supported": self.xattr_unsupported,
                "devices_not_restored": self.devices, "sockets_skipped": self.sockets}
