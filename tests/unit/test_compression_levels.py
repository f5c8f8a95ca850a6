"""Which zstd level a snapshot's data gets: the repository's level unless the writer asks for
another (database sources ask for the repository's database level); both kept in the config."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from keepwell.backends.memory import MemoryBackend
from keepwell.repository import Repository
from keepwell.repository.format import pack_object_name

os.environ.setdefault("KEEPWELL_TESTONLY_WEAK_KDF", "1")

TEXT = b"".join(b"line %d of a very compressible text\n" % (i % 50) for i in range(40_000))


def _codec_of_data(repo: Repository, kind: str, level: int | None = None) -> int:
    with repo.new_snapshot(kind, ["x"], compression=level) as w:
        w.add_bytes("x", kind.encode() + TEXT)  # one blob per kind: no deduplication between them
        snap = w.commit()
    (blob,) = repo.find_node(snap, "x").content
    loc = repo.locate(blob)
    assert loc is not None
    stored = repo.backend.get(pack_object_name(loc.pack_type, loc.pack.hex()), loc.offset,
                              loc.length)
    return repo.master.decrypt_blob(blob, loc.type, stored)[0]


def test_writers_use_the_level_asked_for() -> None:
    repo = Repository.init(MemoryBackend(), "pw", compression=3, db_compression=0)
    assert _codec_of_data(repo, "postgres-physical", repo.db_compression) == 0  # 0 is "none"
    assert _codec_of_data(repo, "files") == 1  # zstd at the repository's level
    repo2 = Repository.init(MemoryBackend(), "pw", compression=0, db_compression=1)
    assert _codec_of_data(repo2, "mysql-logical", repo2.db_compression) == 1
    assert _codec_of_data(repo2, "postgres-wal") == 0
    again = Repository.open(repo2.backend, "pw")
    assert (again.compression, again.db_compression) == (0, 1)


def test_init_takes_levels(tmp_path: Path) -> None:
    env = dict(os.environ, KEEPWELL_PASSWORD="pw", KEEPWELL_TESTONLY_WEAK_KDF="1")
    cli = [sys.executable, "-c", "import sys; from keepwell.cli.main import run; sys.exit(run())",
           "-r", str(tmp_path / "r"), "init"]
    done = subprocess.run([*cli, "--compression", "7", "--db-compression", "2"], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    from keepwell.backends.local import LocalBackend

    repo = Repository.open(LocalBackend(str(tmp_path / "r")), "pw")
    assert (repo.compression, repo.db_compression) == (7, 2)
    bad = subprocess.run([*cli[:-2], str(tmp_path / "s"), "init", "--compression", "40"],
                         env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
