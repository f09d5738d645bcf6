"""A whole-slide run holds memory bounded by the tiles in flight, not by the clicks.

Today's answer must not change: overlaps resolved as masks arrive equal the
whole-image resolution, and the GeoJSON written as results arrive equals the
one written at the end.  The bound itself is measured on a real tiled JPEG
pyramid (MoNuSeg crops, clicks in their real nuclei) in a child process,
with ``getrusage``: the peak for 5,000 clicks is the peak for 500 plus a
little, where keeping every click's patch mask cost about 0.1 MB a click.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bridge.evaluation.clicks import simulate_clicks
from bridge.evaluation.watershed import WatershedSegmenter
from bridge.io.geojson import GeoJsonSpool, write_geojson
from bridge.io.imageio import ArrayReader
from bridge.nuclick.postprocess import resolve_overlaps
from bridge.nuclick.segmentation import nucleus_result
from bridge.nuclick.tiling import OverlapStream, plan_tiles
from bridge.results import Click
from support.slides import load_sources, slide_clicks, write_clicks_csv, write_slide

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def crowded(monuseg_pair):
    """A real image with two jittered clicks on every nucleus: many overlaps."""
    img, lab = monuseg_pair
    img, lab = np.ascontiguousarray(img[:500, :600]), lab[:500, :600]
    xy = np.concatenate([simulate_clicks(lab, jitter=4, seed=s)[0] for s in (1, 2)])
    clicks = [Click(float(x), float(y), str(k)) for k, (x, y) in enumerate(xy)]
    return img, clicks


def test_overlaps_resolved_as_masks_arrive_equal_the_whole_resolution(crowded):
    img, clicks = crowded
    seg = WatershedSegmenter()
    raw = dict(seg.iter_patches(ArrayReader(img), clicks, range(len(clicks))))
    keys = sorted(raw)
    expected = dict(zip(keys, resolve_overlaps([raw[k].cropped() for k in keys], seg.min_size), strict=True))
    changed = sum(not np.array_equal(expected[k].mask, raw[k].cropped().mask) for k in keys)
    assert changed > 20  # the case exercises the resolution, not just copies masks through

    # Masks arrive tile by tile, as a slide run delivers them.
    tiles = plan_tiles(clicks, img.shape[1], img.shape[0], seg.patch_size, seg.guidance_sigma, max_tile=256)
    stream = OverlapStream(clicks, keys, seg.patch_size, seg.min_size)
    got = {}
    for tile in tiles:
        for k in tile.members:
            for j, pm in stream.add(k, raw[k]):
                assert j not in got
                got[j] = pm
    assert sorted(got) == keys and not stream.pending() and stream.held == 0  # every raw mask released
    for k in keys:
        a, b = expected[k], got[k]
        assert a.origin == b.origin and np.array_equal(a.mask, b.mask) and np.array_equal(a.prob, b.prob)
        ra, rb = nucleus_result(clicks[k], a, 0.5), nucleus_result(clicks[k], b, 0.5)
        assert ra.found == rb.found and (not ra.found or ra.polygon.equals_exact(rb.polygon, 0))

    # Any arrival order gives the same answer (ties go to the lower click index).
    stream = OverlapStream(clicks, keys, seg.patch_size, seg.min_size)
    shuffled = {}
    for k in np.random.default_rng(0).permutation(keys):
        shuffled.update(stream.add(int(k), raw[int(k)]))
    assert all(np.array_equal(shuffled[k].mask, expected[k].mask) for k in keys)


def test_segment_tiled_streams_the_whole_image_answer(crowded):
    img, clicks = crowded
    seg = WatershedSegmenter()
    whole = seg.segment(ArrayReader(img), clicks)
    seen = {}
    for k, result, pm in seg.iter_tiled(ArrayReader(img), clicks, max_tile=256):
        assert k not in seen and pm is None  # no masks unless asked: nothing kept per nucleus
        seen[k] = result
    assert sorted(seen) == list(range(len(clicks)))
    for k, a in enumerate(whole.results):
        b = seen[k]
        assert a.found == b.found and a.reason == b.reason
        if a.found:
            assert a.polygon.equals_exact(b.polygon, 0) and a.score == b.score


def _without_ids(text: str) -> str:
    return re.sub(r'"id": "[0-9a-f-]{36}"', '"id": "-"', text)


def test_geojson_written_as_results_arrive_equals_the_one_written_at_once(crowded, tmp_path):
    img, clicks = crowded
    results = WatershedSegmenter().segment(ArrayReader(img), clicks).results
    assert 0 < sum(r.found for r in results) < len(results)
    collection = {"type": "FeatureCollection", "features": []}
    from bridge.io.geojson import result_to_feature

    collection["features"] = [result_to_feature(r) for r in results if r.found]
    at_once = json.dumps(collection, allow_nan=False) + "\n"  # what write_geojson wrote before
    with GeoJsonSpool(tmp_path / "s.geojson", len(results)) as spool:
        for k in np.random.default_rng(1).permutation(len(results)):
            spool.add(int(k), results[int(k)])
        assert not (tmp_path / "s.geojson").exists()  # nothing at --out until the run is complete
        n = spool.commit()
    assert n == len(collection["features"])
    assert _without_ids((tmp_path / "s.geojson").read_text()) == _without_ids(at_once)
    write_geojson(tmp_path / "w.geojson", iter(results))
    assert _without_ids((tmp_path / "w.geojson").read_text()) == _without_ids(at_once)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no spool left behind


def _peak_rss_mb(args: list[str], cwd: Path) -> tuple[float, dict]:
    """Peak RSS (MiB) of one ``nuclick-bridge`` run in a child process, and its summary line."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-m", "bridge.cli", *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = proc.stdout.read(), proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0, err.decode()[-2000:]
    return usage.ru_maxrss / 1024, json.loads(out.decode().strip().splitlines()[-1])


def test_segment_peak_memory_does_not_grow_with_the_number_of_clicks(data_root, tmp_path):
    sources = load_sources(data_root / "monuseg", n_images=4)
    slide = tmp_path / "slide.tif"
    write_slide(slide, 20000, sources)  # 20,000 x 20,000, JPEG tiles, six levels
    xy = slide_clicks(20000, sources, 5000, seed=3)
    peaks = {}
    for n in (500, 5000):
        write_clicks_csv(tmp_path / f"c{n}.csv", xy[:n])
        args = ["segment", str(slide), "--points", str(tmp_path / f"c{n}.csv"), "--method", "watershed"]
        peaks[n], summary = _peak_rss_mb([*args, "--out", str(tmp_path / f"o{n}.geojson")], tmp_path)
        assert summary["clicks"] == n and summary["found"] > 0.9 * n
    # Holding every click's patch mask grew the peak by ~440 MB from 500 to 5,000 clicks here.
    assert peaks[5000] - peaks[500] < 50, peaks
