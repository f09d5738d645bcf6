"""The one place where coordinates change frame.

Convention (QuPath's, used everywhere in nuclick-bridge: CSV, GeoJSON, proto,
connectors): coordinates are continuous level-0 image pixels; the pixel at
column ``c``, row ``r`` spans ``[c, c+1) x [r, r+1)``, so its centre is
``(c + 0.5, r + 0.5)``.  A patch or tile is an integer-aligned window given by
its level-0 origin (top-left corner) and size; a downsampled level maps
level-0 ``x`` to ``x / downsample``.
"""

from __future__ import annotations

import math

import numpy as np


def pixel_of(x: float, y: float) -> tuple[int, int]:
    """(column, row) of the pixel that contains the continuous point (x, y)."""
    return math.floor(x), math.floor(y)


def pixel_centres(n: int) -> np.ndarray:
    """Continuous coordinates of the centres of pixels 0..n-1 along one axis."""
    return np.arange(n, dtype=np.float32) + 0.5


def patch_origin(x: float, y: float, size: int) -> tuple[int, int]:
    """Top-left level-0 pixel of the ``size`` x ``size`` patch centred on a click.

    The click's pixel lands at index ``size // 2`` of the patch on both axes.
    """
    c, r = pixel_of(x, y)
    return c - size // 2, r - size // 2


def to_local(xy: np.ndarray, origin: tuple[float, float], downsample: float | tuple[float, float] = 1.0) -> np.ndarray:
    """Level-0 coordinates -> coordinates in a window at ``origin`` (level 0)
    sampled at ``downsample`` (one factor, or (x, y) factors for a window
    resampled to a size that is not an exact multiple)."""
    return (np.asarray(xy, dtype=np.float64) - np.asarray(origin, dtype=np.float64)) / downsample


def to_level0(xy: np.ndarray, origin: tuple[float, float], downsample: float | tuple[float, float] = 1.0) -> np.ndarray:
    """Inverse of :func:`to_local`."""
    return np.asarray(xy, dtype=np.float64) * downsample + np.asarray(origin, dtype=np.float64)


def level0_affine(origin: tuple[float, float], downsample: float | tuple[float, float] = 1.0) -> list[float]:
    """:func:`to_level0` for geometries: the ``shapely.affinity.affine_transform``
    matrix ``[a, b, d, e, xoff, yoff]`` from window coordinates to level 0."""
    dx, dy = (downsample, downsample) if np.isscalar(downsample) else downsample
    return [float(dx), 0.0, 0.0, float(dy), float(origin[0]), float(origin[1])]


# OMERO ROI coordinates.  OMERO.iviewer (where annotators click) lays the image
# over the extent [0, width] x [0, height] and draws a shape's (X, Y) there, so
# pixel (c, r) spans [c, c+1) x [r, r+1): the same frame as ours, as in QuPath's
# OMERO extension, which reads shapes without an offset.  Every OMERO coordinate
# still goes through these two functions, so the convention lives in one place.
OMERO_PIXEL_OFFSET = 0.0


def omero_to_level0(x: float, y: float) -> tuple[float, float]:
    """An OMERO shape coordinate (full-resolution pixels) -> our continuous level-0 frame."""
    return float(x) + OMERO_PIXEL_OFFSET, float(y) + OMERO_PIXEL_OFFSET


def level0_to_omero(x: float, y: float) -> tuple[float, float]:
    """Inverse of :func:`omero_to_level0`."""
    return float(x) - OMERO_PIXEL_OFFSET, float(y) - OMERO_PIXEL_OFFSET
