"""Exact pixel masks -> shapely polygons in level-0 image coordinates."""

from __future__ import annotations

import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon


def mask_to_polygon(mask: np.ndarray, origin: tuple[int, int] = (0, 0), tolerance: float = 0.5) -> Polygon | None:
    """Outline of a 4-connected boolean mask as a valid Polygon.

    The polygon is the exact union of the mask's pixel squares (pixel (c, r)
    spans [c, c+1) x [r, r+1)), built from horizontal runs, so with
    ``tolerance=0`` its area equals the pixel count.  It is then simplified
    within ``tolerance`` px, keeping topology.  ``origin`` is the level-0
    (x, y) of the mask's top-left pixel.  Returns None for an empty mask.
    """
    if not mask.any():
        return None
    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    d = np.diff(padded, axis=1)
    r_start, c_start = np.nonzero(d == 1)
    _, c_end = np.nonzero(d == -1)  # row-major order matches starts
    ox, oy = origin
    boxes = shapely.box(ox + c_start, oy + r_start, ox + c_end, oy + r_start + 1)  # one per run, vectorised
    geom = shapely.union_all(boxes)
    if isinstance(geom, MultiPolygon):  # only for masks that are not 4-connected
        geom = max(geom.geoms, key=lambda g: g.area)
    if tolerance > 0:
        simplified = geom.simplify(tolerance, preserve_topology=True)
        if isinstance(simplified, Polygon) and simplified.is_valid and not simplified.is_empty:
            geom = simplified
    if not geom.is_valid:
        geom = shapely.make_valid(geom)
        if isinstance(geom, MultiPolygon):
            geom = max(geom.geoms, key=lambda g: g.area)
    return shapely.geometry.polygon.orient(geom, sign=1.0)
