"""From per-click patch masks to the engine's outputs: polygons in level-0
coordinates, explicit "not found" answers, and an instance map.  Shared by
every method (NuClick and the watershed baseline)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from bridge.errors import BridgeInputError
from bridge.io.coords import patch_origin, pixel_of
from bridge.io.imageio import RegionReader
from bridge.nuclick.polygons import mask_to_polygon
from bridge.nuclick.postprocess import MIN_OBJECT_PX, PatchMask, resolve_overlaps
from bridge.nuclick.tiling import DEFAULT_MAX_TILE, OverlapStream, guidance_reach, iter_tiles, plan_tiles
from bridge.results import Click, NucleusResult


@dataclass
class Segmentation:
    """Per-click results (same order as the clicks) and their masks."""

    results: list[NucleusResult]
    masks: list[PatchMask | None]  # cropped to each nucleus

    @classmethod
    def collect(cls, count: int, stream: Iterable[tuple[int, NucleusResult, PatchMask | None]]) -> Segmentation:
        """Click order from a tiled run's stream, whose ``(click index, result,
        mask)`` arrive in any order, one per click."""
        results: list[NucleusResult | None] = [None] * count
        masks: list[PatchMask | None] = [None] * count
        for k, result, mask in stream:
            results[k], masks[k] = result, mask
        assert all(r is not None for r in results)
        return cls(results, masks)  # type: ignore[arg-type]

    def instance_map(self, height: int, width: int, origin: tuple[int, int] = (0, 0)) -> np.ndarray:
        """uint32 map of the window (origin, height, width): 0 background,
        click ``k`` (0-based) painted as ``k + 1``.  Masks never overlap after
        resolution, so painting order does not matter."""
        out = np.zeros((height, width), dtype=np.uint32)
        for k, pm in enumerate(self.masks):
            if pm is None or not pm.mask.any():
                continue
            x0, y0 = pm.origin[0] - origin[0], pm.origin[1] - origin[1]
            h, w = pm.mask.shape
            ys, xs = max(0, y0), max(0, x0)
            ye, xe = min(height, y0 + h), min(width, x0 + w)
            if ye <= ys or xe <= xs:
                continue
            sub = pm.mask[ys - y0 : ye - y0, xs - x0 : xe - x0]
            out[ys:ye, xs:xe][sub] = k + 1
        return out


def build_results(
    clicks: Sequence[Click], masks: Sequence[PatchMask | None], reasons: dict[int, str], tolerance: float
) -> Segmentation:
    """Polygons and scores for found nuclei; a reason for every click without one."""
    results = []
    final: list[PatchMask | None] = []
    for k, (click, pm) in enumerate(zip(clicks, masks, strict=True)):
        if k in reasons:
            results.append(NucleusResult(click=click, found=False, reason=reasons[k]))
            final.append(None)
            continue
        result = nucleus_result(click, pm, tolerance)
        results.append(result)
        final.append(pm if result.found else None)
    return Segmentation(results, final)


def nucleus_result(click: Click, pm: PatchMask | None, tolerance: float) -> NucleusResult:
    """The polygon and score of one click's final mask, or why there is none."""
    if pm is None or not pm.mask.any():
        reason = "no nucleus found at this click (mask empty after post-processing)"
        return NucleusResult(click=click, found=False, reason=reason)
    poly = mask_to_polygon(pm.mask, pm.origin, tolerance)
    score = float(pm.prob[pm.mask].mean())
    return NucleusResult(click=click, found=True, polygon=poly, area_px=float(poly.area), score=score)


def outside_reasons(clicks: list[Click], width: int, height: int) -> dict[int, str]:
    """Clicks that cannot be segmented because they are not on the image."""
    return {
        k: f"click ({c.x:.1f}, {c.y:.1f}) is outside the image ({width} x {height})"
        for k, c in enumerate(clicks)
        if not (0 <= c.x < width and 0 <= c.y < height)
    }


def check_finite(clicks: Sequence[Click]) -> None:
    for k, c in enumerate(clicks):
        if not (math.isfinite(c.x) and math.isfinite(c.y)):
            raise BridgeInputError(f"click {c.id or k + 1} has a non-finite coordinate ({c.x}, {c.y})")


def valid_window(origin: tuple[int, int], size: int, width: int, height: int) -> np.ndarray:
    """Which pixels of the ``size`` x ``size`` patch at ``origin`` lie inside the image."""
    ox, oy = origin
    valid = np.zeros((size, size), dtype=bool)
    valid[max(0, -oy) : max(0, min(size, height - oy)), max(0, -ox) : max(0, min(size, width - ox))] = True
    return valid


@dataclass
class ClickPatch:
    """Everything a method needs about one click's patch."""

    index: int  # into the clicks
    origin: tuple[int, int]  # level-0 (x, y) of the patch's top-left pixel
    seed: tuple[int, int]  # (row, col) of the click's pixel in the patch
    rgb: np.ndarray  # (size, size, 3) uint8, zero outside the image
    valid: np.ndarray  # (size, size) bool, inside the image
    xy: np.ndarray  # (2,) level-0 click
    neighbours: np.ndarray  # (K, 2) level-0 xy of the other clicks within reach


def click_patches(
    reader: RegionReader, clicks: Sequence[Click], indices: Sequence[int], size: int, reach: float
) -> Iterator[ClickPatch]:
    """The patch of each click in ``indices``, read from ``reader``, with every
    other click of ``clicks`` within ``reach`` px (Chebyshev) as a neighbour."""
    xy = np.array([[c.x, c.y] for c in clicks], dtype=np.float64).reshape(-1, 2)
    tree = cKDTree(xy) if len(xy) else None
    for k in indices:
        ox, oy = patch_origin(xy[k, 0], xy[k, 1], size)
        col, row = pixel_of(xy[k, 0], xy[k, 1])
        near = [j for j in tree.query_ball_point(xy[k], r=reach, p=np.inf) if j != k]
        yield ClickPatch(
            k,
            (ox, oy),
            (row - oy, col - ox),
            reader.read_region(ox, oy, size, size),
            valid_window((ox, oy), size, reader.width, reader.height),
            xy[k],
            xy[near].reshape(-1, 2),
        )


class PatchSegmenter:
    """What every method shares: one patch per click, masks resolved against
    each other, polygons out; whole images or tile by tile.

    Subclasses implement :meth:`iter_patches`.
    """

    patch_size: int = 128
    guidance_sigma: float = 0.0  # neighbours' clicks reach 4 sigma beyond the patch
    min_size: int = MIN_OBJECT_PX
    tolerance: float = 0.5

    def iter_patches(
        self, reader: RegionReader, clicks: Sequence[Click], indices: Sequence[int], progress: bool = False
    ) -> Iterator[tuple[int, PatchMask]]:
        """(index into ``clicks``, cleaned patch mask) for each of ``indices``;
        every click in ``clicks`` may act as a neighbour."""
        raise NotImplementedError

    def click_patches(
        self, reader: RegionReader, clicks: Sequence[Click], indices: Sequence[int]
    ) -> Iterator[ClickPatch]:
        """Patches of ``indices`` with the neighbours whose guidance reaches them."""
        reach = guidance_reach(self.patch_size, self.guidance_sigma)
        return click_patches(reader, clicks, indices, self.patch_size, reach)

    def finish(self, clicks: list[Click], masks: dict[int, PatchMask], reasons: dict[int, str]) -> Segmentation:
        keys = sorted(masks)
        resolved = resolve_overlaps([masks[k].cropped() for k in keys], self.min_size)
        full: list[PatchMask | None] = [None] * len(clicks)
        for k, pm in zip(keys, resolved, strict=True):
            full[k] = pm
        return build_results(clicks, full, reasons, self.tolerance)

    def segment(self, reader: RegionReader, clicks: Sequence[Click], progress: bool = False) -> Segmentation:
        """One result per click, in click order, reading each patch from ``reader``."""
        clicks = list(clicks)
        check_finite(clicks)
        reasons = outside_reasons(clicks, reader.width, reader.height)
        todo = [k for k in range(len(clicks)) if k not in reasons]
        masks = dict(self.iter_patches(reader, clicks, todo, progress))
        return self.finish(clicks, masks, reasons)

    def segment_tiled(
        self,
        reader: RegionReader,
        clicks: Sequence[Click],
        max_tile: int = DEFAULT_MAX_TILE,
        progress: bool = False,
    ) -> Segmentation:
        """Same answer as :meth:`segment`, but the pixels are read once per tile
        of nearby clicks (see ``bridge.nuclick.tiling``), for whole-slide images."""
        clicks = list(clicks)
        return Segmentation.collect(len(clicks), self.iter_tiled(reader, clicks, max_tile, progress, with_masks=True))

    def iter_tiled(
        self,
        reader: RegionReader,
        clicks: Sequence[Click],
        max_tile: int = DEFAULT_MAX_TILE,
        progress: bool = False,
        with_masks: bool = False,
    ) -> Iterator[tuple[int, NucleusResult, PatchMask | None]]:
        """:meth:`segment_tiled`'s results as they become final, in no fixed
        order: ``(click index, result, final mask or None)``, one per click.

        Memory is bounded by the tiles in flight, not by the number of clicks:
        overlaps are resolved as the masks arrive (``bridge.nuclick.tiling.OverlapStream``),
        and a mask is kept only while a neighbour still needs it.  ``with_masks``
        False yields None for every mask, so nothing per nucleus need be kept."""
        clicks = list(clicks)
        check_finite(clicks)
        reasons = outside_reasons(clicks, reader.width, reader.height)
        for k, why in sorted(reasons.items()):
            yield k, NucleusResult(click=clicks[k], found=False, reason=why), None
        tiles = plan_tiles(clicks, reader.width, reader.height, self.patch_size, self.guidance_sigma, max_tile)
        stream = OverlapStream(clicks, [k for t in tiles for k in t.members], self.patch_size, self.min_size)
        for tile, tile_reader in iter_tiles(reader, tiles, progress):
            local = [clicks[k] for k in tile.members + tile.context]
            for j, pm in self.iter_patches(tile_reader, local, range(len(tile.members))):
                for k, final in stream.add(tile.members[j], pm):
                    result = nucleus_result(clicks[k], final, self.tolerance)
                    yield k, result, (final if with_masks and result.found else None)
        if stream.pending():  # pragma: no cover - every planned click gets a mask
            raise RuntimeError(f"clicks {stream.pending()[:5]} never got their neighbours' masks")
