"""The suite's rule that a skipped test is a failure (tests/conftest.py), run on a small suite of
its own in a subprocess: a skip inside a test, a skip marker and a module-level skip all fail the
run unless KEEPWELL_ALLOW_SKIP=1."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFTEST = ROOT / "tests" / "conftest.py"

CASES = {
    "test_inside.py": "import pytest\ndef test_x():\n    pytest.skip('no server')\n",
    "test_marker.py": "import pytest\n@pytest.mark.skipif(True, reason='r')\ndef test_x():\n    pass\n",
    "test_module.py": "import pytest\npytest.skip('gone', allow_module_level=True)\n"
                      "def test_x():\n    pass\n",
}


def _run(tmp_path: Path, name: str, allow: bool) -> subprocess.CompletedProcess[str]:
    suite = tmp_path / "suite"
    suite.mkdir()
    shutil.copy(CONFTEST, suite / "conftest.py")
    (suite / name).write_text(CASES[name] + "def test_runs():\n    pass\n")
    env = {k: v for k, v in os.environ.items() if k != "KEEPWELL_ALLOW_SKIP"}
    # the conftest loads the suite's fixture modules (tests.*) as plugins
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    if allow:
        env["KEEPWELL_ALLOW_SKIP"] = "1"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "--rootdir", str(suite), str(suite)],
                          capture_output=True, text=True, env=env, cwd=suite)


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_skip_fails_the_run(tmp_path: Path, name: str) -> None:
    res = _run(tmp_path, name, allow=False)
    assert res.returncode in (1, 2), res.stdout + res.stderr  # failed, or collection error
    assert "counts as a failure" in res.stdout


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_skip_is_allowed_only_on_request(tmp_path: Path, name: str) -> None:
    res = _run(tmp_path, name, allow=True)
    # 5: nothing ran (the whole module was skipped), which pytest does not count as a failure
    assert res.returncode in (0, 5), res.stdout + res.stderr
    assert "skipped" in res.stdout
