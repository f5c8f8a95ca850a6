"""Secrets by reference: ``env:NAME`` reads an environment variable, ``file:PATH`` a file.

The configuration never has to hold a secret inline; it names where the secret lives, and the
value is read only when a job needs it (so rotating a secret file needs no restart).
"""

from __future__ import annotations

import os

from keepwell.errors import ConfigurationError
from keepwell.repository.keys import read_password_file

SCHEMES = ("env:", "file:")


def check_reference(ref: str) -> str:
    """Validate the form of a reference (not its value); return it unchanged."""
    if ref.startswith("env:"):
        if not ref[4:] or not ref[4:].replace("_", "a").isalnum():
            raise ValueError(f"bad environment variable name in {ref!r}")
        return ref
    if ref.startswith("file:"):
        if not ref[5:]:
            raise ValueError("file: needs a path, e.g. file:/etc/keepwell/repo.pass")
        return ref
    raise ValueError("secrets are given by reference: env:NAME or file:PATH, not inline")


def resolve(ref: str, *, what: str = "secret") -> str:
    """Read the secret a reference points to."""
    if ref.startswith("env:"):
        value = os.environ.get(ref[4:])
        if value is None:
            raise ConfigurationError(
                f"{what}: environment variable {ref[4:]} is not set",
                hint=f"export {ref[4:]} before starting keepwell",
            )
        if not value:  # as a file whose first line is empty
            raise ConfigurationError(
                f"{what}: environment variable {ref[4:]} is empty",
                hint=f"give {ref[4:]} the secret before starting keepwell",
            )
        return value
    if ref.startswith("file:"):
        return read_password_file(os.path.expanduser(ref[5:]), f"{what} file", ConfigurationError)
    raise ConfigurationError(f"{what}: {ref!r} is not env:NAME or file:PATH")


def resolve_optional(ref: str | None, *, what: str = "secret") -> str | None:
    return None if ref is None else resolve(ref, what=what)
