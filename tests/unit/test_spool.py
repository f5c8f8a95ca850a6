"""The spool (keepwell.backends.spool) on its own: what a backend uploading from it relies on."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest

from keepwell.backends.spool import Spool
from tests.backend_contract import open_spool_files


@pytest.mark.parametrize("unnamed", [True, False], ids=["O_TMPFILE", "deleted-temp-file"])
def test_an_upload_spool_leaves_no_name_and_reads_back_from_the_start(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unnamed: bool) -> None:
    if not unnamed:
        monkeypatch.delattr(os, "O_TMPFILE", raising=False)
    spool = Spool(str(tmp_path), "s3://bucket")
    data = os.urandom(3 << 20)
    for start in range(0, len(data), 300_000):
        spool.write(data[start:start + 300_000])
        assert os.listdir(tmp_path) == []  # never a name, even without O_TMPFILE
    for _ in range(2):  # each reader starts at the beginning
        assert b"".join(spool.pieces(1 << 20)) == data
        with spool.mapped() as view:
            assert bytes(view) == data
    assert open_spool_files(tmp_path)
    spool.close()
    assert open_spool_files(tmp_path) == []


def test_a_map_still_held_by_a_failed_request_is_left_to_it(tmp_path: Path) -> None:
    """A request that stalled may still hold the mapped body in a task of the HTTP client: the
    caller sees the request's error, and the holder's view stays valid."""
    spool = Spool(str(tmp_path), "s3://bucket")
    spool.write(b"abc" * 1000)
    held: list[pickle.PickleBuffer] = []
    with pytest.raises(TimeoutError, match="stalled"), spool.mapped() as view:
        held.append(pickle.PickleBuffer(view))  # holds the buffer, as the HTTP client does
        del view  # as the uploader does (keepwell.backends.objectstore)
        raise TimeoutError("stalled")
    spool.close()
    assert bytes(held[0].raw()[:6]) == b"abcabc"
    assert open_spool_files(tmp_path)  # the map's own descriptor, while the buffer is held
    held.clear()
    assert open_spool_files(tmp_path) == []


def test_an_empty_spool_maps_to_nothing(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path), "s3://bucket")
    with spool.mapped() as view:
        assert bytes(view) == b""
    assert list(spool.pieces()) == []
    spool.close()
