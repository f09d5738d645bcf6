"""OMERO pixels from raw tiles: edges, pyramids, channel stacking, bad pixel types (no omero-py needed)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from bridge.connectors.omero.pixels import OmeroPixelsReader, check_rgb8, full_resolution_level, tile_grid
from bridge.errors import BridgeInputError
from bridge.io.imageio import ArrayReader


def make_pyramid(rgb: np.ndarray, n_levels: int) -> list[np.ndarray]:
    """Levels of a pyramid in OMERO's order: index 0 is the smallest, the last is full resolution."""
    levels = [rgb]
    for _ in range(n_levels - 1):
        levels.append(np.ascontiguousarray(levels[-1][::2, ::2]))
    return levels[::-1]


class TileStore:
    """A RawPixelsStore over in-memory planes {(z, t): pyramid}, recording every getTile."""

    def __init__(self, planes: dict[tuple[int, int], list[np.ndarray]], tile=(256, 256), sizes=None):
        self.planes = planes
        self.tile = tile
        self.sizes = sizes  # override getResolutionDescriptions (to test the size check)
        self.level = None
        self.pixels_id = None
        self.calls: list[tuple] = []
        self.closed = False

    def setPixelsId(self, pid, bypass, ctx=None):
        self.pixels_id = pid

    def getResolutionLevels(self):
        return len(next(iter(self.planes.values())))

    def setResolutionLevel(self, level):
        self.level = level

    def getResolutionDescriptions(self):
        levels = next(iter(self.planes.values()))
        sizes = self.sizes or [(a.shape[1], a.shape[0]) for a in levels[::-1]]
        return [SimpleNamespace(sizeX=w, sizeY=h) for w, h in sizes]

    def getTileSize(self):
        return list(self.tile)

    def getTile(self, z, c, t, x, y, w, h):
        arr = self.planes[(z, t)][self.level]
        assert x >= 0 and y >= 0 and x + w <= arr.shape[1] and y + h <= arr.shape[0], "tile outside the plane"
        self.calls.append((z, c, t, x, y, w, h))
        return arr[y : y + h, x : x + w, c].tobytes()

    def close(self):
        self.closed = True


@pytest.fixture(scope="module")
def rgb(monuseg_pair) -> np.ndarray:
    img, _ = monuseg_pair
    return np.ascontiguousarray(img[:700, :900])  # not a multiple of the tile size


WINDOWS = [
    (0, 0, 64, 64),  # top-left corner
    (250, 250, 20, 20),  # across four tiles
    (-30, -40, 100, 90),  # partly off the image (zero-filled)
    (850, 650, 128, 128),  # bottom-right edge tiles (partial)
    (880, 10, 60, 30),  # right edge
    (2000, 2000, 16, 16),  # completely off the image
    (0, 0, 900, 700),  # the whole image
]


@pytest.mark.parametrize("n_levels", [1, 3])
def test_windows_equal_the_image(rgb, n_levels):
    store = TileStore({(0, 0): make_pyramid(rgb, n_levels)}, tile=(256, 200))
    expected = ArrayReader(rgb)
    with OmeroPixelsReader(store, 7, 900, 700) as reader:
        assert store.level == n_levels - 1  # the full-resolution level, not level 0
        for win in WINDOWS:
            np.testing.assert_array_equal(reader.read_region(*win), expected.read_region(*win))
        for *_, x, y, w, h in store.calls:
            assert w <= 256 and h <= 200 and x % 256 == 0 and y % 200 == 0  # the server's own tiles
    assert store.closed


def test_each_tile_fetched_once_and_never_the_whole_plane(rgb):
    store = TileStore({(0, 0): make_pyramid(rgb, 2)}, tile=(128, 128))
    reader = OmeroPixelsReader(store, 7, 900, 700)
    reader.read_region(100, 100, 128, 128)
    reader.read_region(110, 120, 128, 128)  # the same four tiles: served from the cache
    assert len({(x, y) for *_, x, y, _, _ in store.calls}) == 4
    assert len(store.calls) == 4 * 3  # three channels per tile, each fetched once
    assert {c for _, c, *_ in store.calls} == {0, 1, 2}
    assert sum(w * h for *_, w, h in store.calls) < rgb.nbytes / 4  # bytes over the wire: 4 tiles, not the plane
    reader.close()


def test_planes_are_read_from_their_z_and_t(rgb):
    other = np.ascontiguousarray(255 - rgb)
    store = TileStore({(0, 0): [rgb], (1, 2): [other]})
    with OmeroPixelsReader(store, 7, 900, 700, z=1, t=2) as reader:
        np.testing.assert_array_equal(reader.read_region(5, 5, 40, 40), other[5:45, 5:45])
    assert {(z, t) for z, _, t, *_ in store.calls} == {(1, 2)}


def test_pyramid_size_mismatch_is_refused(rgb):
    store = TileStore({(0, 0): make_pyramid(rgb, 2)}, sizes=[(450, 350), (900, 700)])  # wrong order
    with pytest.raises(BridgeInputError, match="full-resolution level is 450 x 350"):
        OmeroPixelsReader(store, 7, 900, 700)
    assert store.closed


def test_short_tile_is_an_error(rgb):
    store = TileStore({(0, 0): [rgb]})
    store.getTile = lambda *a: b"\0" * 10
    with OmeroPixelsReader(store, 7, 900, 700) as reader, pytest.raises(BridgeInputError, match="10 bytes"):
        reader.read_region(0, 0, 10, 10)


def test_helpers():
    assert full_resolution_level(1) == 0 and full_resolution_level(5) == 4
    assert list(tile_grid(0, 256, 256)) == [0]
    assert list(tile_grid(255, 257, 256)) == [0, 1]
    check_rgb8(3, "uint8")
    with pytest.raises(BridgeInputError, match="uint16 pixels and 1 channel"):
        check_rgb8(1, "uint16", "image 5")
    with pytest.raises(BridgeInputError, match="4 channel"):
        check_rgb8(4, "uint8")
