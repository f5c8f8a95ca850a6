"""Network faults between the remote backends and real servers, through a controlled TCP proxy.

What must hold, whatever the fault and whenever it strikes: `RetryingBackend` over S3 or SFTP
either completes or fails with a keepwell `BackendError`; an object is never visible partially
or with the wrong content; reads return exactly the stored bytes or fail. And the rate limiter
holds the rate on the wire within 10 %.
"""

# ruff: noqa: F811

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from keepwell.backends.base import Backend
from keepwell.backends.objectstore import ObjectStoreBackend
from keepwell.backends.objectstore import from_url as s3_from_url
from keepwell.backends.resilience import Backoff, TokenBucket
from keepwell.backends.sftp import from_url as sftp_from_url
from keepwell.backends.wrappers import RateLimitedBackend, RetryingBackend
from keepwell.errors import BackendError, ObjectExistsError, ObjectNotFoundError
from tests.fault.cli import kw, ok
from tests.integration.conftest_remote import BUCKET
from tests.servers.proxy import FaultProxy
from tests.servers.seaweed import SeaweedServer
from tests.servers.sshd import SshServer

pytestmark = [
    pytest.mark.integration,
    # paramiko's read-ahead thread dies with a traceback when a connection is cut under it; the
    # reading thread gets the error (that is what is tested), the warning is only noise.
    pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning"),
]

TRIALS = int(os.environ.get("KEEPWELL_FAULT_TRIALS", "24"))
SEED = int(os.environ.get("KEEPWELL_FAULT_SEED", str(random.SystemRandom().randrange(10**6))))


@dataclass
class Remote:
    """One server seen twice: through the faulty proxy, and directly (to check the truth)."""

    proxy: FaultProxy
    via_proxy: Callable[[str], Backend]
    direct: Callable[[str], Backend]


@pytest.fixture(scope="module")
def s3_remote(seaweed: SeaweedServer) -> Iterator[Remote]:
    env = seaweed.env()
    creds = {
        "access_key_id": env["AWS_ACCESS_KEY_ID"],
        "secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
        "region": env["AWS_REGION"],
    }
    with FaultProxy(seaweed.s3_port) as proxy:

        def via(prefix: str) -> Backend:
            # No retries inside obstore: the wrapper under test has to do the work.
            return s3_from_url(
                f"s3://{BUCKET}/{prefix}",
                endpoint=f"http://127.0.0.1:{proxy.port}",
                max_retries=0,
                stall_timeout=2,
                timeout=20,
                **creds,
            )

        def direct(prefix: str) -> Backend:
            return s3_from_url(f"s3://{BUCKET}/{prefix}", endpoint=seaweed.endpoint, **creds)

        yield Remote(proxy, via, direct)


@pytest.fixture(scope="module")
def sftp_remote(sshd: SshServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Remote]:
    base = tmp_path_factory.mktemp("sftp-faults")
    opts = {"known_hosts": str(sshd.known_hosts), "identity": str(sshd.identity)}
    with FaultProxy(sshd.port) as proxy:
        sshd.trust_port(proxy.port)

        def via(prefix: str) -> Backend:
            return sftp_from_url(
                sshd.url(str(base / prefix), port=proxy.port),
                timeout=1.5,
                connect_timeout=3,
                connections=2,
                **opts,
            )

        def direct(prefix: str) -> Backend:
            return sftp_from_url(sshd.url(str(base / prefix)), **opts)

        yield Remote(proxy, via, direct)


def retrying(b: Backend) -> RetryingBackend:
    return RetryingBackend(b, attempts=6, backoff=Backoff(base=0.05, cap=0.4))


def arm_random_fault(proxy: FaultProxy, rng: random.Random, size: int, http: bool) -> str:
    kinds = ["cut", "cut", "cut", "lost-answer", "stall", "refuse", "none"]
    kind = rng.choice(kinds + (["503", "503"] if http else []))
    if kind == "lost-answer":
        # HTTP: the whole request is carried out and its answer lost. SFTP: some answers of the
        # open/write/fsync/close/rename sequence get through, then the connection dies.
        proxy.cut_next_response(0 if http else rng.randint(0, 600))
    elif kind == "cut":
        proxy.cut_after(rng.randint(1, size + 20_000))
    elif kind == "stall":
        proxy.stall_after(rng.randint(1, size + 20_000), rng.uniform(0.5, 2.5))
    elif kind == "refuse":
        proxy.refuse(rng.randint(1, 3))
    elif kind == "503":
        proxy.answer_503(rng.randint(1, 4))
    return kind


def check_truth(direct: Backend, expected: dict[str, bytes]) -> None:
    """Every visible object is one that was written, whole and exact."""
    listed = {i.name: i.size for i in direct.list("data/")}
    for name, size in listed.items():
        assert name in expected, f"unexpected object {name}"
        data = direct.get(name)
        assert len(data) == size == len(expected[name]), f"{name}: partial object visible"
        assert data == expected[name], f"{name}: corrupt object visible"


def run_trials(remote: Remote, http: bool) -> dict[str, int]:
    rng = random.Random(SEED)
    prefix = f"faults-{uuid.uuid4().hex[:8]}"
    faulty = retrying(remote.via_proxy(prefix))
    direct = remote.direct(prefix)
    expected: dict[str, bytes] = {}
    outcome = {"ok": 0, "failed": 0, "get_ok": 0, "get_failed": 0, "retries": 0, "resolved": 0}
    try:
        for trial in range(TRIALS):
            size = rng.choice([0, 1, 1000, 64_000, 300_000, 1_500_000])
            data = rng.randbytes(size)
            name = f"data/{trial:02x}/obj"
            expected[name] = data
            kind = arm_random_fault(remote.proxy, rng, size, http)
            try:
                faulty.put(name, data)
                outcome["ok"] += 1
                assert direct.get(name) == data, f"trial {trial} ({kind}): put returned, bad data"
            except BackendError as exc:
                # A clear, classified error; the object is absent or whole.
                outcome["failed"] += 1
                print(f"trial {trial} ({kind}): put failed: {exc.line()}")
                with contextlib.suppress(ObjectNotFoundError):
                    assert direct.get(name) == data, f"trial {trial} ({kind}): partial object"

            finally:
                remote.proxy.clear()
            # Reads through faults: exact bytes or a clear error.
            if name in {i.name for i in direct.list(f"data/{trial:02x}/")}:
                kind = arm_random_fault(remote.proxy, rng, size, http)
                try:
                    whole = rng.random() < 0.7
                    got = faulty.get(name, *((0, None) if whole else (size // 3, 5000)))
                    outcome["get_ok"] += 1
                    want = data if whole else data[size // 3 :][:5000]
                    assert got == want, f"trial {trial} ({kind}): read returned wrong bytes"
                except BackendError as exc:
                    outcome["get_failed"] += 1
                    print(f"trial {trial} ({kind}): get failed: {exc.line()}")
                finally:
                    remote.proxy.clear()
        check_truth(direct, expected)
        outcome["retries"], outcome["resolved"] = faulty.retries, faulty.ambiguous_resolved
    finally:
        faulty.close()
        direct.close()
    return outcome


def test_s3_random_faults(s3_remote: Remote) -> None:
    start = time.monotonic()
    outcome = run_trials(s3_remote, http=True)
    print(
        f"S3 faults (seed {SEED}): {outcome} in {time.monotonic() - start:.1f}s, "
        f"{s3_remote.proxy.cuts} cuts, {s3_remote.proxy.answered_503} answered 503"
    )
    assert outcome["ok"] > TRIALS // 2  # retries get most puts through


def test_sftp_random_faults(sftp_remote: Remote) -> None:
    start = time.monotonic()
    outcome = run_trials(sftp_remote, http=False)
    print(
        f"SFTP faults (seed {SEED}): {outcome} in {time.monotonic() - start:.1f}s, "
        f"{sftp_remote.proxy.cuts} cuts"
    )
    assert outcome["ok"] > TRIALS // 2


def test_s3_burst_of_503_is_retried(s3_remote: Remote) -> None:
    prefix = f"b503-{uuid.uuid4().hex[:8]}"
    b = retrying(s3_remote.via_proxy(prefix))
    before = s3_remote.proxy.answered_503
    s3_remote.proxy.answer_503(4)
    b.put("index/x", b"payload")
    assert s3_remote.proxy.answered_503 - before == 4
    assert s3_remote.direct(prefix).get("index/x") == b"payload"


def test_s3_lost_answer_to_a_create_only_put(s3_remote: Remote, seaweed: SeaweedServer) -> None:
    """The PUT is carried out, its answer is lost: the retry finds our own object and the put
    succeeds (with obstore's own retries on, as in normal use)."""
    prefix = f"lost-{uuid.uuid4().hex[:8]}"
    env = seaweed.env()
    inner = s3_from_url(
        f"s3://{BUCKET}/{prefix}",
        endpoint=f"http://127.0.0.1:{s3_remote.proxy.port}",
        access_key_id=env["AWS_ACCESS_KEY_ID"],
        secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    )
    b = retrying(inner)
    s3_remote.proxy.cut_next_response()
    try:
        b.put("index/x", b"payload")
    finally:
        s3_remote.proxy.clear()
    assert (b.retries, b.ambiguous_resolved) == (1, 1)
    assert s3_remote.direct(prefix).get("index/x") == b"payload"
    # And a real conflict is still reported.
    with pytest.raises(ObjectExistsError):
        b.put("index/x", b"other")


def _settled_down(proxy: FaultProxy) -> int:
    """The proxy's downstream byte count once it stops moving: the proxy counts a piece after
    sending it, so a client can have its answer before the count includes it."""
    last = -1
    while (now := proxy.bytes_down) != last:
        last = now
        time.sleep(0.05)
    return now


def test_sftp_lost_answer_to_the_rename(sftp_remote: Remote) -> None:
    """Everything of a create-only put is carried out but the last answer (the rename's) is
    lost: the retry finds the object with our content and the put succeeds."""
    prefix = f"lost-{uuid.uuid4().hex[:8]}"
    b = retrying(sftp_remote.via_proxy(prefix))
    data = os.urandom(1000)
    b.put("index/warm", data)  # connect, and make index/ exist
    down = _settled_down(sftp_remote.proxy)
    b.put("index/probe", data)
    answers = _settled_down(sftp_remote.proxy) - down  # what one such put gets back
    sftp_remote.proxy.cut_next_response(answers - 8)
    try:
        b.put("index/real", data)
    finally:
        sftp_remote.proxy.clear()
    assert (b.retries, b.ambiguous_resolved) == (1, 1)
    assert sftp_remote.direct(prefix).get("index/real") == data


def test_s3_without_retries_reports_503_as_transient(s3_remote: Remote) -> None:
    b = s3_remote.via_proxy(f"n503-{uuid.uuid4().hex[:8]}")
    s3_remote.proxy.answer_503(1)
    try:
        with pytest.raises(BackendError) as info:
            b.put("index/x", b"payload")
        assert info.value.transient
    finally:
        s3_remote.proxy.clear()


def test_an_upload_slower_than_the_stall_time_is_no_stall(s3_remote: Remote) -> None:
    """A slow link is not a stalled one: 3 MB uploads at 512 KiB/s (6 s each) with a stall time
    of 2 s complete, since an upload is given the time its bytes need. The first may take one
    retry (the link is slower than an unmeasured one is assumed to be), the next none."""
    prefix = f"slow-{uuid.uuid4().hex[:8]}"
    inner = s3_remote.via_proxy(prefix)
    assert isinstance(inner, ObjectStoreBackend) and inner.stall == 2
    b = retrying(inner)
    data = os.urandom(3_000_000)
    s3_remote.proxy.throttle(512 * 1024)
    try:
        b.put("data/00/first", data)
        assert b.retries <= 1
        before = b.retries
        b.put("data/00/second", data)
        assert b.retries == before
    finally:
        s3_remote.proxy.clear()
    assert s3_remote.direct(prefix).get("data/00/second") == data


# --- bandwidth -----------------------------------------------------------------------------------

RATE = 1024 * 1024  # 1 MiB/s
# an 8 s transfer each way (KEEPWELL_RATE_SECONDS for another length)
SECONDS = float(os.environ.get("KEEPWELL_RATE_SECONDS", "8"))


def _wire_rate(proxy: FaultProxy, up: bool, work: Callable[[], None]) -> float:
    before = proxy.bytes_up if up else proxy.bytes_down
    start = time.monotonic()
    work()
    elapsed = time.monotonic() - start
    moved = (proxy.bytes_up if up else proxy.bytes_down) - before
    return moved / elapsed


def test_upload_rate_limit_holds_on_the_wire(s3_remote: Remote) -> None:
    """An upload at 1 MiB/s, measured at the proxy, never runs faster than the limit (a busy
    machine may make it slower, so only the ceiling is asserted)."""
    prefix = f"rate-{uuid.uuid4().hex[:8]}"
    bucket = TokenBucket(RATE, burst=64 * 1024)
    b = RateLimitedBackend(s3_remote.via_proxy(prefix), upload=bucket, chunk_size=64 * 1024)
    pack = os.urandom(256 * 1024)
    n = round(SECONDS * RATE / len(pack))

    def work() -> None:
        for i in range(n):
            b.put(f"data/{i:02x}/p", pack)

    rate = _wire_rate(s3_remote.proxy, True, work)
    print(f"upload: {rate / 1024:.0f} KiB/s on the wire for a limit of {RATE / 1024:.0f} KiB/s")
    assert rate <= RATE * 1.1


def test_download_rate_limit_holds_on_the_wire(sftp_remote: Remote) -> None:
    prefix = f"rate-{uuid.uuid4().hex[:8]}"
    sftp_remote.direct(prefix).put("data/00/big", os.urandom(int(SECONDS * RATE)))
    bucket = TokenBucket(RATE, burst=64 * 1024)
    b = RateLimitedBackend(sftp_remote.via_proxy(prefix), download=bucket, chunk_size=64 * 1024)
    b.stat("data/00/big")  # connect outside the measurement
    got: list[bytes] = []
    rate = _wire_rate(sftp_remote.proxy, False, lambda: got.append(b.get("data/00/big")))
    assert len(got[0]) == int(SECONDS * RATE)
    print(f"download: {rate / 1024:.0f} KiB/s on the wire for a limit of {RATE / 1024:.0f} KiB/s")
    assert rate <= RATE * 1.1


# --- a command against a stalled or cut link -----------------------------------------------------

STALL = 2  # KEEPWELL_STALL_TIMEOUT of the commands below, in seconds


@dataclass
class Site:
    """A repository seen through the faulty proxy and directly, as the command sees it."""

    proxy: FaultProxy
    via_proxy: tuple[str, dict[str, str]]  # location, environment
    direct: tuple[str, dict[str, str]]
    endpoint: str  # what the error line must name

    def kw(self, *args: str, direct: bool = False) -> subprocess.CompletedProcess[str]:
        location, env = self.direct if direct else self.via_proxy
        return kw(location, *args, env=env, timeout=300)


@pytest.fixture(params=["s3", "sftp"])
def site(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Site]:
    cache = {"XDG_CACHE_HOME": str(tmp_path / "cache"), "KEEPWELL_STALL_TIMEOUT": str(STALL)}
    if request.param == "s3":
        remote: Remote = request.getfixturevalue("s3_remote")
        server: SeaweedServer = request.getfixturevalue("seaweed")
        location = f"s3://{BUCKET}/cmd-{uuid.uuid4().hex[:8]}"
        env = {**server.env(), **cache}
        via = {**env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{remote.proxy.port}"}
        yield Site(remote.proxy, (location, via), (location, env), f"127.0.0.1:{remote.proxy.port}")
    else:
        remote = request.getfixturevalue("sftp_remote")
        sshd_server: SshServer = request.getfixturevalue("sshd")
        root = tmp_path / "sftp-repo"
        env = {**sshd_server.env(), **cache}
        via = sshd_server.url(str(root), port=remote.proxy.port)
        yield Site(remote.proxy, (via, env), (sshd_server.url(str(root)), env),
                   f"127.0.0.1:{remote.proxy.port}")
    remote.proxy.clear()


def source_tree(root: Path) -> Path:
    rng = random.Random(3)
    (root / "d").mkdir(parents=True)
    (root / "big").write_bytes(rng.randbytes(6_000_000))  # one pack, uploaded in one request
    for i in range(5):
        (root / "d" / f"f{i}").write_bytes(rng.randbytes(20_000))
    return root


def assert_clear_lines(r: subprocess.CompletedProcess[str], site: Site, cause: str,
                       one: bool = True) -> None:
    """The command failed with one line (``one``; else one line per file it could not
    restore) that names the endpoint and the cause, and promises nothing the finished command
    would not do."""
    assert r.returncode == 1, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines and (len(lines) == 1 or not one), r.stderr
    for line in lines:
        assert line.startswith("keepwell: "), r.stderr
        assert site.endpoint in line and cause in line.lower(), line
        assert "retried" not in line and "again later" not in line, line


def assert_sound_after(site: Site, src: Path, work: Path) -> None:
    """With the link back, the repository checks clean, and a backup and a restore work."""
    site.proxy.clear()
    assert "no errors were found" in ok(site.kw("check", "--read-data", direct=True))
    ok(site.kw("backup", str(src)))
    ok(site.kw("restore", "latest", "--target", str(work / "after"), direct=True))
    got = work / "after" / str(src).lstrip("/")
    assert subprocess.run(["diff", "-r", str(src), str(got)]).returncode == 0


@dataclass(frozen=True)
class LinkFault:
    name: str
    arm: Callable[[FaultProxy], None]
    command: tuple[str, ...]  # "SRC" and "OUT" stand for the source tree and a target
    cause: str  # what the error line must say
    one_line: bool = True  # a restore names every file it could not restore


LINK_FAULTS = [
    # a frozen server, in the middle of the pack's upload
    LinkFault("frozen-during-backup", lambda p: p.freeze_after(2_000_000), ("backup", "SRC"),
              "stalled"),
    # ... in the middle of the pack's download
    LinkFault("frozen-during-restore", lambda p: p.freeze_after(1_000_000),
              ("restore", "latest", "--target", "OUT"), "stalled", one_line=False),
    LinkFault("accepts-and-never-answers", lambda p: p.freeze_after(0), ("snapshots",),
              "stalled"),
    # reset, then every new connection refused
    LinkFault("cut-during-backup", lambda p: p.outage_after(2_000_000), ("backup", "SRC"),
              "connection"),
]


@pytest.mark.parametrize("fault", LINK_FAULTS, ids=[f.name for f in LINK_FAULTS])
def test_a_command_on_a_stalled_or_cut_link(site: Site, fault: LinkFault, tmp_path: Path) -> None:
    """It fails within a few stall times, with one line naming the server and the cause, and
    leaves a sound repository."""
    src = source_tree(tmp_path / "src")
    ok(site.kw("init", direct=True))
    if fault.command[0] == "restore":
        ok(site.kw("backup", str(src), direct=True))
    fault.arm(site.proxy)
    args = [{"SRC": str(src), "OUT": str(tmp_path / "out")}.get(a, a) for a in fault.command]
    started = time.monotonic()
    r = site.kw(*args)
    print(f"{site.endpoint} {fault.name}: failed after {time.monotonic() - started:.1f}s: "
          f"{r.stderr}")
    assert_clear_lines(r, site, fault.cause, one=fault.one_line)
    assert_sound_after(site, src, tmp_path)
