"""``keepwell copy`` and ``init --copy-chunker-params-from`` through the command line, against
real S3 (SeaweedFS) and SFTP (OpenSSH) servers and local repositories.

The chain local → S3 → SFTP → local takes both paths (S3 and the last local repository are
made with their own keys: re-chunked; SFTP shares S3's chunker parameters: blobs copied as they
are); every hop is checked with ``check --read-data``, and the last is restored and compared
byte for byte with the original tree. Copying again copies nothing; a copy killed with SIGKILL
is completed by the next run, which reuses what arrived; the filters pick the right snapshots;
a wrong source password is one line and exit code 12.
"""

# ruff: noqa: F811

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from keepwell.backends.memory import MemoryBackend
from keepwell.repository import Repository
from keepwell.repository.check import check
from keepwell.repository.copy import (
    copy_snapshots,
    init_like,
    select_snapshots,
)
from keepwell.repository.snapshot import SnapshotFilter
from tests.trees import make_tree, tree_contents

pytestmark = pytest.mark.integration

KW = [sys.executable, "-m", "keepwell.cli.main"]
SRC_PW = "source password"
DST_PW = "destination password"


@pytest.fixture(autouse=True)
def weak_kdf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KEEPWELL_TESTONLY_WEAK_KDF", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for var in ("KEEPWELL_PASSWORD", "KEEPWELL_PASSWORD_FILE", "KEEPWELL_REPOSITORY",
                "KEEPWELL_FROM_PASSWORD", "KEEPWELL_FROM_PASSWORD_FILE", "KEEPWELL_FROM_REPOSITORY"):
        monkeypatch.delenv(var, raising=False)


def kw(*args: str, pw: str = DST_PW, from_pw: str | None = SRC_PW, check_rc: bool = True,
       timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KEEPWELL_PASSWORD": pw}
    if from_pw is not None:
        env["KEEPWELL_FROM_PASSWORD"] = from_pw
    proc = subprocess.run([*KW, *args], env=env, capture_output=True, text=True, timeout=timeout)
    if check_rc:
        assert proc.returncode == 0, f"keepwell {' '.join(args)}: rc {proc.returncode}\n{proc.stderr}"
    return proc


def kw_json(*args: str, **kwargs: Any) -> Any:
    return json.loads(kw(*args, "--json", **kwargs).stdout)


def make_copy_tree(root: Path) -> None:
    make_tree(root, notes=40, parts=5, repeat=40, random_mib=20, seed=7)
    (root / "db").mkdir()
    (root / "db/dump.sql").write_bytes(b"INSERT INTO t VALUES (1, 'x');\n" * 150_000)
    (root / "media/copy-of-random.bin").write_bytes((root / "media/random.bin").read_bytes())


def snapshots(location: str, pw: str = DST_PW) -> list[dict[str, Any]]:
    return list(kw_json("-r", location, "snapshots", pw=pw, from_pw=None))


def read_check(location: str, pw: str = DST_PW) -> None:
    proc = kw("-r", location, "check", "--read-data", pw=pw, from_pw=None, check_rc=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no errors were found" in proc.stdout


def object_names(location: str) -> set[str]:
    from keepwell.backends.registry import open_backend

    b = open_backend(location)
    try:
        return {i.name for i in b.list("") if not i.name.startswith("sessions/")}
    finally:
        b.close()


# --- the chain local → S3 → SFTP → local -----------------------------------------------------------


def test_copy_chain_local_s3_sftp_local(s3_url: str, sftp_url: str, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    make_copy_tree(data)
    local = str(tmp_path / "local")
    kw("-r", local, "init", pw=SRC_PW, from_pw=None)
    kw("-r", local, "backup", str(data), "--tag", "first", pw=SRC_PW, from_pw=None)
    (data / "docs/part-1/changed.txt").write_bytes(b"changed after the first backup\n")
    kw("-r", local, "backup", str(data), pw=SRC_PW, from_pw=None)
    originals = snapshots(local, SRC_PW)
    assert len(originals) == 2

    # local → S3: keys of its own, so content is re-chunked and trees rewritten
    kw("-r", s3_url, "init", from_pw=None)
    rep = kw_json("-r", s3_url, "copy", "--from-repo", local)
    assert rep["mode"] == "rechunk"
    assert [c["source"] for c in rep["copied"]] == [s["id"] for s in originals]
    assert rep["blobs_new"] > 0 and rep["packs"] >= 2
    read_check(s3_url)
    on_s3 = snapshots(s3_url)
    for orig, copy in zip(originals, on_s3, strict=True):
        assert copy["source"]["copied_from"] == orig["id"]
        for key in ("time", "host", "tags", "paths", "kind", "summary"):
            assert copy[key] == orig[key], key
        assert copy["tree"] != orig["tree"]  # different id keys: every tree was rewritten
    if originals[1]["parent"] == originals[0]["id"]:
        assert on_s3[1]["parent"] == on_s3[0]["id"]

    # Copying again copies nothing: no new blob, pack or object at all.
    before = object_names(s3_url)
    again = kw_json("-r", s3_url, "copy", "--from-repo", local)
    assert again["copied"] == [] and len(again["skipped"]) == 2
    assert again["blobs_new"] == 0 and again["packs"] == 0 and again["bytes_read"] == 0
    assert object_names(s3_url) == before

    # S3 → SFTP with shared chunker parameters: blobs copied as they are, trees keep their ids
    init = kw("-r", sftp_url, "init", "--copy-chunker-params-from", s3_url, pw=DST_PW, from_pw=DST_PW)
    assert "chunker parameters of" in init.stdout
    rep = kw_json("-r", sftp_url, "copy", "--from-repo", s3_url, from_pw=DST_PW)
    assert rep["mode"] == "fast"
    read_check(sftp_url)
    on_sftp = snapshots(sftp_url)
    assert [s["tree"] for s in on_sftp] == [s["tree"] for s in on_s3]
    # a copy of a copy still names the original
    assert [s["source"]["copied_from"] for s in on_sftp] == [s["id"] for s in originals]
    # the fast path stores every blob once: the same blob count as S3 holds
    s3_blobs = kw_json("-r", s3_url, "stats", "--mode", "raw-data", from_pw=None)["blobs"]
    sftp_blobs = kw_json("-r", sftp_url, "stats", "--mode", "raw-data", from_pw=None)["blobs"]
    assert s3_blobs == sftp_blobs
    again = kw_json("-r", sftp_url, "copy", "--from-repo", s3_url, from_pw=DST_PW)
    assert again["blobs_new"] == 0 and again["packs"] == 0 and again["copied"] == []

    # SFTP → local (own keys again); also: the original repository recognises its own snapshots
    last = str(tmp_path / "last")
    kw("-r", last, "init", from_pw=None)
    rep = kw_json("-r", last, "copy", "--from-repo", sftp_url, from_pw=DST_PW)
    assert rep["mode"] == "rechunk" and len(rep["copied"]) == 2
    read_check(last)
    back = kw_json("-r", local, "copy", "--from-repo", last, pw=SRC_PW, from_pw=DST_PW)
    assert back["copied"] == [] and len(back["skipped"]) == 2

    target = tmp_path / "restored"
    kw("-r", last, "restore", "latest", "--target", str(target), from_pw=None)
    assert tree_contents(target / str(data).lstrip("/")) == tree_contents(data)


# --- interrupted copies ----------------------------------------------------------------------------


def _payload_repo(location: str, files: dict[str, bytes]) -> None:
    from keepwell.backends.registry import open_backend

    with Repository.init(open_backend(location), SRC_PW) as repo, \
            repo.new_snapshot("files", ["/data"], host="h") as w:
        for path, data in files.items():
            w.add_stream(path, io.BytesIO(data))
        w.commit()


@pytest.mark.parametrize("fast", [False, True], ids=["rechunk", "fast"])
def test_copy_killed_mid_way_then_completed(sftp_url: str, tmp_path: Path, fast: bool) -> None:
    rng = random.Random(11)
    files = {f"big-{i}.bin": rng.randbytes(24 * 1024 * 1024) for i in range(4)}
    src = str(tmp_path / "src")
    _payload_repo(src, files)
    if fast:
        kw("-r", sftp_url, "init", "--copy-chunker-params-from", src)
    else:
        kw("-r", sftp_url, "init", from_pw=None)
    root = Path("/" + sftp_url.split("/", 3)[3])
    env = {**os.environ, "KEEPWELL_PASSWORD": DST_PW, "KEEPWELL_FROM_PASSWORD": SRC_PW}
    # 16 MiB/s: one 16 MiB pack a second; an index object follows every 4 packs.
    child = subprocess.Popen([*KW, "--limit-upload", str(16 * 1024), "-r", sftp_url, "copy",
                              "--from-repo", src], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not any(p.is_file() for p in (root / "index").glob("[0-9a-f]*")):
            assert child.poll() is None, child.stderr.read() if child.stderr else ""
            assert time.monotonic() < deadline, "no index object was written"
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=10)
    assert child.returncode == -signal.SIGKILL
    assert not list((root / "snapshots").glob("*"))
    read_check(sftp_url)  # valid after the kill: indexed packs are whole
    arrived = kw_json("-r", sftp_url, "stats", "--mode", "raw-data", from_pw=None)["blobs"]["data"]
    assert arrived > 0

    rep = kw_json("-r", sftp_url, "copy", "--from-repo", src)
    assert len(rep["copied"]) == 1
    total = kw_json("-r", sftp_url, "stats", "--mode", "raw-data", from_pw=None)["blobs"]["data"]
    assert rep["blobs_new"] < total  # what arrived before the kill was reused
    print(f"killed run stored {arrived} of {total} data blobs; the completing run {rep['blobs_new']}")
    read_check(sftp_url)
    target = tmp_path / "out"
    kw("-r", sftp_url, "restore", "latest", "--target", str(target), from_pw=None)
    for name, data in files.items():
        assert (target / name).read_bytes() == data


# --- choosing snapshots, errors -------------------------------------------------------------------


def _mixed_source(location: str) -> list[str]:
    from keepwell.backends.registry import open_backend

    ids = []
    with Repository.init(open_backend(location), SRC_PW) as repo:
        for kind, host, tags in (("files", "alpha", ["daily"]), ("files", "beta", ["daily", "x"]),
                                 ("sqlite", "alpha", []), ("files", "alpha", ["weekly"])):
            with repo.new_snapshot(kind, ["/d"], host=host, tags=tags) as w:
                w.add_bytes("f.txt", f"{kind} {host} {tags}".encode())
                ids.append(w.commit().id)
            time.sleep(0.01)  # distinct times: 'latest' is the last one
    return ids


def test_copy_filters(tmp_path: Path) -> None:
    src = str(tmp_path / "src")
    ids = _mixed_source(src)

    def copied(*args: str) -> list[str]:
        dst = str(tmp_path / f"dst-{len(list(tmp_path.iterdir()))}")
        kw("-r", dst, "init", from_pw=None)
        return [c["source"] for c in kw_json("-r", dst, "copy", "--from-repo", src, *args)["copied"]]

    assert copied() == ids
    assert copied("--kind", "sqlite") == [ids[2]]
    assert copied("--host", "alpha") == [ids[0], ids[2], ids[3]]
    assert copied("--host", "alpha", "--host", "beta", "--kind", "files") == [ids[0], ids[1], ids[3]]
    assert copied("--tag", "daily") == [ids[0], ids[1]]
    assert copied("--tag", "daily,x") == [ids[1]]
    assert copied("--tag", "x", "--tag", "weekly") == [ids[1], ids[3]]
    assert copied(ids[3][:8], ids[0][:10]) == [ids[0], ids[3]]
    assert copied("latest") == [ids[3]]
    assert copied("--kind", "files", "--host", "beta", "latest") == [ids[1]]
    assert copied("--tag", "nothing") == []

    dst = str(tmp_path / "dst-err")
    kw("-r", dst, "init", from_pw=None)
    proc = kw("-r", dst, "copy", "--from-repo", src, "ffffffff", check_rc=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "no snapshot" in proc.stderr


def test_wrong_source_password_is_one_line_and_exit_12(tmp_path: Path) -> None:
    src = str(tmp_path / "src")
    _mixed_source(src)
    dst = str(tmp_path / "dst")
    kw("-r", dst, "init", from_pw=None)
    proc = kw("-r", dst, "copy", "--from-repo", src, from_pw="wrong", check_rc=False)
    assert proc.returncode == 12
    assert proc.stderr.count("\n") == 1 and "source repository" in proc.stderr
    assert "Traceback" not in proc.stderr
    fresh = tmp_path / "fresh"
    proc = kw("-r", str(fresh), "init", "--copy-chunker-params-from", src, from_pw="wrong",
              check_rc=False)
    assert proc.returncode == 12 and proc.stderr.count("\n") == 1
    assert not fresh.exists()  # nothing created
    pwfile = tmp_path / "pw"
    pwfile.write_text(SRC_PW + "\n")
    proc = kw("-r", dst, "copy", "--from-repo", src, "--from-password-file", str(pwfile),
              from_pw=None)
    assert "4 snapshot(s) copied" in proc.stdout
    proc = kw("-r", dst, "copy", "--from-repo", str(tmp_path / "nowhere"), check_rc=False)
    assert proc.returncode == 10 and proc.stderr.count("\n") == 1
    proc = kw("-r", dst, "copy", "--from-repo", dst, from_pw=DST_PW, check_rc=False)
    assert proc.returncode == 2 and "same repository" in proc.stderr


# --- the engine on memory repositories -------------------------------------------------------------


def test_engine_copy_keeps_the_record_and_shares_nothing_it_should_not() -> None:
    rng = random.Random(3)
    files = {f"d{i % 3}/f{i}.txt": f"line {i}\n".encode() * (i * 30 + 1) for i in range(50)}
    files["big.bin"] = rng.randbytes(40 * 1024 * 1024)  # streamed, not batched
    src = Repository.init(MemoryBackend("memory://src"), SRC_PW)
    with src.new_snapshot("files", ["/data"], host="h1", tags=["t"],
                          source={"note": "kept"}) as w:
        for path, data in files.items():
            w.add_stream(path, io.BytesIO(data))
        first = w.commit()
    with src.new_snapshot("files", ["/data"], host="h1", parent=first) as w:
        w.add_bytes("only.txt", b"second")
        second = w.commit()
    for fast in (False, True):
        backend = MemoryBackend("memory://dst")
        dst = init_like(backend, DST_PW, src) if fast else Repository.init(backend, DST_PW)
        assert dst.master.raw != src.master.raw  # always re-encrypted under its own key
        rep = copy_snapshots(src, dst, select_snapshots(src, flt=SnapshotFilter()))
        assert rep.mode == ("fast" if fast else "rechunk")
        a, b = dst.list_snapshots()
        assert (a.time, a.host, a.tags, a.paths, a.kind, a.summary) == (
            first.time, first.host, first.tags, first.paths, first.kind, first.summary)
        assert a.source == {"note": "kept", "copied_from": first.id}
        assert b.parent == a.id and b.source["copied_from"] == second.id
        assert (a.tree == first.tree) is fast
        got = {p: b"".join(dst.iter_file(a, p)) for p, n in dst.walk(a) if n.type == "file"}
        assert got == files
        report = check(dst, read_data_fraction=1.0)
        assert report.ok, report.errors
        assert copy_snapshots(src, dst, select_snapshots(src)).blobs_new == 0


def test_copy_of_a_snapshot_that_raced_a_prune_reads_like_a_restore(tmp_path: Path) -> None:
    """A backup that loaded the index just before a prune marked its packs commits a snapshot
    whose blobs only packs pending deletion hold; a restore finds them through the pending
    records (`Repository.locate`), and so must a copy, on both paths."""
    from keepwell.repository.prune import PruneOptions, load_pending, prune
    from keepwell.sources.files.restorer import restore_snapshot

    files = {f"d/f{i}.txt": f"file {i}\n".encode() * (i * 40 + 1) for i in range(30)}
    backend = MemoryBackend("memory://raced")
    repo = Repository.init(backend, SRC_PW)

    def backup(r: Repository) -> str:
        with r.new_snapshot("files", ["/data"]) as w:
            for path, data in files.items():
                w.add_stream(path, io.BytesIO(data))
            return w.commit().id

    raced = backup(repo)
    # The state such a race leaves, made directly: the snapshot's packs are marked by a prune
    # (out of the index, in a pending record) and the snapshot object is there all the same.
    record = backend.get(f"snapshots/{raced}")
    repo.forget([raced])
    assert prune(repo, PruneOptions(grace=3600)).packs_marked >= 2
    backend.put(f"snapshots/{raced}", record)
    src = Repository.open(backend, SRC_PW)
    snap = src.find_snapshot(raced)
    content = [b for _p, n in src.walk(snap) for b in n.content]
    assert load_pending(src) and content and not any(src.index.has(b) for b in content)
    restore_snapshot(src, snap, str(tmp_path / "restored"))
    assert {p: (tmp_path / "restored" / p).read_bytes() for p in files} == files
    for fast in (False, True):
        dst_backend = MemoryBackend(f"memory://dst-{fast}")
        dst = init_like(dst_backend, DST_PW, src) if fast else Repository.init(dst_backend, DST_PW)
        rep = copy_snapshots(src, dst, [snap])
        assert rep.mode == ("fast" if fast else "rechunk") and len(rep.copied) == 1
        (copy,) = dst.list_snapshots()
        got = {p: b"".join(dst.iter_file(copy, p)) for p, n in dst.walk(copy) if n.type == "file"}
        assert got == files
        assert check(dst, read_data_fraction=1.0).ok
