"""MySQL/MariaDB: logical dumps, physical copies, binlog archiving and point-in-time restore.

Snapshot kinds written here (the ``source`` dict of each is interpreted only by `catalog`):

- ``mysql-logical``: ``dump.sql`` (one ``mariadb-dump --single-transaction`` stream),
  ``users.sql`` (accounts and grants) and ``inventory.json`` (its databases and tables),
  consistent at a recorded binlog position/GTID.
- ``mysql-physical``: ``backup.xbstream`` (one ``mariabackup --backup --stream=xbstream``).
- ``mysql-binlog``: ``binlog/<name>`` files, closed ones in batches and the growing current one
  re-stored as it grows (deduplication makes that cheap).

Every snapshot records the identity and history of the server it came from (``source.server``,
see `identity`); a snapshot of another server, or of a binary log that no longer continues the
archived one, is refused under the same name unless ``--new-server`` (`admission`).

Modules: `connection` (settings and sessions), `tools` (the native programs), `binlog` (reading
binlog files), `identity` (who a server is), `admission` (which history a snapshot joins),
`logical`, `physical`, `archive` (binlog push/stream), `catalog` (what the repository holds,
per history), `plan` (choosing a base and a replay range), `dumpfilter` (cutting databases and
tables out of a dump), `restore`, `operations` (the use cases behind the commands).
"""

KIND_LOGICAL = "mysql-logical"
KIND_PHYSICAL = "mysql-physical"
KIND_BINLOG = "mysql-binlog"
BASE_KINDS = (KIND_LOGICAL, KIND_PHYSICAL)
