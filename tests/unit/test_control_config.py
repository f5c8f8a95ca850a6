"""keepwell.yaml validation: models, units, secret references, and errors with file:line:key."""

from __future__ import annotations

from pathlib import Path

import pytest

from keepwell.control.config import load_config, parse_config
from keepwell.control.secrets import resolve
from keepwell.errors import ConfigurationError

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "keepwell.yaml"

MINIMAL = """\
repositories:
  main:
    location: repo
    password: env:KW_PW
sources:
  home:
    kind: files
    repository: main
    paths: [data]
"""


def _error(text: str, tmp_path: Path) -> str:
    path = tmp_path / "keepwell.yaml"
    path.write_text(text)
    with pytest.raises(ConfigurationError) as exc:
        load_config(path)
    return str(exc.value)


def test_the_shipped_example_is_valid() -> None:
    cfg = load_config(EXAMPLE).config
    assert set(cfg.sources) == {"home", "app-sqlite", "orders", "shop"}
    assert cfg.limits.upload == 50 * 1024 * 1024
    assert cfg.sources["orders"].kind == "postgres"
    assert cfg.retries.base == 60.0
    assert cfg.drills["home-weekly"].max_rpo == 26 * 3600


def test_relative_paths_are_taken_from_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "keepwell.yaml").write_text(MINIMAL)
    loaded = load_config(tmp_path / "keepwell.yaml")
    cfg = loaded.config
    assert cfg.repositories["main"].location == str(tmp_path / "repo")
    assert cfg.sources["home"].paths == [str(tmp_path / "data")]  # type: ignore[union-attr]
    assert cfg.history.endswith("keepwell/history.db")


def test_errors_name_file_line_and_key(tmp_path: Path) -> None:
    msg = _error(MINIMAL + "    schedule: '61 * * * *'\nlimits:\n  upload: 10 parsecs\n",
                 tmp_path)
    assert "keepwell.yaml:10: sources.home.schedule: bad cron expression" in msg
    assert "keepwell.yaml:12: limits.upload: expected a size" in msg


def test_inline_secret_is_refused_with_its_line(tmp_path: Path) -> None:
    msg = _error(MINIMAL.replace("env:KW_PW", "hunter2"), tmp_path)
    assert ":4: repositories.main.password: secrets are given by reference" in msg



def test_a_password_written_into_a_repository_location_is_refused(tmp_path: Path) -> None:
    msg = _error(MINIMAL.replace("location: repo", "location: sftp://bob:hunter2@nas/srv/repo"),
                 tmp_path)
    assert ":3: repositories.main.location: do not write the password" in msg
    assert "hunter2" not in msg
    msg = _error(MINIMAL.replace("location: repo",
                                 "location: repo\n    replica: {location: 'sftp://b:pw@nas/r'}"),
                 tmp_path)
    assert "repositories.main.replica.location: do not write the password" in msg
    assert parse_config(MINIMAL.replace("location: repo", "location: sftp://bob@nas:2222/srv"),
                        tmp_path / "k.yaml").repositories["main"].location == \
        "sftp://bob@nas:2222/srv"


def test_a_key_given_twice_is_refused_with_both_lines(tmp_path: Path) -> None:
    msg = _error(MINIMAL + "  home:\n    kind: files\n    repository: main\n    paths: [b]\n",
                 tmp_path)
    assert "keepwell.yaml:10: sources.home: given twice (first on line 6)" in msg
    msg = _error(MINIMAL + "    paths: [b]\n", tmp_path)
    assert "keepwell.yaml:10: sources.home.paths: given twice (first on line 9)" in msg


def test_names_yaml_reads_as_booleans_or_numbers_are_taken_as_written(tmp_path: Path) -> None:
    text = (MINIMAL.replace("  main:", "  off:").replace("repository: main", "repository: off")
            .replace("  home:", "  2024:")
            + "drills:\n  no:\n    source: 2024\n")
    cfg = parse_config(text, tmp_path / "k.yaml")
    assert set(cfg.repositories) == {"off"} and set(cfg.sources) == {"2024"}
    assert cfg.sources["2024"].repository == "off" and cfg.drills["no"].source == "2024"

def test_missing_key_points_at_its_parent(tmp_path: Path) -> None:
    msg = _error(MINIMAL.replace("    paths: [data]\n", ""), tmp_path)
    assert ":6: sources.home.paths: missing required key" in msg


def test_unknown_key_and_unknown_kind(tmp_path: Path) -> None:
    msg = _error(MINIMAL + "    excludez: ['*.tmp']\n", tmp_path)
    assert ":10: sources.home.excludez: Extra inputs are not permitted" in msg
    msg = _error(MINIMAL.replace("kind: files", "kind: nfs"), tmp_path)
    assert ":6: sources.home:" in msg and "'files', 'sqlite', 'postgres', 'mysql'" in msg


def test_references_between_sections_are_checked(tmp_path: Path) -> None:
    msg = _error(MINIMAL.replace("repository: main", "repository: nope"), tmp_path)
    assert ":8: sources.home.repository: unknown repository 'nope'" in msg
    msg = _error(MINIMAL + "drills:\n  d:\n    source: ghost\n", tmp_path)
    assert ":12: drills.d.source: unknown source 'ghost'" in msg


def test_database_source_fields_are_validated(tmp_path: Path) -> None:
    text = MINIMAL + ("  db:\n    kind: postgres\n    repository: main\n    mode: snapshot\n"
                      "    connection: {port: 99999}\n")
    msg = _error(text, tmp_path)
    assert ":13: sources.db.mode:" in msg
    assert ":14: sources.db.connection.port:" in msg


def test_bad_yaml_and_bad_time_zone(tmp_path: Path) -> None:
    assert ":3: not valid YAML" in _error("repositories:\n  main: {location: x\n", tmp_path)
    msg = _error("timezone: Mars/Olympus\n" + MINIMAL, tmp_path)
    assert ":1: timezone: unknown time zone 'Mars/Olympus'" in msg


def test_missing_file_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="cannot read configuration"):
        load_config(tmp_path / "nope.yaml")


def test_history_locations(tmp_path: Path) -> None:
    cfg = parse_config("history: postgresql://kw@h:5432/db\nhistory_password: env:KW_H\n"
                       + MINIMAL, tmp_path / "k.yaml")
    assert cfg.history == "postgresql://kw@h:5432/db" and cfg.history_password == "env:KW_H"
    assert parse_config("history: env:KW_HIST_URL\n" + MINIMAL,
                        tmp_path / "k.yaml").history == "env:KW_HIST_URL"
    assert parse_config("history: state/h.db\n" + MINIMAL,
                        tmp_path / "k.yaml").history == str(tmp_path / "state" / "h.db")
    with pytest.raises(ConfigurationError, match=r"k.yaml:1: history: do not write the password"):
        parse_config("history: postgresql://kw:pw@h/db\n" + MINIMAL, tmp_path / "k.yaml")
    with pytest.raises(ConfigurationError, match="a SQLite file path or a postgresql:// URL"):
        parse_config("history: mysql://h/db\n" + MINIMAL, tmp_path / "k.yaml")
    with pytest.raises(ConfigurationError, match="history_password: secrets are given by"):
        parse_config("history: postgresql://kw@h/db\nhistory_password: pw\n" + MINIMAL,
                     tmp_path / "k.yaml")


def test_drill_settings(tmp_path: Path) -> None:
    text = MINIMAL + ("drills:\n  d1:\n    source: home\n    run_as: postgres\n"
                      "    tables: [public.items, other]\n  d2:\n    source: home\n"
                      "    tables: {items: 1000}\n    amcheck: false\n")
    cfg = parse_config(text, tmp_path / "k.yaml")
    assert cfg.drills["d1"].tables == {"public.items": 0, "other": 0}
    assert cfg.drills["d1"].run_as == "postgres" and cfg.drills["d1"].amcheck
    assert cfg.drills["d2"].tables == {"items": 1000} and not cfg.drills["d2"].amcheck
    with pytest.raises(ConfigurationError, match="drills.d2.tables.items"):
        parse_config(text.replace("1000", "-1"), tmp_path / "k.yaml")


def test_secret_references_resolve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KW_SECRET", "s3cret")
    assert resolve("env:KW_SECRET") == "s3cret"
    (tmp_path / "pw").write_text("from-file\nsecond line\n")
    assert resolve(f"file:{tmp_path / 'pw'}") == "from-file"
    monkeypatch.delenv("KW_SECRET")
    with pytest.raises(ConfigurationError, match="KW_SECRET is not set"):
        resolve("env:KW_SECRET")
    with pytest.raises(ConfigurationError, match="cannot read"):
        resolve(f"file:{tmp_path / 'absent'}")
    monkeypatch.setenv("KW_SECRET", "")  # as an empty first line of a file: refused
    with pytest.raises(ConfigurationError, match="KW_SECRET is empty"):
        resolve("env:KW_SECRET")


def test_the_continuous_source_of_the_docs_is_valid(tmp_path: Path) -> None:
    """docs/continuous.md's example: a files source in mode continuous, with thinning retention."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "continuous.md").read_text()
    yaml_block = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    doc = ("repositories:\n  nas: {location: /tmp/r, password: 'env:PW'}\n" + yaml_block)
    src = parse_config(doc, tmp_path / "keepwell.yaml").sources["share"]
    assert src.kind == "files" and src.mode == "continuous"  # type: ignore[union-attr]
    assert src.max_delay == 1.0 and src.quiet_time == 0.2  # type: ignore[union-attr]
    with pytest.raises(ConfigurationError, match="mode"):
        parse_config(doc.replace("mode: continuous", "mode: always"), tmp_path / "keepwell.yaml")


def test_resource_limits_of_a_source_win_over_its_kinds(tmp_path: Path) -> None:
    from keepwell.control.jobs import build_job

    text = MINIMAL.replace("    paths: [data]\n", """\
    paths: [data]
    limits: {memory: 256M, io: {write: 5M}}
limits:
  cgroup_root: /cg
  by_kind:
    files: {cpu: 0.5, memory: 1G, nice: 5, io: {read: 20M}}
""")
    cfg = parse_config(text, tmp_path / "keepwell.yaml")
    spec = build_job(cfg, "backup", "home", 0.0)
    assert spec.resources is not None
    assert spec.resources["cpu"] == 0.5 and spec.resources["nice"] == 5
    assert spec.resources["memory"] == 256 * 1024 * 1024
    assert spec.resources["io"] == {"read": 20 * 1024 * 1024, "write": 5 * 1024 * 1024}
    assert spec.resources["cgroup_root"] == "/cg"
    assert spec.resources["paths"][0].endswith("data")
    assert build_job(cfg, "drill", "home", 0.0).resources is None  # no drill limits


def test_resource_limits_are_checked(tmp_path: Path) -> None:
    bad = MINIMAL + "    limits: {cpu: 0}\n"
    assert "cpu" in _error(bad, tmp_path)
    bad = MINIMAL + "    limits: {ionice: low}\n"
    assert "ionice" in _error(bad, tmp_path)
