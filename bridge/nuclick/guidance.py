"""Guidance maps: the inclusion map (a 2-D Gaussian at the clicked nucleus)
and the exclusion map (Gaussians at the neighbours' clicks, all zero when
there are none), built on the fly for training and inference alike."""

from __future__ import annotations

import numpy as np

from bridge.io.coords import pixel_centres

DEFAULT_SIGMA = 2.0


def gaussian_map(points: np.ndarray, size: int, sigma: float = DEFAULT_SIGMA) -> np.ndarray:
    """Max of unit-peak Gaussians at ``points`` (K, 2) given in patch-local
    continuous coordinates; points far outside the patch contribute nothing."""
    out = np.zeros((size, size), dtype=np.float32)
    pts = np.asarray(points, dtype=np.float32).reshape(-1, 2)
    if len(pts) == 0:
        return out
    centres = pixel_centres(size)
    reach = 4.0 * sigma
    for px, py in pts:
        if not (-reach <= px <= size + reach and -reach <= py <= size + reach):
            continue
        gx = np.exp(-((centres - px) ** 2) / (2 * sigma**2))
        gy = np.exp(-((centres - py) ** 2) / (2 * sigma**2))
        np.maximum(out, np.outer(gy, gx), out=out)
    return out


def guidance_pair(click: np.ndarray, neighbours: np.ndarray, size: int, sigma: float = DEFAULT_SIGMA) -> np.ndarray:
    """(2, size, size) float32: inclusion map of ``click`` and exclusion map
    of ``neighbours``, both in patch-local coordinates."""
    return np.stack([gaussian_map(click, size, sigma), gaussian_map(neighbours, size, sigma)])
