"""Who a MySQL/MariaDB server is: the identity recorded with every snapshot, and when two
identities are the same server.

An *identity* (`ServerInfo.identity`) holds the flavor, the server id, the server UUID (MySQL's
``@@server_uuid``, kept in its data directory), and ``initialized``: when the data directory
was initialised, read as the oldest creation time of the ``mysql`` schema's tables. MariaDB has
no server UUID, and its server id is configured (often 1 everywhere), so ``initialized`` is what
tells two MariaDB installations apart: Aria and MyISAM keep a table's creation time inside the
table's own files, so it survives restarts, copies, moves and host renames, while two
``mariadb-install-db`` runs give two times. keepwell never writes into the server or its data
directory to mark it.

Two identities are the *same server* when every one of flavor, server id, server UUID and
``initialized`` that both of them know agrees. The host name and the datadir path are recorded
for people to read, not compared: a container gets a new host name when it is recreated on the
same data, and a datadir can move.

A *history* is one server's binary log under one name: the snapshots that record the same
server and the same history number (``history``, 0 unless ``--new-server`` started another).
Binlog file names and positions only mean something within one history. Snapshots written
before keepwell recorded identities carry the server id (and UUID) alone and no history number:
they are compared on what they have and belong to history 0.
"""

from __future__ import annotations

from typing import Any

COMPARED = ("flavor", "server_id", "server_uuid", "initialized")


def same_server(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """True unless a field both identities know differs (see the module)."""
    return all(a.get(k) is None or b.get(k) is None or a.get(k) == b.get(k) for k in COMPARED)


def merge(known: dict[str, Any], more: dict[str, Any]) -> dict[str, Any]:
    """``known`` completed with the fields ``more`` knows and it does not (an older snapshot's
    identity taking what a newer one of the same server records)."""
    out = dict(known)
    for k, v in more.items():
        if out.get(k) is None:
            out[k] = v
    return out


def history_of(identity: dict[str, Any]) -> int:
    return int(identity.get("history") or 0)


def describe_server(identity: dict[str, Any]) -> str:
    """One line for messages: ``server id 1, initialized 2026-..., host db1, /var/lib/mysql/``."""
    parts = [f"server id {identity.get('server_id', '?')}"]
    if identity.get("server_uuid"):
        parts.append(f"uuid {identity['server_uuid']}")
    if identity.get("initialized"):
        parts.append(f"initialized {identity['initialized']}")
    if identity.get("hostname"):
        parts.append(f"host {identity['hostname']}")
    if identity.get("datadir"):
        parts.append(f"datadir {identity['datadir']}")
    return ", ".join(parts)


def differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The compared fields on which two identities disagree, as ``field a -> b``."""
    return [f"{k} {a.get(k)} -> {b.get(k)}" for k in COMPARED
            if a.get(k) is not None and b.get(k) is not None and a.get(k) != b.get(k)]
