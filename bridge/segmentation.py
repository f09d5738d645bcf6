"""From per-click patch masks to the engine's outputs: polygons in level-0
coordinates, explicit "not found" answers, and an instance map.  Shared by
every method (NuClick and the watershed baseline)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bridge.polygons import mask_to_polygon
from bridge.postprocess import PatchMask
from bridge.results import Click, NucleusResult


@dataclass
class Segmentation:
    """Per-click results (same order as the clicks) and their masks."""

    results: list[NucleusResult]
    masks: list[PatchMask | None]

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
    clicks: list[Click], masks: list[PatchMask | None], reasons: dict[int, str], tolerance: float
) -> Segmentation:
    """Polygons and scores for found nuclei; a reason for every click without one."""
    results = []
    final: list[PatchMask | None] = []
    for k, (click, pm) in enumerate(zip(clicks, masks, strict=True)):
        if k in reasons or pm is None or not pm.mask.any():
            reason = reasons.get(k, "no nucleus found at this click (mask empty after post-processing)")
            results.append(NucleusResult(click=click, found=False, reason=reason))
            final.append(None)
            continue
        poly = mask_to_polygon(pm.mask, pm.origin, tolerance)
        score = float(pm.prob[pm.mask].mean())
        results.append(NucleusResult(click=click, found=True, polygon=poly, area_px=float(poly.area), score=score))
        final.append(pm)
    return Segmentation(results, final)


def outside_reasons(clicks: list[Click], width: int, height: int) -> dict[int, str]:
    """Clicks that cannot be segmented because they are not on the image."""
    return {
        k: f"click ({c.x:.1f}, {c.y:.1f}) is outside the image ({width} x {height})"
        for k, c in enumerate(clicks)
        if not (0 <= c.x < width and 0 <= c.y < height)
    }
