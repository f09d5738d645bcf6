"""Tile planning, and the proof that tile-by-tile segmentation of a real
pyramidal TIFF gives exactly the whole-image answer, also at tile borders."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch

from bridge.evaluation.clicks import simulate_clicks
from bridge.io.coords import patch_origin
from bridge.io.imageio import ArrayReader, open_image
from bridge.model.network import NuClickNet
from bridge.model.weights import ModelInfo
from bridge.nuclick.engine import NuClickEngine
from bridge.nuclick.tiling import TileReader, guidance_reach, plan_tiles
from bridge.results import Click


def write_pyramid(path, image: np.ndarray) -> None:
    with tifffile.TiffWriter(path) as tif:
        tif.write(image, tile=(128, 128), photometric="rgb", compression="zlib", subifds=1)
        tif.write(image[::2, ::2], tile=(128, 128), photometric="rgb", compression="zlib", subfiletype=1)


@pytest.fixture(scope="module")
def clicks_and_image(monuseg_pair):
    img, lab = monuseg_pair
    img, lab = np.ascontiguousarray(img[:600, :700]), lab[:600, :700]
    xy, _ = simulate_clicks(lab, jitter=3, seed=2)
    clicks = [Click(float(x), float(y), str(i)) for i, (x, y) in enumerate(xy)]
    return img, clicks


def test_plan_covers_every_click_once_with_its_patch_and_neighbours(clicks_and_image):
    img, clicks = clicks_and_image
    h, w = img.shape[:2]
    clicks = [*clicks, Click(-5.0, 10.0, "off")]
    tiles = plan_tiles(clicks, w, h, patch_size=128, sigma=2.0, max_tile=320)
    members = [k for t in tiles for k in t.members]
    assert sorted(members) == list(range(len(clicks) - 1))  # each on-image click once, the off one nowhere
    assert len(tiles) > 4
    xy = np.array([[c.x, c.y] for c in clicks])
    reach = guidance_reach(128, 2.0)
    for t in tiles:
        assert t.width <= 320 and t.height <= 320
        for k in t.members:
            ox, oy = patch_origin(*xy[k], 128)
            assert max(ox, 0) >= t.x0 and max(oy, 0) >= t.y0
            assert min(ox + 128, w) <= t.x0 + t.width and min(oy + 128, h) <= t.y0 + t.height
        near = {j for k in t.members for j in range(len(clicks)) if np.max(np.abs(xy[j] - xy[k])) <= reach} - set(
            t.members
        )
        assert near <= set(t.context)


def test_tile_reader_refuses_windows_outside_its_tile():
    r = TileReader(np.ones((10, 10, 3), np.uint8), (5, 5), 100, 100)
    assert r.read_region(5, 5, 10, 10).all()
    with pytest.raises(ValueError):
        r.read_region(0, 0, 10, 10)
    edge = TileReader(np.ones((10, 10, 3), np.uint8), (0, 0), 10, 10)
    out = edge.read_region(-3, -3, 6, 6)  # off the image: zeros, like the full reader
    assert not out[:3].any() and out[3:, 3:].all()


def test_tiled_tiff_equals_whole_image(tmp_path, clicks_and_image):
    img, clicks = clicks_and_image
    path = tmp_path / "slide.tif"
    write_pyramid(path, img)
    torch.manual_seed(3)
    engine = NuClickEngine(NuClickNet(0.125), ModelInfo("rand", "t", "", 0.125, threshold=0.5), device="cpu")
    whole = engine.segment(ArrayReader(img), clicks)
    with open_image(path) as reader:
        tiled = engine.segment_tiled(reader, clicks, max_tile=256)
    tiles = plan_tiles(clicks, img.shape[1], img.shape[0], 128, 2.0, 256)
    assert len(tiles) >= 9
    found = 0
    for a, b in zip(whole.results, tiled.results, strict=True):
        assert a.found == b.found
        if a.found:
            found += 1
            assert a.polygon.equals(b.polygon) and a.score == pytest.approx(b.score)
    assert found > len(clicks) // 4  # enough found nuclei for the comparison to mean something
