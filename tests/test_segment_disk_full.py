"""``segment --out`` on a file system that cannot take the output: refused
before any compute when the free space is plainly too small, and, when the
disk fills during the run, one readable line and a non-zero exit, never
"internal error", and no file or temp file left behind.

The file systems are real: small tmpfs mounts (skipped where this process
may not mount)."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

import bridge.commands.segment as segment_command
from bridge.commands.common import disk_errors
from bridge.errors import BridgeInputError
from bridge.evaluation.clicks import simulate_clicks


@contextlib.contextmanager
def tmpfs(where: Path, size: str, *options: str) -> Iterator[Path]:
    """A real tmpfs of ``size`` mounted at ``where``; skips the test where
    mounting is not allowed."""
    where.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    opts = ",".join((f"size={size}", *options))
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.fixture
def case(crop_pair, tmp_path) -> tuple[list[str], int]:
    """A real crop and its clicks: the command line up to --out, and the click count."""
    img, lab = crop_pair
    Image.fromarray(img).save(tmp_path / "crop.png")
    xy, _ = simulate_clicks(lab, jitter=0, seed=0)
    (tmp_path / "c.csv").write_text("x,y\n" + "".join(f"{x:.2f},{y:.2f}\n" for x, y in xy))
    base = ["segment", str(tmp_path / "crop.png"), "--points", str(tmp_path / "c.csv"), "--method", "watershed"]
    return base, len(xy)


def one_error_line(proc, needle: str) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if "error" in ln]
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert "internal error" not in proc.stderr and "Traceback" not in proc.stderr
    return lines[0]


def test_too_little_free_space_is_refused_before_any_compute(case, tmp_path, cli, monkeypatch):
    base, n = case
    assert segment_command.output_bytes(n) > 64 << 10  # the clicks' outlines cannot fit in 64 KiB
    monkeypatch.setattr(
        segment_command, "make_segmenter", lambda args: pytest.fail("segmented before the free space was checked")
    )
    with tmpfs(tmp_path / "small", "64k") as small:
        line = one_error_line(cli(*base, "--out", small / "o.geojson"), "not enough free space for --out")
        assert f"{n} clicks" in line and "choose another --out" in line
        assert list(small.iterdir()) == []


def test_a_read_only_file_system_is_refused_before_any_compute(case, tmp_path, cli, monkeypatch):
    base, _ = case
    monkeypatch.setattr(
        segment_command, "make_segmenter", lambda args: pytest.fail("segmented before --out was checked")
    )
    with tmpfs(tmp_path / "ro", "1m", "ro") as ro:
        one_error_line(cli(*base, "--out", ro / "o.geojson"), "Read-only file system")


def fill(directory: Path) -> None:
    """Write a real file in ``directory`` until its file system says ENOSPC."""
    with open(directory / "filler", "wb", buffering=0) as fh:
        chunk = b"\0" * 4096
        while True:
            try:
                fh.write(chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                return


@pytest.mark.parametrize("when", ["first", "last"])
def test_a_disk_that_fills_during_the_run_is_one_clear_line_and_leaves_nothing(case, tmp_path, cli, monkeypatch, when):
    """Another program fills the disk while the image is segmented: after the
    first nucleus (the spool's writes fail) or after the last (the final
    file's write fails)."""
    base, n = case
    real = segment_command.make_segmenter
    with tmpfs(tmp_path / "disk", "2m") as disk:
        assert segment_command.output_bytes(n) < 2 << 20  # the up-front check lets it start

        class FillsTheDisk:
            def __init__(self, inner) -> None:
                self.inner = inner

            def iter_tiled(self, *a, **kw):
                items = list(self.inner.iter_tiled(*a, **kw))
                for k, item in enumerate(items):
                    if when == "first" and k == 1:
                        fill(disk)
                    yield item
                if when == "last":
                    fill(disk)

        monkeypatch.setattr(segment_command, "make_segmenter", lambda args: FillsTheDisk(real(args)))
        out = disk / "nuclei.geojson"
        line = one_error_line(cli(*base, "--out", out), f"no space left on device writing {out}")
        assert "free some space or choose another --out" in line
        assert sorted(p.name for p in disk.iterdir()) == ["filler"]  # no output, no temp or spool file


@pytest.mark.parametrize(
    ("code", "words"),
    [
        (errno.ENOSPC, "no space left on device writing x.geojson: free some space or choose another --out"),
        (errno.EDQUOT, "disk quota exceeded writing x.geojson: free some space or choose another --out"),
        (errno.EROFS, "read-only file system writing x.geojson: choose another --out"),
    ],
)
def test_disk_errors_name_the_file_and_the_fix(code, words):
    with pytest.raises(BridgeInputError) as info, disk_errors("x.geojson"):
        raise OSError(code, os.strerror(code))
    assert str(info.value) == words
    with pytest.raises(PermissionError), disk_errors("x.geojson"):  # anything else is not ours to rename
        raise PermissionError(errno.EACCES, "Permission denied")
