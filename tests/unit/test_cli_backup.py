"""What ``backup`` says is what it saved, and the options every command shares.

A stream whose producer failed leaves no snapshot (``--stdin-from-command`` sees the exit
status; an empty ``--stdin`` is refused); a missing path among several is a warning and exit 3;
the "N new" line counts single files and streams; ``-q``, ``--json`` and ``--debug`` work on
either side of the command; ``--version``; a single-valued option given twice is refused. The
real ``keepwell`` command runs in a subprocess against a real local repository.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.terminal import run_on_tty

CLI = [sys.executable, "-c", "import sys; from keepwell.cli.main import run; sys.argv[0] = "
                             "'keepwell'; run()"]


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    e = {**os.environ, "KEEPWELL_TESTONLY_WEAK_KDF": "1", "KEEPWELL_PASSWORD": "pw",
         "KEEPWELL_REPOSITORY": str(tmp_path / "repo")}
    subprocess.run([*CLI, "init"], env=e, check=True, capture_output=True)
    return e


def kw(env: dict[str, str], *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*CLI, *args], env=env, capture_output=True, timeout=120, input=stdin)


def text(proc: subprocess.CompletedProcess[bytes]) -> tuple[str, str]:
    return proc.stdout.decode(), proc.stderr.decode()


def snapshots(env: dict[str, str]) -> list[dict[str, object]]:
    proc = kw(env, "snapshots", "--json")
    assert proc.returncode == 0, proc.stderr
    return list(json.loads(proc.stdout))


def test_empty_stdin_is_no_snapshot(env: dict[str, str]) -> None:
    proc = kw(env, "backup", "--stdin", stdin=b"")
    out, err = text(proc)
    assert proc.returncode == 1 and "standard input was empty" in err and "saved" not in out
    assert snapshots(env) == []


def test_stdin_is_counted(env: dict[str, str]) -> None:
    proc = kw(env, "backup", "--stdin", "--stdin-filename", "dump.sql", stdin=b"data" * 1000)
    out, _ = text(proc)
    assert proc.returncode == 0 and "1 new, 0 changed" in out
    (snap,) = snapshots(env)
    assert snap["paths"] == ["dump.sql"] and snap["kind"] == "stdin"


def test_stdin_from_command_keeps_only_a_success(env: dict[str, str], tmp_path: Path) -> None:
    for script, why in (("printf partial; exit 3", "exited with status 3"),
                        ("printf partial; kill -9 $$", "killed by signal SIGKILL")):
        proc = kw(env, "backup", "--stdin-from-command", "--", "sh", "-c", script)
        out, err = text(proc)
        assert proc.returncode == 1, err
        assert why in err and "no snapshot saved" in err and "saved:" not in out
        assert err.count("\n") == 1
    assert snapshots(env) == []
    missing = kw(env, "backup", "--stdin-from-command", "--", str(tmp_path / "no-such-program"))
    assert missing.returncode == 1 and "cannot run" in text(missing)[1]

    proc = kw(env, "backup", "--stdin-from-command", "--stdin-filename", "db/dump.sql", "--tag",
              "db", "--", "sh", "-c", "printf 'line one\\n'; printf 'line two\\n'")
    out, err = text(proc)
    assert proc.returncode == 0, err
    assert "1 new, 0 changed" in out
    (snap,) = snapshots(env)
    assert snap["paths"] == ["db/dump.sql"] and snap["tags"] == ["db"]
    dumped = kw(env, "dump", "latest", "db/dump.sql")
    assert dumped.stdout == b"line one\nline two\n"


def test_stdin_options_that_would_be_ignored_are_refused(env: dict[str, str],
                                                         tmp_path: Path) -> None:
    for args in (["--stdin", str(tmp_path)], ["--stdin", "--stdin-from-command", "--", "true"],
                 [str(tmp_path), "--stdin-filename", "x"],
                 ["--stdin-from-command", "--exclude", "*.log", "--", "true"]):
        proc = kw(env, "backup", *args, stdin=b"data")
        assert proc.returncode == 2, (args, text(proc))
    assert snapshots(env) == []


def test_one_missing_path_is_a_warning_and_a_partial_snapshot(env: dict[str, str],
                                                              tmp_path: Path) -> None:
    (tmp_path / "here").mkdir()
    (tmp_path / "here" / "f").write_text("kept")
    proc = kw(env, "backup", str(tmp_path / "here"), str(tmp_path / "gone"))
    out, err = text(proc)
    assert proc.returncode == 3, err
    assert f"warning: {tmp_path / 'gone'}: no such file or directory" in err
    assert "1 new" in out
    (snap,) = snapshots(env)
    assert snap["paths"] == [str(tmp_path / "here")]
    assert snap["summary"]["errors"] == 1  # type: ignore[index]
    only = kw(env, "backup", str(tmp_path / "gone"))
    assert only.returncode == 2 and len(snapshots(env)) == 1


def test_a_single_file_is_counted(env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "one.txt").write_text("single")
    first, _ = text(kw(env, "backup", str(tmp_path / "one.txt")))
    assert "1 new, 0 changed, 0 unmodified files; 6 B processed" in first
    again, _ = text(kw(env, "backup", str(tmp_path / "one.txt")))
    assert "0 new, 0 changed, 1 unmodified files; 6 B processed" in again
    (tmp_path / "one.txt").write_text("single, changed")
    changed, _ = text(kw(env, "backup", str(tmp_path / "one.txt")))
    assert "0 new, 1 changed, 0 unmodified files" in changed


def test_a_single_valued_option_given_twice_is_refused(env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    for args in (["backup", str(tmp_path / "f"), "--host", "a", "--host", "b"],
                 ["check", "--read-data-subset", "10%", "--read-data-subset", "50%"],
                 ["--limit-upload", "10", "--limit-upload", "20", "snapshots"]):
        proc = kw(env, *args)
        assert proc.returncode == 2 and "given more than once" in text(proc)[1], args
    assert snapshots(env) == []
    both = kw(env, "check", "--read-data", "--read-data-subset", "10%")
    assert both.returncode == 2


def test_json_and_debug_on_either_side(env: dict[str, str]) -> None:
    before = kw(env, "--json", "snapshots")
    after = kw(env, "snapshots", "--json")
    assert before.returncode == after.returncode == 0
    assert json.loads(before.stdout) == json.loads(after.stdout) == []
    refused = kw(env, "--json", "dump", "latest", "x")
    assert refused.returncode == 2 and "no JSON output" in text(refused)[1]
    debug = kw(env, "restore", "ffffffff", "--target", "/nonexistent/t", "--debug")
    assert "Traceback" in text(debug)[1]


def test_version() -> None:
    proc = subprocess.run([*CLI, "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("keepwell ")


def test_quiet_after_the_command(env: dict[str, str], tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for i in range(300):
        (data / f"f{i}").write_bytes(os.urandom(20_000))

    rc, err = run_on_tty(["backup", str(data)], env)
    assert rc == 0 and "backup: 300/300 files" in err, err  # what -q silences
    rc, err = run_on_tty(["backup", str(data), "-q"], env)
    assert rc == 0 and "backup:" not in err, err
    rc, err = run_on_tty(["-q", "backup", str(data)], env)
    assert rc == 0 and "backup:" not in err, err


def test_options_that_would_be_ignored_or_misread(env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    proc = kw(env, "backup", str(tmp_path / "f"), "--tag", "daily,db", "--tag", "x")
    assert proc.returncode == 0, text(proc)
    assert snapshots(env)[0]["tags"] == ["daily", "db", "x"]
    for args in (["forget", "--keep-last", "1", "--grace", "0"],  # --grace is for --prune
                 ["forget", "--keep-tag", "daily,db"],  # would keep nothing: one tag each
                 ["--limit-upload", "-5", "snapshots"]):
        proc = kw(env, *args)
        assert proc.returncode == 2, (args, text(proc))
    assert len(snapshots(env)) == 1
