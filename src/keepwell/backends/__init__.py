"""Backends: where repository objects are kept (local disk, memory, and remote stores)."""

from keepwell.backends.base import Backend, ObjectInfo
from keepwell.backends.registry import open_backend, register

__all__ = ["Backend", "ObjectInfo", "open_backend", "register"]
