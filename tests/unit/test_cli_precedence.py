"""The command line wins over the environment, for every command and wherever the option stands.

Every command of the app that takes ``-r/--repo`` is run (in-process, through typer's runner)
against a real local repository named on the command line, before and after the command, while
``KEEPWELL_REPOSITORY``, ``KEEPWELL_PASSWORD`` and ``KEEPWELL_PASSWORD_FILE`` name something
else. The commands are enumerated from the app, so a new command is covered without a change
here; a command that cannot reach its repository with the arguments below fails the test until
it is given arguments (or, when it needs a database server first, is listed as such).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from keepwell.backends.local import LocalBackend
from keepwell.cli.main import app
from keepwell.errors import RepositoryNotFoundError, UsageError, WrongPasswordError
from keepwell.repository import Repository

CLI_PW = "the command line's password"
ENV_PW = "the environment's password"
SRC_PW = "the source's password"

# commands that talk to a database server before they open the repository
SERVER_FIRST = {("mysql", "backup"), ("postgres", "check")}
# commands that do not open the repository but write its location into what they print
PRINTS_LOCATION = {("postgres", "archive-command")}


def _commands(cmd: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    subs = getattr(cmd, "commands", None)
    if subs is None:
        yield path, cmd
        return
    for name, sub in sorted(subs.items()):
        yield from _commands(sub, (*path, name))


def _with_repo_option() -> list[tuple[str, ...]]:
    root = typer.main.get_command(app)
    return [path for path, cmd in _commands(root)
            if any("--repo" in getattr(p, "opts", ()) for p in cmd.params)]


COMMANDS = _with_repo_option()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    os.environ["KEEPWELL_TESTONLY_WEAK_KDF"] = "1"
    tmp = tmp_path_factory.mktemp("precedence")
    cli_repo, src_repo = tmp / "cli-repo", tmp / "src-repo"
    Repository.init(LocalBackend(str(cli_repo)), CLI_PW).close()
    with Repository.init(LocalBackend(str(src_repo)), SRC_PW) as src, \
            src.new_snapshot("files", ["/d"], host="h") as w:
        w.add_bytes("d/f", b"data")
        w.commit()
    (tmp / "pw").write_text(CLI_PW + "\n")
    (tmp / "env-pw").write_text(ENV_PW + "\n")
    wal = tmp / "000000010000000000000001"
    wal.write_bytes(b"\0" * (16 << 20))
    (tmp / "file").write_text("x")
    return {"tmp": tmp, "cli_repo": str(cli_repo), "src_repo": str(src_repo), "wal": str(wal)}


def _args(path: tuple[str, ...], cmd: Any, w: dict[str, Any]) -> list[str]:
    tmp = w["tmp"]
    given = {
        ("backup",): [str(tmp / "file")],
        ("copy",): ["--from-repo", w["src_repo"]],
        ("diff",): ["latest", "latest"],
        ("mysql", "backup"): ["--logical"],
        ("postgres", "backup"): ["--logical"],
        ("postgres", "forget"): ["--keep-last", "1", "--dry-run"],
        ("postgres", "restore"): ["--target-dir", str(tmp / "pg-target")],
        ("postgres", "wal-upload"): ["--spool", str(tmp / "spool")],
        ("postgres", "wal-push"): [w["wal"]],
        ("rewrite",): ["--exclude", "x"],
        ("tag",): ["--add", "x"],
        ("watch",): [str(tmp)],
    }
    if path in given:
        return given[path]
    args: list[str] = []
    for p in cmd.params:
        if not p.required:
            continue
        if isinstance(p, typer.core.TyperArgument):
            args.append("latest" if "snapshot" in (p.name or "") else str(tmp / "x"))
        else:
            args += [p.opts[0], str(tmp / "target")]
    return args


def _env(tmp: Path) -> dict[str, str | None]:
    return {
        "KEEPWELL_REPOSITORY": str(tmp / "env-repo"),  # does not exist
        "KEEPWELL_PASSWORD": ENV_PW,
        "KEEPWELL_PASSWORD_FILE": str(tmp / "env-pw"),
        "KEEPWELL_FROM_PASSWORD": SRC_PW,
        "KEEPWELL_FROM_PASSWORD_FILE": None,
        "KEEPWELL_NEW_PASSWORD": None,
        "KEEPWELL_CONFIG": None,
        "KEEPWELL_PG_URL": None,
        "KEEPWELL_MYSQL_URL": None,
        # no database server may be reached from here
        "PGHOST": "/nonexistent", "PGPORT": "1", "MYSQL_HOST": "127.0.0.1", "MYSQL_TCP_PORT": "1",
        "HOME": str(tmp),
    }


def test_every_command_is_enumerated() -> None:
    assert {("backup",), ("restore",), ("copy",), ("forget",), ("key", "list"),
            ("sqlite", "restore"), ("postgres", "backup"), ("mysql", "restore")} <= set(COMMANDS)


@pytest.mark.parametrize("before", [True, False], ids=["before", "after"])
@pytest.mark.parametrize("path", [p for p in COMMANDS if p != ("init",)], ids=" ".join)
def test_command_line_beats_environment(path: tuple[str, ...], before: bool, world: dict[str, Any],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[str] = []
    real_open = Repository.open.__func__  # type: ignore[attr-defined]

    def spy(cls: type[Repository], backend: Any, password: str) -> Repository:
        opened.append(backend.location)
        return real_open(cls, backend, password)  # type: ignore[no-any-return]

    monkeypatch.setattr(Repository, "open", classmethod(spy))
    # the WAL uploader serves its spool until two minutes pass without WAL: here it stops once
    # it has opened its repository, which is all this test is about
    monkeypatch.setattr("keepwell.sources.postgres.uploader._run_workers", lambda *a: 0)
    # a watcher watches until it is stopped: here it stops once its repository is open
    monkeypatch.setattr("keepwell.sources.files.watch.Watcher.run", lambda self: None)
    tmp = world["tmp"]
    cmd = dict(_commands(typer.main.get_command(app)))[path]
    given = ["-r", world["cli_repo"], "--password-file", str(tmp / "pw")]
    argv = [*given, *path] if before else [*path, *given]
    res = CliRunner().invoke(app, [*argv, *_args(path, cmd, world)], env=_env(tmp))
    said = f"{res.output} {res.exception!r}"
    assert not isinstance(res.exception, WrongPasswordError | RepositoryNotFoundError), said
    assert "env-repo" not in said and "no repository given" not in said, said
    assert str(tmp / "env-repo") not in opened
    if path in PRINTS_LOCATION:
        assert world["cli_repo"] in res.output
    elif path in SERVER_FIRST:
        assert not opened and "cannot connect" in said, "now reaches its repository: unlist it"
    else:
        assert world["cli_repo"] in opened, f"never opened its repository: {said}"
        assert not os.path.exists(tmp / "env-repo")


@pytest.mark.parametrize("before", [True, False], ids=["before", "after"])
def test_init_creates_what_the_command_line_names(before: bool, tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("pw\n")
    given = ["-r", str(tmp_path / "new"), "--password-file", str(tmp_path / "pw")]
    argv = [*given, "init"] if before else ["init", *given]
    res = CliRunner().invoke(app, argv, env={"KEEPWELL_REPOSITORY": str(tmp_path / "env-repo"),
                                             "KEEPWELL_PASSWORD": "other",
                                             "KEEPWELL_TESTONLY_WEAK_KDF": "1"})
    assert res.exit_code == 0, res.output
    assert not (tmp_path / "env-repo").exists()
    Repository.open(LocalBackend(str(tmp_path / "new")), "pw").close()  # the file's password


def test_repo_before_and_after_must_agree(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["-r", str(tmp_path / "a"), "snapshots", "-r", str(tmp_path / "b")],
                             env={"KEEPWELL_PASSWORD": "x"})
    assert isinstance(res.exception, UsageError)
    assert "given twice" in str(res.exception)


def test_copy_takes_its_destination_from_the_root_option(world: dict[str, Any], tmp_path: Path) -> None:
    """The README's ``keepwell -r DEST copy --from-repo SRC`` with KEEPWELL_REPOSITORY set to
    the source: the destination is the one of -r."""
    dst = tmp_path / "dst"
    Repository.init(LocalBackend(str(dst)), "dst pw").close()
    (tmp_path / "dst-pw").write_text("dst pw\n")
    res = CliRunner().invoke(
        app, ["-r", str(dst), "--password-file", str(tmp_path / "dst-pw"), "copy", "--from-repo",
              world["src_repo"]],
        env={"KEEPWELL_REPOSITORY": world["src_repo"], "KEEPWELL_PASSWORD": SRC_PW,
             "KEEPWELL_FROM_PASSWORD": SRC_PW})
    assert res.exit_code == 0, f"{res.output} {res.exception!r}"
    with Repository.open(LocalBackend(str(dst)), "dst pw") as r:
        assert len(r.list_snapshots()) == 1


def test_from_password_file_beats_from_password(world: dict[str, Any], tmp_path: Path) -> None:
    dst = tmp_path / "dst"
    Repository.init(LocalBackend(str(dst)), "dst pw").close()
    (tmp_path / "wrong").write_text("not it\n")
    res = CliRunner().invoke(
        app, ["-r", str(dst), "copy", "--from-repo", world["src_repo"],
              "--from-password-file", str(tmp_path / "wrong")],
        env={"KEEPWELL_PASSWORD": "dst pw", "KEEPWELL_FROM_PASSWORD": SRC_PW})
    assert isinstance(res.exception, WrongPasswordError), res.output
    assert "source" in str(res.exception)


def test_an_empty_option_does_not_fall_back_to_the_environment(world: dict[str, Any]) -> None:
    env = {"KEEPWELL_REPOSITORY": world["cli_repo"], "KEEPWELL_PASSWORD": CLI_PW}
    res = CliRunner().invoke(app, ["-r", "", "snapshots"], env=env)
    assert isinstance(res.exception, UsageError) and "no repository given" in str(res.exception)
    res = CliRunner().invoke(app, ["--password-file", "", "snapshots"], env=env)
    assert isinstance(res.exception, UsageError) and "password file" in str(res.exception)
