"""Maps repository locations to backends.

A location is a local path (or ``file://`` URL), ``memory://`` or a URL whose scheme names a
backend (``s3://``, ``sftp://``, ...). Factories are named as ``module:function`` strings and
imported only when their scheme is used, so optional SDKs cost nothing until needed; a missing
one is reported as the install extra to add (`keepwell.extras`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from keepwell.backends.base import Backend
from keepwell.errors import UsageError
from keepwell.extras import missing_extra

_FACTORIES: dict[str, str] = {
    "file": "keepwell.backends.local:from_url",
    "memory": "keepwell.backends.registry:_memory",
    "s3": "keepwell.backends.objectstore:from_url",
    "gs": "keepwell.backends.objectstore:gcs_from_url",
    "az": "keepwell.backends.objectstore:azure_from_url",
    "sftp": "keepwell.backends.sftp:from_url",
}


def register(scheme: str, factory: str) -> None:
    """Register ``module:function`` as the factory for ``scheme://`` locations."""
    _FACTORIES[scheme] = factory


def _memory(url: str, **options: Any) -> Backend:
    from keepwell.backends.memory import MemoryBackend

    return MemoryBackend(url)


def scheme_of(location: str) -> str:
    if "://" in location:
        return location.split("://", 1)[0].lower()
    return "file"


def open_backend(location: str, **options: Any) -> Backend:
    scheme = scheme_of(location)
    target = _FACTORIES.get(scheme)
    if target is None:
        known = ", ".join(sorted(s + "://" for s in _FACTORIES))
        raise UsageError(f"unknown repository scheme {scheme!r} in {location!r} (known: {known})")
    module_name, func_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        missing = missing_extra(exc, f"the {scheme}:// backend")
        if missing is None:
            raise
        raise missing from None
    factory: Callable[..., Backend] = getattr(module, func_name)
    return factory(location, **options)
