"""A backup job whose retention fails after its snapshot is committed: the backup stands.

The real ``keepwell run`` (keepwell.cli.control) on a files source with ``keep_last: 1``; the
second run's local backend fails every snapshot deletion with EIO (a test hook in that process).
The run's snapshot is saved and recorded as a succeeded backup (so it counts for the last
success, and is not retried into another snapshot), the failed step is one line, and the
command exits 3; the next run without the fault applies the retention.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.integration.control_support import Workspace, write_random
from tests.integration.snapshot_edit_faults import hook_env


def fail_snapshot_deletes(module: ModuleType) -> None:
    real_delete = module.LocalBackend.delete

    def delete(self: Any, name: str) -> None:
        if name.startswith("snapshots/"):  # what the backend makes of a disk's failed write
            raise module._classify(OSError(errno.EIO, os.strerror(errno.EIO)),
                                   f"deleting in {self.location}")
        real_delete(self, name)

    module.LocalBackend.delete = delete


def test_a_failed_retention_leaves_the_backup_succeeded(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    ws = Workspace(tmp_path)
    try:
        repo = ws.repository("r")
        data = tmp_path / "data"
        write_random(data / "a", 10_000)
        ws.write_config({
            "repositories": {"r": {"location": str(repo), "password": "env:KW_TEST_PASSWORD"}},
            "sources": {"files": {"kind": "files", "repository": "r", "paths": [str(data)],
                                  "retention": {"keep_last": 1}}},
        })
        ws.cli("run", "files", check=True)
        write_random(data / "b", 10_000)
        with monkeypatch.context() as m:
            for k, v in hook_env("fail_snapshot_deletes", __name__).items():
                m.setenv(k, v)
            r = ws.cli("run", "files")
        assert r.returncode == 3, (r.stdout, r.stderr)
        assert "backup files: succeeded, snapshot" in r.stdout
        lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and "the snapshot is saved, but its retention failed" in lines[0] \
            and "input/output error" in lines[0], r.stderr
        runs = ws.runs("action = 'backup'")
        assert [run["status"] for run in runs] == ["succeeded", "succeeded"], runs
        assert runs[-1]["snapshot_id"]
        assert len(os.listdir(repo / "snapshots")) == 2, "nothing forgotten"
        ok = ws.cli("run", "files")
        assert ok.returncode == 0, ok.stderr
        assert len(os.listdir(repo / "snapshots")) == 1, "the retention applied by the next run"
    finally:
        ws.close()
