"""The data-file guard around a QuPath save (``bridge.connectors.qupath.safe_save``),
on real files, following QuPath's own save sequence (move data.qpdata to .bkp,
write a new data.qpdata, delete the .bkp)."""

from __future__ import annotations

import os

import pytest

from bridge.connectors.qupath.safe_save import restore_on_failure, snapshot_path
from bridge.errors import BridgeInputError


def qupath_save(data, payload: bytes, fail_after: int | None = None) -> None:
    """QuPath's saveImageData, failing (not with an IOException) after ``fail_after`` bytes."""
    backup = data.with_name(data.name + ".bkp")
    if data.exists():
        os.replace(data, backup)
    with open(data, "wb") as f:
        if fail_after is not None:
            f.write(payload[:fail_after])
            raise MemoryError("Java heap space")
        f.write(payload)
    backup.unlink(missing_ok=True)


def test_success_leaves_the_new_file_and_nothing_else(tmp_path):
    data = tmp_path / "data.qpdata"
    data.write_bytes(b"old objects")
    with restore_on_failure(data):
        qupath_save(data, b"new objects")
    assert data.read_bytes() == b"new objects"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.qpdata"]


def test_a_failed_save_puts_the_old_file_back(tmp_path):
    data = tmp_path / "data.qpdata"
    data.write_bytes(b"old objects")
    with pytest.raises(MemoryError), restore_on_failure(data):
        qupath_save(data, b"new objects", fail_after=3)
    assert data.read_bytes() == b"old objects"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.qpdata"]


def test_a_failed_first_save_leaves_no_file_and_an_older_backup_stays(tmp_path):
    data = tmp_path / "data.qpdata"
    with pytest.raises(MemoryError), restore_on_failure(data):
        qupath_save(data, b"new objects", fail_after=3)
    assert not data.exists()
    old_backup = tmp_path / "data.qpdata.bkp"  # left by an earlier QuPath crash: not ours to delete
    old_backup.write_bytes(b"older")
    data.write_bytes(b"old objects")
    with pytest.raises(RuntimeError), restore_on_failure(data):
        data.write_bytes(b"half")
        raise RuntimeError("after the data")
    assert data.read_bytes() == b"old objects" and old_backup.read_bytes() == b"older"


def test_a_snapshot_left_by_a_killed_save_stops_the_next_one(tmp_path):
    data = tmp_path / "data.qpdata"
    data.write_bytes(b"maybe half")
    snapshot_path(data).write_bytes(b"old objects")
    stopped = pytest.raises(BridgeInputError, match="an earlier run was stopped while saving this image")
    with stopped, restore_on_failure(data):
        raise AssertionError("the save must not run")
    assert data.read_bytes() == b"maybe half" and snapshot_path(data).read_bytes() == b"old objects"


def test_no_file_to_guard_runs_the_body_as_it_is():
    with pytest.raises(KeyError), restore_on_failure(None):
        raise KeyError("x")
