"""Loading the FUSE binding of `keepwell mount`: `keepwell.sources.files.fuse` serves a
`keepwell.sources.files.mount.RepositoryView`; this module finds it, or says in one line why
FUSE cannot work here."""

from __future__ import annotations

import os
from collections.abc import Callable

from keepwell.errors import MissingExtraError

Serve = Callable[..., None]


def load_fuse(device: str = "/dev/fuse") -> Serve:
    """keepwell.sources.files.fuse's `serve`, or one clear error when FUSE cannot work here:
    no FUSE device, the Python binding not installed (the ``mount`` extra), or the libfuse 3
    shared library missing."""
    if not os.path.exists(device):
        raise MissingExtraError(f"FUSE is not available: {device} does not exist",
                                hint="load the fuse kernel module (modprobe fuse); in a "
                                     "container, give it the device /dev/fuse")
    try:
        from keepwell.sources.files import fuse
    except ImportError as exc:
        package = (exc.name or "").split(".")[0]
        if package in ("pyfuse3", "trio"):
            raise MissingExtraError(
                f"mount needs the Python package {package!r}, which is not "
                "installed", hint="install it with: pip install 'keepwell[mount]'") from None
        raise MissingExtraError(f"the FUSE library cannot be loaded ({exc})",
                                hint="install libfuse 3 (Debian: apt-get install fuse3), then "
                                     "pip install 'keepwell[mount]'") from None
    return fuse.serve
