"""Simulated clicks, as in the NuClick paper: each nucleus's centroid moved by
a uniform random offset of at most ``jitter`` px, kept inside the nucleus.

Used by ``evaluate`` (without a clicks file) and by training, so that the
model is trained on the same kind of clicks it is judged on.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi


def instance_slices(labels: np.ndarray) -> dict[int, tuple[slice, slice]]:
    """Bounding-box slices of every instance id present in ``labels``."""
    objs = ndi.find_objects(labels)
    return {i + 1: s for i, s in enumerate(objs) if s is not None}


def click_in_mask(
    mask: np.ndarray, offset: tuple[int, int], jitter: float, rng: np.random.Generator, tries: int = 20
) -> tuple[float, float]:
    """One simulated click (x, y) for a boolean ``mask`` whose top-left pixel sits
    at ``offset`` = (row, col) in the image.

    The centroid is moved by an offset drawn uniformly from the disk of radius
    ``jitter``; a point that falls outside the nucleus is redrawn, and after
    ``tries`` failures (or for a crescent whose centroid lies outside) the
    nucleus pixel nearest to the drawn point is used, so the click is always
    inside the nucleus.
    """
    rows, cols = np.nonzero(mask)
    cy, cx = rows.mean() + 0.5, cols.mean() + 0.5  # continuous, local
    px, py = cx, cy
    for _ in range(max(1, tries)):
        if jitter > 0:
            r = jitter * np.sqrt(rng.random())
            a = 2 * np.pi * rng.random()
            px, py = cx + r * np.cos(a), cy + r * np.sin(a)
        c, rr = int(np.floor(px)), int(np.floor(py))
        if 0 <= rr < mask.shape[0] and 0 <= c < mask.shape[1] and mask[rr, c]:
            return px + offset[1], py + offset[0]
        if jitter <= 0:
            break
    d = (cols + 0.5 - px) ** 2 + (rows + 0.5 - py) ** 2
    k = int(np.argmin(d))
    return cols[k] + 0.5 + offset[1], rows[k] + 0.5 + offset[0]


def simulate_clicks(
    labels: np.ndarray, jitter: float = 0.0, seed: int | np.random.Generator | None = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Clicks for every instance of ``labels``.

    Returns ``(xy, ids)``: ``xy`` (N, 2) float64 continuous image coordinates,
    ``ids`` the instance id each click belongs to, in increasing id order.
    """
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    xy, ids = [], []
    for i, sl in instance_slices(labels).items():
        mask = labels[sl] == i
        xy.append(click_in_mask(mask, (sl[0].start, sl[1].start), jitter, rng))
        ids.append(i)
    return np.asarray(xy, dtype=np.float64).reshape(-1, 2), np.asarray(ids, dtype=np.int64)
