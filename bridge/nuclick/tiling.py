"""Reading pixels only around the clicks, each tile once.

Whole-slide jobs (the connectors, ``segment`` on a pyramidal TIFF) group
nearby clicks into level-0 tiles.  A tile covers the patch of every click it
segments (its *members*), and the clicks whose exclusion Gaussians reach into
those patches (its *context*) are passed along, so a nucleus at a tile border
gets exactly the polygon it would get with the whole image in memory.
Overlaps between neighbours are resolved once, over all tiles.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree
from tqdm import tqdm

from bridge.io.coords import patch_origin
from bridge.io.imageio import RegionReader, WindowedReader
from bridge.nuclick.postprocess import PatchMask, keep_seed_component
from bridge.results import Click

DEFAULT_MAX_TILE = 2048


@dataclass(frozen=True)
class Tile:
    """A level-0 window (clipped to the image) and the clicks it serves."""

    x0: int
    y0: int
    width: int
    height: int
    members: tuple[int, ...]
    context: tuple[int, ...]


def guidance_reach(patch_size: int, sigma: float) -> float:
    """How far (Chebyshev, px) a neighbour's click may be from a click and
    still put exclusion signal into its patch."""
    return patch_size / 2 + 4 * sigma + 1


def plan_tiles(
    clicks: Sequence[Click],
    width: int,
    height: int,
    patch_size: int = 128,
    sigma: float = 2.0,
    max_tile: int = DEFAULT_MAX_TILE,
) -> list[Tile]:
    """Group the on-image clicks into tiles of at most ``max_tile`` px a side.

    Clicks are binned on a grid whose cells leave room for one patch margin on
    each side; each tile is the bounding box of its members' patches, clipped
    to the image.  Clicks off the image are in no tile (the segmenter reports
    them as not found).
    """
    if max_tile < 2 * patch_size:
        raise ValueError(f"max_tile must be at least {2 * patch_size}")
    xy = np.array([[c.x, c.y] for c in clicks], dtype=np.float64).reshape(-1, 2)
    on_image = np.nonzero((xy[:, 0] >= 0) & (xy[:, 0] < width) & (xy[:, 1] >= 0) & (xy[:, 1] < height))[0]
    cell = max_tile - patch_size
    bins: dict[tuple[int, int], list[int]] = defaultdict(list)
    for k in on_image.tolist():
        bins[(math.floor(xy[k, 0] / cell), math.floor(xy[k, 1] / cell))].append(k)
    tree = cKDTree(xy) if len(xy) else None
    reach = guidance_reach(patch_size, sigma)
    tiles = []
    for key in sorted(bins):
        members = bins[key]
        origins = np.array([patch_origin(xy[k, 0], xy[k, 1], patch_size) for k in members])
        x0 = max(0, int(origins[:, 0].min()))
        y0 = max(0, int(origins[:, 1].min()))
        x1 = min(width, int(origins[:, 0].max()) + patch_size)
        y1 = min(height, int(origins[:, 1].max()) + patch_size)
        near: set[int] = set()
        for found in tree.query_ball_point(xy[members], r=reach, p=np.inf):
            near.update(found)
        context = tuple(sorted(near - set(members)))
        tiles.append(Tile(x0, y0, x1 - x0, y1 - y0, tuple(members), context))
    return tiles


class TileReader(WindowedReader):
    """A RegionReader over one tile read into memory, answering in level-0
    coordinates; pixels off the image are zero, as from the full reader."""

    def __init__(self, pixels: np.ndarray, origin: tuple[int, int], width: int, height: int) -> None:
        self.pixels = pixels
        self.x0, self.y0 = origin
        self.width, self.height = width, height

    def _read_inside(self, xs: int, ys: int, xe: int, ye: int) -> np.ndarray:
        th, tw = self.pixels.shape[:2]
        if xs < self.x0 or ys < self.y0 or xe > self.x0 + tw or ye > self.y0 + th:
            raise ValueError(f"window ({xs}, {ys})-({xe}, {ye}) is not inside the tile at ({self.x0}, {self.y0})")
        return self.pixels[ys - self.y0 : ye - self.y0, xs - self.x0 : xe - self.x0]


def iter_tiles(reader: RegionReader, tiles: Sequence[Tile], progress: bool = False):
    """(tile, TileReader) pairs, each tile's pixels read exactly once."""
    for tile in tqdm(tiles, desc="tiles", unit="tile", disable=not progress, leave=False):
        pixels = reader.read_region(tile.x0, tile.y0, tile.width, tile.height)
        yield tile, TileReader(pixels, (tile.x0, tile.y0), reader.width, reader.height)


class OverlapStream:
    """Overlap resolution done as the masks arrive, so that a whole-slide run
    holds only the masks still waiting for a neighbour, not one per click.

    Why it gives exactly :func:`bridge.nuclick.postprocess.resolve_overlaps`'s
    answer: a nucleus's final mask depends only on its own raw mask and on the
    raw masks of the nuclei whose windows intersect it, and two windows can
    only intersect when the clicks' patches overlap.  So a nucleus is final
    as soon as every click whose patch overlaps its patch has a raw mask, and
    a raw mask can be dropped once each of those neighbours is final.
    Pixels claimed by two nuclei go to the higher probability, ties to the
    lower click index, as in ``resolve_overlaps``.

    ``expected``: indices of the clicks that will get a mask (the on-image
    ones); :meth:`add` returns the ``(index, final PatchMask)`` pairs it made final.
    """

    def __init__(
        self,
        clicks: Sequence[Click],
        expected: Sequence[int],
        patch_size: int,
        min_size: int,
    ) -> None:
        self.min_size = min_size
        n = len(clicks)
        chosen = np.unique(np.asarray(expected, dtype=np.int64))
        self._expected = np.zeros(n, dtype=bool)
        self._expected[chosen] = True
        # Who overlaps whom, as compressed rows (numpy, not a list per click: 50,000
        # clicks have about a million neighbour entries).
        src = dst = np.zeros(0, dtype=np.int64)
        if len(chosen) > 1:
            origins = np.array([patch_origin(clicks[k].x, clicks[k].y, patch_size) for k in chosen], np.float64)
            # Patches overlap iff their origins differ by less than a patch in x and y.
            pairs = cKDTree(origins).query_pairs(r=patch_size - 0.5, p=np.inf, output_type="ndarray")
            a, b = chosen[pairs[:, 0]], chosen[pairs[:, 1]]
            src, dst = np.concatenate([a, b]), np.concatenate([b, a])
        order = np.lexsort((dst, src))
        self._indices = dst[order].astype(np.int32 if n < 2**31 else np.int64)
        degree = np.bincount(src, minlength=n)
        self._indptr = np.concatenate([[0], np.cumsum(degree)])
        self._raw: dict[int, PatchMask] = {}  # index -> cropped raw PatchMask, while a neighbour may need it
        self._received = np.zeros(n, dtype=bool)
        self._waiting = (degree + 1).astype(np.int32)  # raw masks still missing for this nucleus to be final
        self._unfinished = (degree + 1).astype(np.int32)  # it and its neighbours not yet final

    def _neighbours(self, k: int) -> list[int]:
        return self._indices[self._indptr[k] : self._indptr[k + 1]].tolist()

    @property
    def held(self) -> int:
        """Raw masks held now (what bounds memory)."""
        return len(self._raw)

    def add(self, k: int, pm: PatchMask) -> list[tuple[int, PatchMask]]:
        """Take click ``k``'s raw (uncropped) mask; the nuclei that became final."""
        if not (0 <= k < len(self._expected) and self._expected[k]) or self._received[k]:
            raise ValueError(f"click {k} was not expected or came twice")
        self._received[k] = True
        self._raw[k] = pm.cropped()
        done = []
        for j in (k, *self._neighbours(k)):
            self._waiting[j] -= 1
            if self._waiting[j] == 0:
                done.append((j, self._final(j)))
        for j, _ in done:
            for i in (j, *self._neighbours(j)):
                self._unfinished[i] -= 1
                if self._unfinished[i] == 0:
                    del self._raw[i]
        return done

    def _final(self, k: int) -> PatchMask:
        it = self._raw[k]
        ax0, ay0, ax1, ay1 = it.box()
        lost = None
        for j in self._neighbours(k):
            other = self._raw[j]
            bx0, by0, bx1, by1 = other.box()
            x0, y0, x1, y1 = max(ax0, bx0), max(ay0, by0), min(ax1, bx1), min(ay1, by1)
            if x1 <= x0 or y1 <= y0:
                continue
            ra = (slice(y0 - ay0, y1 - ay0), slice(x0 - ax0, x1 - ax0))
            rb = (slice(y0 - by0, y1 - by0), slice(x0 - bx0, x1 - bx0))
            both = it.mask[ra] & other.mask[rb]
            if not both.any():
                continue
            pa, pb = it.prob[ra], other.prob[rb]
            wins = (pa > pb) | ((pa == pb) & (k < j))
            if lost is None:
                lost = np.zeros_like(it.mask)
            lost[ra] |= both & ~wins
        if lost is None or not lost.any():
            return it
        kept = keep_seed_component(it.mask & ~lost, it.seed)
        if kept.sum() < self.min_size:
            kept = np.zeros_like(kept)
        return PatchMask(it.origin, kept, it.prob, it.seed)

    def pending(self) -> list[int]:
        """Clicks still waiting for a neighbour's mask (empty after the last tile)."""
        return np.flatnonzero(self._expected & (self._waiting > 0)).tolist()
