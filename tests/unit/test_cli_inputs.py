"""Bad or surprising input gets one clear line and the documented exit code, never a guess.

Each test runs the real ``keepwell`` command in a subprocess against real local repositories:
a snapshot name with a suffix, init into a directory holding other files, password files that
are devices, binary or huge, a damaged key file, optional packages that are not installed, S3
without credentials; and the job history's file mode.
"""

from __future__ import annotations

import os
import resource
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

from keepwell.backends.local import LocalBackend
from keepwell.repository import Repository

CLI = "import sys; from keepwell.cli.main import run; sys.argv[0] = 'keepwell'; run()"


def kw(*args: str, env: Mapping[str, str | None] | None = None, prelude: str = "",
       limit_memory: bool = False, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    merged: dict[str, str | None] = {**os.environ, "KEEPWELL_TESTONLY_WEAK_KDF": "1", **(env or {})}
    full = {k: v for k, v in merged.items() if v is not None}

    def cap() -> None:  # so a read without bound fails at once instead of eating the machine
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    return subprocess.run([sys.executable, "-c", prelude + CLI, *args], env=full,
                          capture_output=True, text=True, timeout=120, cwd=cwd,
                          preexec_fn=cap if limit_memory else None)


def one_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "internal error" not in proc.stderr, proc.stderr
    return lines[0]


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("KEEPWELL_TESTONLY_WEAK_KDF", "1")
    location = str(tmp_path / "repo")
    with Repository.init(LocalBackend(location), "pw") as r, r.new_snapshot("files", ["/d"]) as w:
        w.add_bytes("d/f", b"content")
        w.commit()
    return location


def test_latest_with_a_suffix_is_not_latest(repo: str, tmp_path: Path) -> None:
    proc = kw("-r", repo, "restore", "latestXYZ", "--target", str(tmp_path / "t"),
              env={"KEEPWELL_PASSWORD": "pw"})
    assert proc.returncode == 2
    assert "'latestXYZ' is not a snapshot id" in one_line(proc)
    assert not (tmp_path / "t").exists()
    assert kw("-r", repo, "restore", "latest", "--target", str(tmp_path / "t"),
              env={"KEEPWELL_PASSWORD": "pw"}).returncode == 0


def test_an_empty_path_is_not_the_current_directory(repo: str, tmp_path: Path) -> None:
    """``keepwell backup "$DIR"`` or ``restore --target "$DIR"`` with DIR empty or unset names
    nothing: it is refused, never taken for the current directory (which the backup would save
    and the restore would write into)."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "mine.txt").write_text("mine")
    env = {"KEEPWELL_PASSWORD": "pw"}
    for args in (["backup", ""], ["backup", "", str(work)],
                 ["restore", "latest", "--target", ""],
                 ["restore", "latest", "--target", "", "--overwrite"]):
        proc = kw("-r", repo, *args, env=env, cwd=work)
        assert proc.returncode == 2, (args, proc.stderr)
        assert "empty" in one_line(proc), args
    assert sorted(os.listdir(work)) == ["mine.txt"]
    with Repository.open(LocalBackend(repo), "pw") as r:
        assert len(r.list_snapshots()) == 1


@pytest.mark.parametrize("args", [
    ["backup", "--stdin", "--stdin-filename", ""],
    ["backup", "{work}", "--host", ""],
    ["backup", "{work}", "--tag", ""],
    ["backup", "{work}", "--tag", "daily,"],
    ["backup", "{work}", "--exclude", ""],
    ["backup", "{work}", "--iexclude", ""],
    ["backup", "{work}", "--parent", ""],
    ["dump", "latest", ""],
    ["ls", "latest", ""],
    ["log", ""],
    ["find", ""],
    ["find", "f", "--newest", ""],
    ["restore", "latest", "--target", "{out}", "--include", ""],
    ["restore", "latest", "--target", "{out}", "--exclude", ""],
    ["rewrite", "--exclude", ""],
    ["snapshots", "--host", ""],
    ["snapshots", "--path", ""],
    ["ls", "latest", "--kind", ""],
    ["forget", "--keep-last", "1", "--host", ""],
    ["forget", "--keep-tag", ""],
    ["forget", "--keep-last", "1", "--keep-within", ""],
    ["tag", "--add", ""],
    ["prune", "--max-repack-size", ""],
    ["key", "remove", ""],
    ["init", "--copy-chunker-params-from", ""],
    ["sqlite", "backup", "{work}/db", "--host", ""],
    ["sqlite", "backup", "{work}/db", "--tag", ""],
])
def test_options_that_name_nothing_are_refused(repo: str, tmp_path: Path, args: list[str]) -> None:
    """An option or argument given an empty value (an empty or unset variable) is refused with
    one line and exit code 2: never read as its default (the machine's host name, the file name
    'stdin', the whole snapshot) nor as a pattern or filter that matches everything or nothing."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "f").write_text("data")
    sqlite3.connect(work / "db").close()
    out = tmp_path / "out"
    given = [a.format(work=work, out=out) for a in args]
    proc = kw("-r", repo, *given, env={"KEEPWELL_PASSWORD": "pw", "KEEPWELL_NEW_PASSWORD": "pw2"},
              cwd=work)
    assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
    line = one_line(proc)
    assert "empty" in line or "got ''" in line, args
    assert not out.exists()
    with Repository.open(LocalBackend(repo), "pw") as r:
        assert [s.tags for s in r.list_snapshots()] == [[]]


def test_key_remove_of_an_unknown_id_says_none_has_it(repo: str) -> None:
    proc = kw("-r", repo, "key", "remove", "deadbeef", env={"KEEPWELL_PASSWORD": "pw"})
    assert proc.returncode == 2
    line = one_line(proc)
    assert "no key" in line and "deadbeef" in line and "key list" in line
    assert "longer prefix" not in line


def test_a_restore_target_that_cannot_be_a_directory(repo: str, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("a file")
    env = {"KEEPWELL_PASSWORD": "pw"}
    for target in (tmp_path / "file" / "below", tmp_path / "file"):
        for extra in ([], ["--overwrite"]):
            proc = kw("-r", repo, "restore", "latest", "--target", str(target), *extra, env=env)
            assert proc.returncode == 1, proc.stderr
            line = one_line(proc)
            assert str(target) in line and "not a directory" in line.lower()
            assert "--overwrite" not in line  # it would not help
    assert (tmp_path / "file").read_text() == "a file"


def test_a_repository_location_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("a file")
    env = {"KEEPWELL_PASSWORD": "pw"}
    for location in (tmp_path / "file", tmp_path / "file" / "repo"):
        proc = kw("-r", str(location), "snapshots", env=env)
        assert proc.returncode == 10, proc.stderr
        assert f"no repository at {location}" in one_line(proc)
        proc = kw("-r", str(location), "init", env=env)
        assert proc.returncode == 1, proc.stderr
        line = one_line(proc)
        assert "not a directory" in line and "network" not in line
    assert (tmp_path / "file").read_text() == "a file"


@pytest.mark.parametrize("option", [["--max-unused", "5%"], ["--max-unused", "10%"],
                                    ["--grace", "1h"], ["--grace", "0"]])
def test_forget_prune_options_need_prune(repo: str, option: list[str]) -> None:
    """Without --prune they would do nothing: refused, even when they say what the default
    says."""
    proc = kw("-r", repo, "forget", "--keep-last", "1", *option, env={"KEEPWELL_PASSWORD": "pw"})
    assert proc.returncode == 2, proc.stderr
    assert "are for --prune" in one_line(proc)


def test_init_refuses_a_directory_that_holds_other_files(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("mine")
    env = {"KEEPWELL_PASSWORD": "pw"}
    proc = kw("-r", str(home), "init", env=env)
    assert proc.returncode == 2
    assert "is not empty and is not a repository" in one_line(proc)
    assert sorted(os.listdir(home)) == ["notes.txt"]
    assert kw("-r", str(home), "init", "--allow-non-empty", env=env).returncode == 0
    Repository.open(LocalBackend(str(home)), "pw").close()
    again = kw("-r", str(home), "init", "--allow-non-empty", env=env)
    assert again.returncode == 1 and "already exists" in one_line(again)
    assert kw("-r", str(tmp_path / "fresh"), "init", env=env).returncode == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    assert kw("-r", str(empty), "init", env=env).returncode == 0


def test_password_file_that_never_ends_is_refused(repo: str) -> None:
    proc = kw("-r", repo, "--password-file", "/dev/zero", "snapshots",
              env={"KEEPWELL_PASSWORD": None}, limit_memory=True)
    assert proc.returncode == 2
    assert "first line is longer than 4096 bytes" in one_line(proc)


@pytest.mark.parametrize("content", [b"\xff\xfe\xfd secret\n", b"pw\x00\x01\x02\n", b"\n\n"],
                         ids=["not-utf8", "binary", "empty-line"])
def test_password_file_that_is_not_a_password(repo: str, tmp_path: Path, content: bytes) -> None:
    (tmp_path / "pw.bin").write_bytes(content)
    proc = kw("-r", repo, "--password-file", str(tmp_path / "pw.bin"), "snapshots",
              env={"KEEPWELL_PASSWORD": None})
    assert proc.returncode == 2
    assert str(tmp_path / "pw.bin") in one_line(proc)


def test_password_file_first_line_is_the_password(repo: str, tmp_path: Path) -> None:
    (tmp_path / "pw").write_bytes(b"pw\r\nsecond line\n")
    proc = kw("-r", repo, "--password-file", str(tmp_path / "pw"), "snapshots",
              env={"KEEPWELL_PASSWORD": None})
    assert proc.returncode == 0, proc.stderr


def test_a_damaged_key_file_is_not_a_wrong_password(repo: str) -> None:
    keys = Path(repo) / "keys"
    (key,) = keys.iterdir()
    data = bytearray(key.read_bytes())
    data[len(data) // 2] ^= 0x20
    key.write_bytes(bytes(data))
    proc = kw("-r", repo, "snapshots", env={"KEEPWELL_PASSWORD": "pw"})
    assert proc.returncode == 1
    line = one_line(proc)
    assert f"key file keys/{key.name}" in line and "is damaged" in line
    assert "wrong password" not in line


def test_wrong_password_beside_a_damaged_key_says_both(repo: str) -> None:
    from keepwell.repository.keys import add_key

    with Repository.open(LocalBackend(repo), "pw") as r:
        second = add_key(r.backend, r.master, "second")
    (Path(repo) / "keys" / second).write_bytes(b"{not json")
    wrong = kw("-r", repo, "snapshots", env={"KEEPWELL_PASSWORD": "neither"})
    assert wrong.returncode == 12
    assert "wrong password" in one_line(wrong) and f"keys/{second}" in wrong.stderr
    assert kw("-r", repo, "snapshots", env={"KEEPWELL_PASSWORD": "pw"}).returncode == 0
    listing = kw("-r", repo, "key", "list", env={"KEEPWELL_PASSWORD": "pw"})
    assert listing.returncode == 0 and "DAMAGED" in listing.stdout


def test_job_history_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    from keepwell.control.history import History

    old = os.umask(0o022)
    try:
        h = History(str(tmp_path / "state" / "history.db"))
        h.close()
    finally:
        os.umask(old)
    for name in os.listdir(tmp_path / "state"):
        mode = stat.S_IMODE(os.stat(tmp_path / "state" / name).st_mode)
        assert mode & 0o077 == 0, f"{name} is {oct(mode)}"


# -- optional packages ----------------------------------------------------------------------------
def _without(module: str) -> str:
    """A prelude that makes importing ``module`` fail, as when its extra is not installed."""
    return f"import sys; sys.modules[{module!r}] = None\n"


@pytest.mark.parametrize(("module", "extra", "args"), [
    ("obstore", "s3", ["-r", "s3://bucket/repo", "snapshots"]),
    ("paramiko", "sftp", ["-r", "sftp://user@host/repo", "snapshots"]),
    ("psycopg", "postgres", ["postgres", "backup", "--logical"]),
    ("pymysql", "mysql", ["mysql", "backup", "--logical"]),
    ("yaml", "control", ["config", "check", "--config", "keepwell.yaml"]),
    ("pydantic", "control", ["config", "check", "--config", "keepwell.yaml"]),
    ("cronsim", "control", ["status", "--config", "keepwell.yaml"]),
], ids=["s3", "sftp", "postgres", "mysql", "control-yaml", "control-pydantic", "control-cronsim"])
def test_a_missing_extra_names_what_to_install(module: str, extra: str, args: list[str],
                                               repo: str, tmp_path: Path) -> None:
    (tmp_path / "keepwell.yaml").write_text("sources: {}\n")
    args = [str(tmp_path / a) if a == "keepwell.yaml" else a for a in args]
    if args[0] != "-r":
        args = ["-r", repo, *args]
    proc = kw(*args, env={"KEEPWELL_PASSWORD": "pw", "PGHOST": "/nonexistent",
                          "MYSQL_HOST": "127.0.0.1", "MYSQL_TCP_PORT": "1"},
              prelude=_without(module))
    assert proc.returncode == 1
    assert f"pip install 'keepwell[{extra}]'" in one_line(proc)


def test_s3_without_credentials_says_so(tmp_path: Path) -> None:
    clean: dict[str, str | None] = {k: None for k in os.environ if k.startswith("AWS_")}
    for endpoint in ({"AWS_ENDPOINT_URL": "http://127.0.0.1:1"},  # an S3-compatible server
                     {"AWS_METADATA_ENDPOINT": "http://127.0.0.1:1"}):  # AWS, off EC2
        proc = kw("-r", "s3://bucket/repo", "snapshots",
                  env={**clean, **endpoint, "KEEPWELL_PASSWORD": "pw",
                       "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
                       "AWS_CONFIG_FILE": str(tmp_path / "none"),
                       "XDG_CACHE_HOME": str(tmp_path / "cache")})
        line = one_line(proc)
        assert proc.returncode != 0
        assert "no S3 credentials" in line and "AWS_ACCESS_KEY_ID" in line
        assert "169.254" not in line and "latest/api" not in line


@pytest.mark.parametrize("args, what", [
    (["postgres", "restore", "--start", "--port", "99999"], "--port"),
    (["postgres", "restore", "--start", "--port", "-1"], "--port"),
    (["mysql", "restore", "--start", "--port", "70000"], "--port"),
    (["postgres", "restore", "--target-name", ""], "--target-name"),
    (["postgres", "restore", "--target-name", "n" * 64], "--target-name"),
    (["postgres", "restore", "--port", "5433"], "--port is the port --start"),
    (["mysql", "restore", "--port", "3307"], "--port is the port --start"),
], ids=["pg-port-high", "pg-port-negative", "mysql-port", "pg-empty-name", "pg-long-name",
        "pg-port-without-start", "mysql-port-without-start"])
def test_database_restore_refuses_a_port_or_restore_point_name_that_cannot_be(
        repo: str, tmp_path: Path, args: list[str], what: str) -> None:
    """An empty recovery_target_name is no target at all to PostgreSQL: the restore would go
    to the end of the WAL and call that the restore point."""
    target = tmp_path / "t"
    proc = kw("-r", repo, *args, "--target-dir", str(target), env={"KEEPWELL_PASSWORD": "pw"})
    assert proc.returncode == 2, proc.stderr
    assert what in proc.stderr and "internal error" not in proc.stderr, proc.stderr
    assert not target.exists()
