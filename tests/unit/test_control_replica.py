"""Mirroring a repository's objects to a replica (real local backends)."""

from __future__ import annotations

from pathlib import Path

from keepwell.backends import open_backend
from keepwell.control.replica import mirror


class _Recording:
    """A real local backend that remembers the order of writes and deletes."""

    def __init__(self, path: Path) -> None:
        self.inner = open_backend(str(path))
        self.location = self.inner.location
        self.calls: list[tuple[str, str]] = []

    def put(self, name: str, data: bytes | memoryview, *, overwrite: bool = False) -> None:
        self.calls.append(("put", name))
        self.inner.put(name, data, overwrite=overwrite)

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        return self.inner.get(name, offset, length)

    def stat(self, name: str):  # type: ignore[no-untyped-def]
        return self.inner.stat(name)

    def list(self, prefix: str = ""):  # type: ignore[no-untyped-def]
        return self.inner.list(prefix)

    def delete(self, name: str) -> None:
        self.calls.append(("delete", name))
        self.inner.delete(name)

    def close(self) -> None:
        self.inner.close()


def test_mirror_copies_data_before_snapshots_and_deletes_snapshots_first(tmp_path: Path) -> None:
    primary = open_backend(str(tmp_path / "p"))
    for name in ("snapshots/s1", "index/i1", "data/ab/ab1", "config", "keys/k1",
                 "sessions/live"):
        primary.put(name, name.encode())
    replica = _Recording(tmp_path / "r")
    result = mirror(primary, replica)
    assert [n for _, n in replica.calls] == ["config", "keys/k1", "data/ab/ab1", "index/i1",
                                              "snapshots/s1"]
    assert result.copied == 5 and result.deleted == 0
    # The primary forgets a snapshot and prunes its data: the replica follows, snapshot first.
    primary.delete("snapshots/s1")
    primary.delete("data/ab/ab1")
    primary.put("snapshots/s2", b"s2")
    replica.calls.clear()
    result = mirror(primary, replica)
    assert replica.calls == [("put", "snapshots/s2"), ("delete", "snapshots/s1"),
                             ("delete", "data/ab/ab1")]
    assert sorted(o.name for o in replica.list()) == ["config", "index/i1", "keys/k1",
                                                      "snapshots/s2"]
    assert mirror(primary, replica).copied == 0


def test_mirror_never_copies_a_damaged_object(tmp_path: Path) -> None:
    from keepwell.crypto import content_name

    primary = open_backend(str(tmp_path / "p"))
    replica = open_backend(str(tmp_path / "r"))
    good, bad = b"good pack", b"damaged pack"
    primary.put(f"data/aa/{content_name(good)}", good)
    primary.put(f"data/bb/{content_name(b'what it held')}", bad)
    result = mirror(primary, replica)
    assert result.copied == 1 and result.damaged == [f"data/bb/{content_name(b'what it held')}"]
    assert [o.name for o in replica.list()] == [f"data/aa/{content_name(good)}"]
