"""A lab's corrected nuclei as training data: regions and nucleus outlines
(level-0 polygons, as QuPath and OMERO store them) turned into label maps.

A *region* is an area the annotator made complete: every nucleus inside it
is outlined.  Outside regions only the outlined nuclei are known, so a pixel
there that no outline covers is *unknown*, not background: training gives it
no weight (see :class:`bridge.evaluation.datasets.LabelledImage`), and the
network is never taught that a nucleus nobody outlined is background.

Rasterising follows the project's pixel convention (:mod:`bridge.io.coords`):
a pixel belongs to a polygon when its centre lies inside it, holes excluded.
Images whose pixel size differs from the model's by more than 10% are
resampled; the polygons are scaled exactly, only the pixels interpolate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import shapely
from shapely import affinity
from shapely.geometry import MultiPolygon, Polygon
from shapely.geometry.base import BaseGeometry
from skimage.transform import resize

from bridge.errors import BridgeInputError
from bridge.evaluation.datasets import LabelledImage
from bridge.io.coords import pixel_centres
from bridge.io.imageio import RegionReader

# Within this relative difference a pixel size counts as the model's (as the server does).
SCALE_TOLERANCE = 0.10


@dataclass
class LabRegions:
    """One image's regions and nucleus outlines, in level-0 pixels, as a
    connector reads them; ``where`` names each region for error messages."""

    name: str
    reader: RegionReader
    pixel_size_um: float | None
    regions: list[BaseGeometry]
    nuclei: list[BaseGeometry]
    where: list[str] = field(default_factory=list)


def polygonal(geom: BaseGeometry | None) -> BaseGeometry | None:
    """The polygonal part of a geometry (repaired when self-intersecting), or
    None when it has no area (points, lines, empty)."""
    if geom is None or geom.is_empty:
        return None
    if not geom.is_valid:
        geom = shapely.make_valid(geom)
    if isinstance(geom, (Polygon, MultiPolygon)):
        return geom if geom.area > 0 else None
    parts = [g for g in getattr(geom, "geoms", []) if isinstance(g, (Polygon, MultiPolygon)) and g.area > 0]
    return shapely.union_all(parts) if parts else None


def rasterise(geoms: Sequence[BaseGeometry], shape: tuple[int, int]) -> np.ndarray:
    """int32 map of ``shape``: pixel (c, r) gets ``i + 1`` when its centre
    (c + 0.5, r + 0.5) lies inside ``geoms[i]`` (window pixel coordinates);
    where outlines overlap the later one wins, as in the shared datasets."""
    h, w = shape
    out = np.zeros(shape, dtype=np.int32)
    for i, g in enumerate(geoms):
        x0, y0, x1, y1 = g.bounds
        c0, r0 = max(0, int(np.floor(x0 - 0.5))), max(0, int(np.floor(y0 - 0.5)))
        c1, r1 = min(w, int(np.ceil(x1 - 0.5)) + 1), min(h, int(np.ceil(y1 - 0.5)) + 1)
        if c1 <= c0 or r1 <= r0:
            continue
        xs, ys = np.meshgrid(pixel_centres(c1)[c0:], pixel_centres(r1)[r0:])
        inside = shapely.contains_xy(g, xs.astype(np.float64), ys.astype(np.float64))
        out[r0:r1, c0:c1][inside] = i + 1
    return out


def scale_for(pixel_size_um: float | None, model_pixel_size_um: float) -> float:
    """Model pixels per level-0 pixel: 1 within ``SCALE_TOLERANCE`` or when the
    caller has already refused an unknown size."""
    if pixel_size_um is None:
        return 1.0
    s = pixel_size_um / model_pixel_size_um
    return 1.0 if abs(s - 1.0) <= SCALE_TOLERANCE else s


def region_samples(lab: LabRegions, model_pixel_size_um: float, margin: int = 64) -> list[LabelledImage]:
    """One training image per region: the region's bounding box grown by
    ``margin`` model pixels (a patch's context), read from level 0 and
    resampled to the model's pixel size, with

    * ``labels``: every outline in the window, region or not;
    * ``known``: the pixels of every region in the window plus every outline;
    * ``targets``: the ids of the outlines that touch this region (a nucleus
      crossing the region's edge is whole and counts).

    Raises :class:`BridgeInputError` for a region that holds no nucleus."""
    if lab.pixel_size_um is None:
        raise BridgeInputError(
            f"{lab.name}: the image has no pixel size, so its nuclei cannot be matched to the model's "
            f"{model_pixel_size_um} µm pixels; set it in QuPath (Image tab, Pixel width) or pass --pixel-size UM"
        )
    s = scale_for(lab.pixel_size_um, model_pixel_size_um)
    pad = margin / s
    nuclei = [g for g in (polygonal(n) for n in lab.nuclei) if g is not None]
    tree = shapely.STRtree(nuclei) if nuclei else None
    regions = [polygonal(r) for r in lab.regions]
    out: list[LabelledImage] = []
    for k, region in enumerate(regions):
        where = lab.where[k] if k < len(lab.where) else f"region {k + 1}"
        if region is None:
            raise BridgeInputError(f"{lab.name}: {where} has no area (draw regions as rectangles or polygons)")
        touching = sorted(int(i) for i in tree.query(region, predicate="intersects")) if tree is not None else []
        if not touching:
            raise BridgeInputError(
                f"{lab.name}: {where} holds no nucleus outline; outline every nucleus inside it, or delete the region"
            )
        x0, y0, x1, y1 = region.bounds
        ix0, iy0 = max(0, int(np.floor(x0 - pad))), max(0, int(np.floor(y0 - pad)))
        ix1 = min(lab.reader.width, int(np.ceil(x1 + pad)))
        iy1 = min(lab.reader.height, int(np.ceil(y1 + pad)))
        if ix1 <= ix0 or iy1 <= iy0:
            raise BridgeInputError(f"{lab.name}: {where} lies outside the image")
        pixels = lab.reader.read_region(ix0, iy0, ix1 - ix0, iy1 - iy0)
        shape = (round((iy1 - iy0) * s), round((ix1 - ix0) * s))
        if s != 1.0:
            pixels = (resize(pixels, shape, order=1, anti_aliasing=s < 1, preserve_range=True) + 0.5).astype(np.uint8)

        def to_window(g: BaseGeometry, ox: int = ix0, oy: int = iy0) -> BaseGeometry:
            return affinity.affine_transform(g, [s, 0.0, 0.0, s, -ox * s, -oy * s])

        window = shapely.box(ix0, iy0, ix1, iy1)
        in_window = sorted(int(i) for i in tree.query(window, predicate="intersects"))
        labels = rasterise([to_window(nuclei[i]) for i in in_window], shape)
        ids = {i: j + 1 for j, i in enumerate(in_window)}
        near = [to_window(r) for r in regions if r is not None and r.intersects(window)]
        known = (rasterise(near, shape) > 0) | (labels > 0)
        targets = frozenset(ids[i] for i in touching) & frozenset(np.unique(labels[labels > 0]).tolist())
        out.append(LabelledImage(f"{lab.name} {where}", pixels, labels, known=known, targets=targets))
    return out
