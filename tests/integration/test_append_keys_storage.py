"""Deletion protection at the storage (docs/security.md): an append key paired with an S3 user
that can put, get and list but not delete.

On a real SeaweedFS S3 gateway: its identities' ``Write`` action includes deleting (checked here),
so "write but not delete" is a bucket policy that denies ``s3:DeleteObject`` to that user. With
it, ``keepwell backup`` with an append key works (and is incremental); ``forget`` and ``prune``
with a full key through that user fail with one line and change nothing; through the admin
identity they work. The real ``keepwell`` command runs in a subprocess.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fault.cli import kw, ok
from tests.integration.compat_support import describe_tree
from tests.integration.conftest_remote import BUCKET
from tests.servers.seaweed import ACCESS_KEY, REGION, SECRET_KEY, SeaweedServer, signed_request

pytestmark = pytest.mark.integration

APPEND = "append-secret"
# an identity allowed Read, Write and List, and one more denied deletes by the bucket policy
WRITER = ("writer", "writer-secret-0123456789")
HOST = ("host1", "host1-secret-0123456789")
ACCOUNT = "000000000000"  # SeaweedFS's account id in its users' ARNs

POLICY = {"Version": "2012-10-17", "Statement": [
    {"Effect": "Deny", "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:user/{HOST[0]}"},
     "Action": ["s3:DeleteObject"], "Resource": [f"arn:aws:s3:::{BUCKET}/*"]}]}


@pytest.fixture(scope="module")
def weed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    identities = [{"name": name, "credentials": [{"accessKey": name, "secretKey": secret}],
                   "actions": ["Read", "Write", "List"]} for name, secret in (WRITER, HOST)]
    server = SeaweedServer(tmp_path_factory.mktemp("seaweed-roles"), identities).start()
    try:
        server.create_bucket(BUCKET)
        server.warm_up(BUCKET)
        status, body = signed_request(server.s3_port, "PUT", f"/{BUCKET}",
                                      json.dumps(POLICY).encode(), query="policy")
        assert status in (200, 204), body
        yield server
    finally:
        server.stop()


def _env(server: SeaweedServer, who: tuple[str, str], tmp_path: Path) -> dict[str, str]:
    return {"AWS_ENDPOINT_URL": server.endpoint, "AWS_REGION": REGION,
            "AWS_ACCESS_KEY_ID": who[0], "AWS_SECRET_ACCESS_KEY": who[1],
            "KEEPWELL_CACHE_DIR": str(tmp_path / f"cache-{who[0]}")}


def _put_then_delete(server: SeaweedServer, who: tuple[str, str]) -> tuple[int, int, int]:
    """(put, get, delete) statuses of one object by ``who``; the admin removes it afterwards."""
    name = f"/{BUCKET}/probe-{uuid.uuid4().hex[:8]}"
    put = signed_request(server.s3_port, "PUT", name, b"x", access=who[0], secret=who[1])[0]
    get = signed_request(server.s3_port, "GET", name, access=who[0], secret=who[1])[0]
    delete = signed_request(server.s3_port, "DELETE", name, access=who[0], secret=who[1])[0]
    signed_request(server.s3_port, "DELETE", name)
    return put, get, delete


def test_write_includes_delete_and_the_policy_takes_it_away(weed: SeaweedServer) -> None:
    assert _put_then_delete(weed, WRITER) == (200, 200, 204)  # `Write` alone can delete
    assert _put_then_delete(weed, HOST) == (200, 200, 403)
    assert _put_then_delete(weed, (ACCESS_KEY, SECRET_KEY)) == (200, 200, 204)


def _failed_clearly(r: subprocess.CompletedProcess[str], what: str) -> None:
    """One line saying the storage denied ``what``, at once: a refusal is not retried."""
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert f"deleting {what}" in r.stderr and ": access denied: " in r.stderr, r.stderr
    assert "check the credentials and their permissions" in r.stderr, r.stderr
    assert "attempts" not in r.stderr, r.stderr


def test_append_key_backs_up_through_a_user_that_cannot_delete(
        weed: SeaweedServer, tmp_path: Path) -> None:
    url = f"s3://{BUCKET}/t-{uuid.uuid4().hex[:12]}"
    admin, host = _env(weed, (ACCESS_KEY, SECRET_KEY), tmp_path), _env(weed, HOST, tmp_path)
    ok(kw(url, "init", "--append-keys", env=admin))
    ok(kw(url, "key", "add", "--role", "append", env={**admin, "KEEPWELL_NEW_PASSWORD": APPEND}))
    src = tmp_path / "src"
    for i in range(30):
        (src / f"d{i % 3}").mkdir(parents=True, exist_ok=True)
        (src / f"d{i % 3}" / f"f{i}").write_bytes(os.urandom(1000 + i))
    (src / "only-first").write_bytes(os.urandom(3 << 20))
    as_host = {**host, "KEEPWELL_PASSWORD": APPEND}
    first = json.loads(ok(kw(url, "backup", "--json", str(src), env=as_host)))["snapshot"]
    (src / "only-first").unlink()
    second = json.loads(ok(kw(url, "backup", "--json", str(src), env=as_host)))["snapshot"]
    assert second["parent"] == first["id"] and second["summary"]["files_unmodified"] == 30
    # a full key through the same user: nothing can be deleted
    _failed_clearly(kw(url, "forget", first["id"][:8], env=host), f"snapshots/{first['id']}")
    assert len(json.loads(ok(kw(url, "snapshots", "--json", env=host)))) == 2
    ok(kw(url, "forget", first["id"][:8], env=admin))
    # the data only the forgotten snapshot held is left for prune, which cannot delete it
    r = kw(url, "prune", "--max-unused", "0", "--grace", "0s", env=host)
    _failed_clearly(r, "")  # the first object it deletes: an index object it superseded
    assert "no errors were found" in ok(kw(url, "check", "--read-data", env=host))
    # through the admin identity, prune works
    out = ok(kw(url, "prune", "--max-unused", "0", "--grace", "0s", "--wait", env=admin))
    assert re.search(r"delete [1-9]\d* \(3\.\d+ MiB freed\)", out), out  # only-first's data
    assert [s["id"] for s in json.loads(ok(kw(url, "snapshots", "--json", env=host)))] == [second["id"]]
    assert json.loads(ok(kw(url, "check", "--read-data", "--json", env=host)))["errors"] == []
    target = tmp_path / "out"
    ok(kw(url, "restore", "latest", "--target", str(target), env=host))
    assert describe_tree(target / str(src).lstrip("/")) == describe_tree(src)
