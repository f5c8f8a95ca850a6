"""MySQL/MariaDB: logical dumps, physical copies, binlog archiving and point-in-time restore.

Snapshot kinds written here (the ``source`` dict of each is interpreted only by `catalog`):

- ``mysql-logical``: ``dump.sql`` (one ``mariadb-dump --single-transaction`` stream) and
  ``users.sql`` (accounts and grants), consistent at a recorded binlog position/GTID.
- ``mysql-physical``: ``backup.xbstream`` (one ``mariabackup --backup --stream=xbstream``).
- ``mysql-binlog``: ``binlog/<name>`` files, closed ones in batches and the growing current one
  re-stored as it grows (deduplication makes that cheap).

Modules: `connection` (settings and sessions), `tools` (the native programs), `binlog` (reading
binlog files), `logical`, `physical`, `archive` (binlog push/stream), `catalog` (what the
repository holds), `plan` (choosing a base and a replay range), `restore`.
"""

KIND_LOGICAL = "mysql-logical"
KIND_PHYSICAL = "mysql-physical"
KIND_BINLOG = "mysql-binlog"
BASE_KINDS = (KIND_LOGICAL, KIND_PHYSICAL)
