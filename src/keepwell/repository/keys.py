"""Key files: the master key wrapped by each password of the repository, and password files.

``keys/<id>`` is plain JSON (it must be readable before anything can be decrypted): who made it,
when, its role (``full``, the default, or ``append``: see keepwell.repository.keyring), the
Argon2id parameters and salt, and what it seals: the master key (full), or the config and the
shared key (append). Its id is the hash of its
bytes, so a *damaged* key file (changed bytes, or not a key file at all) is told apart from a
*wrong password* (the file is whole, but the password does not open it).

A *password file* holds the password on its first line; only a bounded first line is read, so
pointing it at a device or a large file is an error, not a memory blow-up.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from keepwell.backends.base import Backend
from keepwell.crypto import (
    KdfParams,
    MasterKey,
    content_name,
    unwrap_master_key,
    unwrap_secret,
    wrap_master_key,
    wrap_secret,
)
from keepwell.errors import (
    FormatError,
    IntegrityError,
    KeepwellError,
    ObjectNotFoundError,
    RepositoryNotFoundError,
    UsageError,
    WrongPasswordError,
)

PASSWORD_LINE_MAX = 4096  # bytes of a password file's first line, newline excluded


@dataclass(frozen=True)
class KeyInfo:
    id: str
    created: str
    host: str
    username: str
    damaged: bool = False
    role: str = "full"


def read_password_file(path: str, what: str = "password file",
                       error: type[KeepwellError] = UsageError) -> str:
    """The first line of a password file (without its line end), read at most
    `PASSWORD_LINE_MAX` bytes far; ``error`` is raised, naming ``what``, for a file that cannot
    be read, is empty, is not text, or whose first line is longer than that."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror}") from None
    buf = b""
    try:
        while b"\n" not in buf and len(buf) <= PASSWORD_LINE_MAX:
            part = os.read(fd, PASSWORD_LINE_MAX + 1 - len(buf))
            if not part:
                break
            buf += part
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    line, newline, _ = buf.partition(b"\n")
    if not newline and len(line) > PASSWORD_LINE_MAX:
        raise error(f"{what} {path}: the first line is longer than {PASSWORD_LINE_MAX} bytes",
                    hint="give a file whose first line is the password")
    line = line.removesuffix(b"\r")
    if b"\0" in line:
        raise error(f"{what} {path} is not a text file",
                    hint="give a file whose first line is the password")
    try:
        password = line.decode("utf-8")
    except UnicodeDecodeError:
        raise error(f"{what} {path} is not UTF-8 text",
                    hint="give a file whose first line is the password") from None
    if not password:
        raise error(f"{what} {path} is empty" if not buf else f"the first line of {what} {path} is empty")
    return password


def _key_doc(backend: Backend, name: str) -> dict[str, object] | None:
    """A key file's JSON, or None when it is damaged (its bytes no longer hash to its name, or
    it does not parse as a key file)."""
    try:
        data = backend.get(name)
    except ObjectNotFoundError:  # removed since the listing (key remove): not a key any more
        return None
    if content_name(data) != name.split("/", 1)[1]:
        return None
    try:
        doc = json.loads(data)
    except ValueError:
        return None
    if not isinstance(doc, dict) or not all(k in doc for k in ("salt", "sealed", "time_cost")):
        return None
    return doc


APPEND_AAD = b"kw-append-key"


def add_key(backend: Backend, master: MasterKey, password: str, params: KdfParams | None = None,
            *, append_material: bytes | None = None) -> str:
    """A new key file for ``password``: a full key (it wraps ``master``), or, given
    ``append_material`` (keepwell.repository.keyring.append_material), an append key."""
    kdf = params or KdfParams.default()
    doc: dict[str, object] = {
        "created": datetime.now(UTC).isoformat(),
        "host": socket.gethostname(),
        "username": getpass.getuser(),
    }
    if append_material is not None:
        doc["role"] = "append"
        doc.update(wrap_secret(append_material, password, kdf, APPEND_AAD))
    else:
        doc.update(wrap_master_key(master, password, kdf))
    data = json.dumps(doc, indent=1).encode()
    key_id = content_name(data)
    backend.put(f"keys/{key_id}", data)
    return key_id


def list_keys(backend: Backend) -> list[KeyInfo]:
    out = []
    for info in backend.list("keys/"):
        key_id = info.name.split("/", 1)[1]
        doc = _key_doc(backend, info.name)
        if doc is None:
            out.append(KeyInfo(key_id, "", "", "", damaged=True))
            continue
        out.append(KeyInfo(key_id, str(doc.get("created", "")), str(doc.get("host", "")),
                           str(doc.get("username", "")), role=str(doc.get("role", "full"))))
    return sorted(out, key=lambda k: k.created)


def open_with_password(backend: Backend, password: str,
                       opens: Callable[[MasterKey], bool] | None = None) -> tuple[MasterKey | bytes, str]:
    """Try every key file; return the master key (a full key) or the sealed material (bytes:
    an append key), and the id of the key that opened it.

    Damaged key files are skipped; if no whole one opens with the password, the error says
    which files are damaged (their password may be this one). ``opens``: whether a master key
    opens the repository (decrypts its config); a key file the password unlocks but whose
    master key does not is passed over."""
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
        doc = _key_doc(backend, name)
        if doc is None:
            damaged.append(name)
            continue
        try:
            if doc.get("role", "full") == "append":
                return unwrap_secret(doc, password, APPEND_AAD), name.split("/", 1)[1]
            master = unwrap_master_key(doc, password)
        except WrongPasswordError:
            continue
        except (ValueError, KeyError, TypeError):
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
        listed = ", ".join(damaged)
        if len(damaged) == len(names):
            raise FormatError(
                f"key file {listed} of repository {backend.location} is damaged" if len(damaged) == 1
                else f"key files {listed} of repository {backend.location} are damaged",
                hint="restore the keys/ folder from a copy of the repository")
        raise WrongPasswordError(
            f"wrong password for repository {backend.location}, or it is the password of the "
            f"damaged key file {listed}",
            hint="check KEEPWELL_PASSWORD / --password-file, or restore keys/ from a copy")
    raise WrongPasswordError(f"wrong password for repository {backend.location}")


def remove_key(backend: Backend, key_id: str, current: str) -> None:
    if not key_id:  # an empty or unset variable: a prefix of every key
        raise UsageError("an empty key id names no key", hint="list the keys with 'keepwell key list'")
    matches = [k.id for k in list_keys(backend) if k.id.startswith(key_id)]
    if not matches:
        raise UsageError(f"no key has an id that starts with {key_id!r}",
                         hint="list the keys with 'keepwell key list'")
    if len(matches) > 1:
        raise UsageError(f"key {key_id!r} matches {len(matches)} keys; give a longer prefix")
    if matches[0] == current:
        raise UsageError("refusing to remove the key this command was opened with",
                         hint="open with another password to remove this key")
    backend.delete(f"keys/{matches[0]}")
