"""PostgreSQL as a source: logical dumps, physical base backups, WAL archiving and PITR restore.

Words used across this package:

- *cluster*: one PostgreSQL instance (one data directory), known in the repository by a name
  (``--cluster``, default ``main``) and bound to its *system identifier* by its first snapshot.
- *segment*: one WAL file (``000000010000000000000003``), named by timeline, log and segment
  number; *history file*: ``00000002.history``; *partial*: a segment streamed only in part.
- *base backup*: a physical copy taken with ``pg_basebackup``; it is *complete* once every WAL
  segment from its start LSN to its stop LSN is in the repository.
- *PITR window*: the span of time (or LSN) to which a restore can stop, from the oldest complete
  base backup to the last archived WAL with no gap after it.

- *restore point*: a named position in the WAL (``pg_create_restore_point``) that a restore can
  stop at; those made through keepwell are recorded with their LSN.

Snapshot kinds written here: ``postgres-logical``, ``postgres-physical``, ``postgres-wal`` and
``postgres-restore-point``.
"""

from __future__ import annotations

KIND_LOGICAL = "postgres-logical"
KIND_PHYSICAL = "postgres-physical"
KIND_WAL = "postgres-wal"
KIND_RESTORE_POINT = "postgres-restore-point"
KINDS = (KIND_LOGICAL, KIND_PHYSICAL, KIND_WAL, KIND_RESTORE_POINT)
DEFAULT_CLUSTER = "main"
