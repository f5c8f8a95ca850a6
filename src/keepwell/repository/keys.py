"""Key files: the master key wrapped by each password of the repository.

``keys/<id>`` is plain JSON (it must be readable before anything can be decrypted): who made it,
when, the Argon2id parameters and salt, and the sealed master key.
"""

from __future__ import annotations

import getpass
import json
import socket
from dataclasses import dataclass
from datetime import UTC, datetime

from keepwell.backends.base import Backend
from keepwell.crypto import KdfParams, MasterKey, content_name, unwrap_master_key, wrap_master_key
from keepwell.errors import (
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
        doc = json.loads(backend.get(info.name))
        out.append(KeyInfo(info.name.split("/", 1)[1], doc.get("created", ""), doc.get("host", ""),
                           doc.get("username", "")))
    return sorted(out, key=lambda k: k.created)


def open_with_password(backend: Backend, password: str) -> tuple[MasterKey, str]:
    """Try every key file; return the master key and the id of the key that opened it."""
    names = [i.name for i in backend.list("keys/")]
    if not names:
        try:
            backend.stat("config")
        except ObjectNotFoundError:
            raise RepositoryNotFoundError(f"no repository at {backend.location}") from None
        raise KeepwellError(f"repository at {backend.location} has no key files",
                            hint="restore the keys/ folder from a copy")
    for name in names:
        try:
            doc = json.loads(backend.get(name))
            return unwrap_master_key(doc, password), name.split("/", 1)[1]
        except WrongPasswordError:
            continue
        except (ValueError, KeyError):
            continue
    raise WrongPasswordError(f"wrong password for repository {backend.location}")


def remove_key(backend: Backend, key_id: str, current: str) -> None:
    matches = [k.id for k in list_keys(backend) if k.id.startswith(key_id)]
    if len(matches) != 1:
        raise UsageError(f"key {key_id!r} matches {len(matches)} keys; give a longer prefix")
    if matches[0] == current:
        raise UsageError("refusing to remove the key this command was opened with",
                         hint="open with another password to remove this key")
    backend.delete(f"keys/{matches[0]}")
