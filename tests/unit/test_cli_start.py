"""The command line builds only the command it runs (`keepwell.cli.main.only_named`): every
command and group, alone, behaves as it does among all of them, and the words that name the
command are found wherever the root options stand."""

from __future__ import annotations

import typer
from typer.testing import CliRunner

from keepwell.cli.main import _VALUED, app, named_command, only_named


def _names() -> list[str]:
    group = typer.main.get_command(app)
    return sorted(group.commands)  # type: ignore[attr-defined]


def test_the_named_command_is_found_past_the_root_options() -> None:
    assert named_command(["backup", "/srv"]) == "backup"
    assert named_command(["-r", "/repo", "--password-file", "pw", "-q", "backup"]) == "backup"
    assert named_command(["--repo=/repo", "--json", "snapshots"]) == "snapshots"
    assert named_command(["--cache-dir", "backup", "check"]) == "check"
    assert named_command(["--limit-upload", "10", "postgres", "backup"]) == "postgres"
    assert named_command(["--help"]) is None
    assert named_command([]) is None
    assert named_command(["--", "backup"]) is None


def test_the_valued_root_options_are_all_known() -> None:
    """A root option that takes a value and is missing from `_VALUED` would make its value
    read as the command's name."""
    root = typer.main.get_command(app)
    valued = {decl for p in root.params
              if isinstance(p, typer.core.TyperOption) and not p.is_flag
              for decl in p.opts + p.secondary_opts}
    assert valued == set(_VALUED)


def test_every_command_alone_is_the_same_command() -> None:
    runner = CliRunner()
    names = _names()
    assert {"backup", "restore", "postgres", "mysql", "fleet", "daemon"} <= set(names)
    for name in names:
        whole = runner.invoke(app, [name, "--help"])
        with only_named(app, [name, "--help"]):
            assert _names() == [name]
            alone = runner.invoke(app, [name, "--help"])
        assert alone.exit_code == whole.exit_code == 0, (name, alone.output)
        assert alone.output == whole.output, name
    assert _names() == names  # every command is back


def test_every_command_of_a_group_alone_is_the_same_command() -> None:
    runner = CliRunner()
    root = typer.main.get_command(app)
    groups = {name: sorted(cmd.commands) for name, cmd in root.commands.items()  # type: ignore[attr-defined]
              if hasattr(cmd, "commands")}
    assert {"postgres", "mysql", "sqlite", "fleet"} <= set(groups)
    for group, subs in groups.items():
        for sub in subs:
            args = ["-q", group, sub, "--help"]
            whole = runner.invoke(app, args)
            with only_named(app, args):
                narrowed = typer.main.get_command(app)
                assert list(narrowed.commands) == [group]  # type: ignore[attr-defined]
                assert list(narrowed.commands[group].commands) == [sub]  # type: ignore[attr-defined]
                alone = runner.invoke(app, args)
            assert alone.exit_code == whole.exit_code == 0, (group, sub, alone.output)
            assert alone.output == whole.output, (group, sub)
        whole = runner.invoke(app, [group, "bakup"])
        with only_named(app, [group, "bakup"]):
            alone = runner.invoke(app, [group, "bakup"])
        assert alone.output == whole.output and alone.exit_code == 2, group
    assert typer.main.get_command(app).commands.keys() == root.commands.keys()  # type: ignore[attr-defined]


def test_a_name_that_is_no_command_keeps_them_all() -> None:
    runner = CliRunner()
    with only_named(app, ["bakup"]):
        result = runner.invoke(app, ["bakup"])
        assert len(app.registered_commands) > 10
    assert result.exit_code == 2
    assert "backup" in result.output  # the suggestion needs every name
