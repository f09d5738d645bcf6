"""Level-0 RGB pixels of one OMERO plane, fetched tile by tile (no omero-py import).

Why tiles: a whole-slide image in OMERO is a pyramid of tens of gigapixels;
NuClick only looks at a window around each click.  :class:`OmeroPixelsReader`
is a :class:`~bridge.io.imageio.RegionReader` over a RawPixelsStore: a window is
assembled from the server's own tiles (``getTileSize``), the three channels of
an RGB image fetched separately (OMERO stores them as channels 0, 1, 2) and
stacked, and recently used tiles are kept in a small cache so neighbouring
windows do not fetch a tile twice.  The whole plane is never requested.

The pyramid's full-resolution level is selected explicitly: OMERO numbers
resolution levels from the *smallest* (0) to the full resolution
(``getResolutionLevels() - 1``), while ``getResolutionDescriptions()`` lists
them the other way round (index 0 = full resolution).

The store is duck-typed; it needs ``setPixelsId``, ``getResolutionLevels``,
``setResolutionLevel``, ``getResolutionDescriptions``, ``getTileSize``,
``getTile`` and ``close``.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Any

import numpy as np

from bridge.errors import BridgeInputError
from bridge.io.imageio import WindowedReader

RGB_CHANNELS = (0, 1, 2)
MAX_TILE_SIDE = 2048  # a server announcing bigger "tiles" (untiled formats) is asked for this much at most
CACHE_BYTES = 64 * 2**20


def full_resolution_level(n_levels: int) -> int:
    """OMERO's resolution-level index of the full-resolution image."""
    return max(int(n_levels), 1) - 1


def check_rgb8(size_c: int, pixels_type: str, name: str = "image") -> None:
    """Refuse what NuClick was not trained on, with a readable reason."""
    ptype = (pixels_type or "").lower()
    problems = []
    if ptype != "uint8":
        problems.append(f"{ptype or 'unknown'} pixels")
    if size_c != 3:
        problems.append(f"{size_c} channel(s)")
    if problems:
        raise BridgeInputError(f"{name} has {' and '.join(problems)}; NuClick needs 8-bit RGB (uint8, 3 channels)")


def tile_grid(start: int, stop: int, tile: int) -> range:
    """Indices of the tiles of side ``tile`` that cover pixels [start, stop)."""
    return range(start // tile, (stop - 1) // tile + 1)


class OmeroPixelsReader(WindowedReader):
    """RGB level-0 pixels of plane (z, t) of one OMERO Pixels object.

    ``store`` is a RawPixelsStore proxy (``conn.createRawPixelsStore()``);
    the reader opens it on ``pixels_id``, selects the full-resolution level,
    checks that level's size against (``width``, ``height``), and closes the
    store in :meth:`close`.  ``ctx`` (e.g. ``conn.SERVICE_OPTS``) is passed to
    ``setPixelsId`` so that the store opens in the image's group.
    """

    def __init__(
        self,
        store: Any,
        pixels_id: int,
        width: int,
        height: int,
        z: int = 0,
        t: int = 0,
        ctx: Any = None,
        cache_bytes: int = CACHE_BYTES,
    ) -> None:
        self.store = store
        self.width, self.height = int(width), int(height)
        self.z, self.t = int(z), int(t)
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cache_bytes = int(cache_bytes)
        self._cached = 0
        try:
            if ctx is None:
                store.setPixelsId(int(pixels_id), True)
            else:
                store.setPixelsId(int(pixels_id), True, ctx)
            n_levels = int(store.getResolutionLevels())
            self.level = full_resolution_level(n_levels)
            store.setResolutionLevel(self.level)
            if n_levels > 1:
                full = store.getResolutionDescriptions()[0]
                size = (int(full.sizeX), int(full.sizeY))
                if size != (self.width, self.height):
                    raise BridgeInputError(
                        f"pixels {pixels_id}: the pyramid's full-resolution level is {size[0]} x {size[1]}, "
                        f"but the image is {self.width} x {self.height}"
                    )
            tw, th = (int(v) for v in store.getTileSize())
        except BaseException:
            self.close()
            raise
        if tw < 1 or th < 1:
            raise BridgeInputError(f"pixels {pixels_id}: the server reports a tile size of {tw} x {th}")
        self.tile_w, self.tile_h = min(tw, MAX_TILE_SIDE), min(th, MAX_TILE_SIDE)

    def _tile(self, tx: int, ty: int) -> np.ndarray:
        key = (tx, ty)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        x, y = tx * self.tile_w, ty * self.tile_h
        w, h = min(self.tile_w, self.width - x), min(self.tile_h, self.height - y)
        planes = []
        for c in RGB_CHANNELS:
            raw = self.store.getTile(self.z, c, self.t, x, y, w, h)
            if len(raw) != w * h:
                raise BridgeInputError(
                    f"the server sent {len(raw)} bytes for a {w} x {h} uint8 tile at ({x}, {y}), channel {c}"
                )
            planes.append(np.frombuffer(raw, dtype=np.uint8).reshape(h, w))
        tile = np.stack(planes, axis=-1)
        self._cache[key] = tile
        self._cached += tile.nbytes
        while self._cached > self._cache_bytes and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cached -= old.nbytes
        return tile

    def _read_inside(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        out = np.empty((y1 - y0, x1 - x0, 3), dtype=np.uint8)
        for ty in tile_grid(y0, y1, self.tile_h):
            for tx in tile_grid(x0, x1, self.tile_w):
                tile = self._tile(tx, ty)
                ox, oy = tx * self.tile_w, ty * self.tile_h
                xa, ya = max(x0, ox), max(y0, oy)
                xb, yb = min(x1, ox + tile.shape[1]), min(y1, oy + tile.shape[0])
                out[ya - y0 : yb - y0, xa - x0 : xb - x0] = tile[ya - oy : yb - oy, xa - ox : xb - ox]
        return out

    def close(self) -> None:
        store, self.store = getattr(self, "store", None), None
        self._cache = OrderedDict()
        self._cached = 0
        if store is not None:
            with contextlib.suppress(Exception):  # a dropped connection must not hide the error that closed us
                store.close()
