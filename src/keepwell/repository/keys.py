"""Key files: the master key wrapped by each password of the repository.

``keys/<id>`` is plain JSON (it must be readable before anything can be decrypted): who made it,
when, the Argon2id parameters and salt, and the sealed master key.
"""

from __future__ import annotations

import getpass
import json
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from keepwell.backends.base import Backend
from keepwell.crypto import KdfParams, MasterKey, content_name, unwrap_master_key, wrap_master_key
from keepwell.errors import (
    IntegrityError,
    KeepwellError,
    ObjectNotFoundError,
    RepositoryNotFoundError,
    UsageError,
    WrongPasswordError,
)


@dataclass(frozen=True)
class KeyInfo:
    id: str
    created: str
    host: str
    username: str


def add_key(backend: Backend, master: MasterKey, password: str, params: KdfParams | None = None) -> str:
    doc = {
        "created": datetime.now(UTC).isoformat(),
        "host": socket.gethostname(),
        "username": getpass.getuser(),
        **wrap_master_key(master, password, params or KdfParams.default()),
    }
    data = json.dumps(doc, indent=1).encode()
    key_id = content_name(data)
    backend.put(f"keys/{key_id}", data)
    return key_id


def list_keys(backend: Backend) -> list[KeyInfo]:
    out = []
    for info in backend.list("keys/"):
        try:
            doc = json.loads(backend.get(info.name))
        except ValueError:
            doc = {"host": "(damaged key file)"}
        out.append(KeyInfo(info.name.split("/", 1)[1], doc.get("created", ""), doc.get("host", ""),
                           doc.get("username", "")))
    return sorted(out, key=lambda k: k.created)


def open_with_password(backend: Backend, password: str,
                       opens: Callable[[MasterKey], bool] | None = None) -> tuple[MasterKey, str]:
    """Try every key file; return the master key and the id of the key that opened it.
    ``opens``: whether a master key opens the repository (decrypts its config); a key file
    the password unlocks but whose master key does not is passed over."""
    names = [i.name for i in backend.list("keys/")]
    if not names:
        try:
            backend.stat("config")
        except ObjectNotFoundError:
            raise RepositoryNotFoundError(f"no repository at {backend.location}") from None
        raise KeepwellError(f"repository at {backend.location} has no key files",
                            hint="restore the keys/ folder from a copy")
    damaged: list[str] = []
    refused: list[str] = []
    for name in names:
        try:
            data = backend.get(name)
        except ObjectNotFoundError:
            continue
        if content_name(data) != name.split("/", 1)[1]:
            damaged.append(name)  # tried all the same: a misnamed key file may be whole
        try:
            master = unwrap_master_key(json.loads(data), password)
        except WrongPasswordError:
            continue
        except (ValueError, KeyError, TypeError):
            if name not in damaged:
                damaged.append(name)
            continue
        if opens is not None and not opens(master):
            refused.append(name)
            continue
        return master, name.split("/", 1)[1]
    if refused:
        raise IntegrityError(
            f"the config of {backend.location} fails authentication with the key(s) this password "
            f"unlocks ({', '.join(refused)}): the config is damaged, or those key files belong to "
            "another repository", hint="restore config and keys/ from a copy of the repository")
    if damaged:
        raise WrongPasswordError(
            f"no key file of {backend.location} opens with this password, and "
            f"{len(damaged)} key file(s) are damaged: {', '.join(damaged)}",
            hint="if the password is right, restore keys/ from a copy of the repository")
    raise WrongPasswordError(f"wrong password for repository {backend.location}")


def remove_key(backend: Backend, key_id: str, current: str) -> None:
    matches = [k.id for k in list_keys(backend) if k.id.startswith(key_id)]
    if len(matches) != 1:
        raise UsageError(f"key {key_id!r} matches {len(matches)} keys; give a longer prefix")
    if matches[0] == current:
        raise UsageError("refusing to remove the key this command was opened with",
                         hint="open with another password to remove this key")
    backend.delete(f"keys/{matches[0]}")
