"""The NuClick paper's weight-free baseline: marker-controlled watershed.

For each click, the same ``patch_size`` x ``patch_size`` patch as the NuClick
engine is read around it (``bridge.io.coords.patch_origin``; only pixels around
clicks are ever read), and ``skimage.segmentation.watershed`` is run on the
Sobel gradient magnitude of the Gaussian-smoothed haematoxylin density
(``skimage.color.rgb2hed``; ``channel="grey"`` uses darkness instead).  Padding
outside the image is set to the median stain of the patch first, so the image
border creates no artificial edge.

Markers (one label each):

* **the click**: its pixel plus the "nuclear" pixels (smoothed stain at or
  above the patch's Otsu threshold) within ``marker_radius`` px of it;
* **every other click in the patch**, built the same way, so that touching
  nuclei compete for their common boundary instead of one swallowing the
  other (a pixel within reach of two clicks goes to the nearer; ties to the
  clicked one / the lower index);
* **background**: the pale pixels (stain below the Otsu threshold of the
  patch's in-image pixels), eroded by ``background_erosion`` px so that the
  nucleus boundary is decided by the gradient ridge rather than by the
  threshold, with a ``keep_clear`` px disc around every click removed (a pale
  nucleus still gets its own region); plus the patch's outer ring and all
  padding outside the image, so that no region runs off the patch or into the
  padding.

The gradient is set to 0 under every marker (minima imposition): with a marker
on a textured, high-gradient pixel, skimage would otherwise flood the
neighbouring markers through the nucleus before this one starts.  Defaults
(sigma 1.5, erosion 4, marker radius 6, haematoxylin) were chosen on a few
*training* images of MoNuSeg and CoNSeP (never on the validation split).

The clicked label's region then follows exactly the engine's path: the same
post-processing (``clean_patch``: never in padding, small objects removed, only
the component under the click, holes filled), a :class:`PatchMask` with
probability 1 inside the mask and 0 outside, ``resolve_overlaps`` (with equal
probabilities a contested pixel goes to the lower click index) and
``build_results`` with ``outside_reasons`` for clicks off the image.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from scipy import ndimage as ndi
from skimage.color import rgb2hed
from skimage.filters import sobel, threshold_otsu
from skimage.morphology import disk
from skimage.segmentation import watershed
from tqdm import tqdm

from bridge.errors import BridgeInputError
from bridge.io.imageio import RegionReader
from bridge.nuclick.postprocess import MIN_OBJECT_PX, PatchMask, clean_patch
from bridge.nuclick.segmentation import PatchSegmenter
from bridge.results import Click

CHANNELS = ("hematoxylin", "grey")

# Labels in the marker image.
_BACKGROUND = 1
_CLICK = 2


def stain_image(rgb: np.ndarray, channel: str = "hematoxylin") -> np.ndarray:
    """float64 image that is high on nuclei: haematoxylin density or darkness."""
    if channel == "hematoxylin":
        return rgb2hed(rgb)[..., 0]
    if channel == "grey":
        return 1.0 - rgb.astype(np.float64).mean(axis=2) / 255.0
    raise BridgeInputError(f"unknown watershed channel {channel!r}; use one of {', '.join(CHANNELS)}")


def _disc_offsets(radius: float) -> np.ndarray:
    """(K, 2) (row, col) offsets of the pixels within ``radius`` of the origin."""
    r = int(np.floor(max(radius, 0.0)))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return np.stack([yy[yy**2 + xx**2 <= radius**2], xx[yy**2 + xx**2 <= radius**2]], axis=1)


def _stamp(points: np.ndarray, offsets: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixels of a disc around each point, inside the patch: (pixels (K, 2),
    index of the point each belongs to, squared distance to it)."""
    pts = (points[:, None, :] + offsets[None, :, :]).reshape(-1, 2)
    owner = np.repeat(np.arange(len(points)), len(offsets))
    dist = np.tile((offsets**2).sum(axis=1), len(points))
    ok = ((pts >= 0) & (pts < size)).all(axis=1)
    return pts[ok], owner[ok], dist[ok]


class WatershedSegmenter(PatchSegmenter):
    """Click-seeded marker-controlled watershed, a drop-in for
    ``NuClickEngine.segment`` that needs no weights (see the module docstring).

    ``patch_size``, ``min_size`` and ``simplify_tolerance`` mean what they mean
    for the engine; ``channel`` ("hematoxylin" or "grey"), ``sigma`` (Gaussian
    smoothing, px), ``background_erosion`` (px), ``keep_clear`` (px),
    ``marker_radius`` (px) and ``compactness`` (skimage's compact watershed;
    0 = classic) tune the watershed.
    """

    def __init__(
        self,
        patch_size: int = 128,
        min_size: int = MIN_OBJECT_PX,
        simplify_tolerance: float = 0.5,
        channel: str = "hematoxylin",
        sigma: float = 1.5,
        background_erosion: int = 4,
        keep_clear: float = 4.0,
        marker_radius: float = 6.0,
        compactness: float = 0.0,
    ) -> None:
        if patch_size < 8:
            raise BridgeInputError("patch size must be at least 8")
        if channel not in CHANNELS:
            raise BridgeInputError(f"unknown watershed channel {channel!r}; use one of {', '.join(CHANNELS)}")
        self.patch_size = patch_size
        self.min_size = min_size
        self.tolerance = simplify_tolerance
        self.channel = channel
        self.sigma = sigma
        self.background_erosion = background_erosion
        self.keep_clear = keep_clear
        self.marker_radius = marker_radius
        self.compactness = compactness
        self._erosion_fp = disk(background_erosion) if background_erosion > 0 else None
        self._clear_offsets = _disc_offsets(keep_clear)
        self._marker_offsets = _disc_offsets(marker_radius)

    def patch_mask(self, rgb: np.ndarray, valid: np.ndarray, seed: tuple[int, int], others: np.ndarray) -> np.ndarray:
        """Boolean mask of the clicked nucleus in one patch.

        ``rgb`` (size, size, 3) uint8 patch, ``valid`` its in-image pixels,
        ``seed`` the click's (row, col) in the patch, ``others`` (M, 2) int
        (row, col) of the other clicks inside the patch.
        """
        size = rgb.shape[0]
        stain = stain_image(rgb, self.channel)
        inside = stain[valid]
        if inside.size == 0:  # cannot happen for a click on the image
            return np.zeros((size, size), dtype=bool)
        stain[~valid] = np.median(inside)  # no artificial edge at the image border
        if self.sigma > 0:
            stain = ndi.gaussian_filter(stain, self.sigma)
        gradient = sobel(stain)

        clicks = np.concatenate([np.asarray(seed, dtype=np.int64).reshape(1, 2), others], axis=0)
        markers = np.zeros((size, size), dtype=np.int32)
        nuclear = valid.copy()
        inside = stain[valid]
        if inside.max() > inside.min():
            otsu = threshold_otsu(inside)
            nuclear &= stain >= otsu
            pale = (stain < otsu) & valid
            if self._erosion_fp is not None:
                pale = ndi.binary_erosion(pale, self._erosion_fp, border_value=1)
            if self.keep_clear > 0:
                near = _stamp(clicks, self._clear_offsets, size)[0]
                pale[near[:, 0], near[:, 1]] = False
            markers[pale] = _BACKGROUND
        markers[~valid] = _BACKGROUND
        markers[[0, -1], :] = _BACKGROUND
        markers[:, [0, -1]] = _BACKGROUND
        # Each click's marker: the nuclear-looking pixels of a small disc around
        # it, a pixel shared by two discs going to the nearer click; the click
        # pixel itself always.
        pts, owner, dist = _stamp(clicks, self._marker_offsets, size)
        keep = nuclear[pts[:, 0], pts[:, 1]]
        pts, owner, dist = pts[keep], owner[keep], dist[keep]
        key = pts[:, 0] * size + pts[:, 1]
        order = np.lexsort((owner, dist, key))  # per pixel: nearest, then lowest index
        first = np.ones(len(order), dtype=bool)
        first[1:] = key[order[1:]] != key[order[:-1]]
        win = order[first]
        markers[pts[win, 0], pts[win, 1]] = _CLICK + owner[win]
        _, uniq = np.unique(clicks[:, 0] * size + clicks[:, 1], return_index=True)  # first = lowest index
        markers[clicks[uniq, 0], clicks[uniq, 1]] = _CLICK + uniq
        # Minima imposition: markers flood first, whatever the gradient under them.
        gradient[markers > 0] = 0.0
        labels = watershed(gradient, markers, compactness=self.compactness)
        region = labels == _CLICK
        return clean_patch(region.astype(np.float32), seed, 0.5, self.min_size, valid)

    def iter_patches(
        self, reader: RegionReader, clicks: Sequence[Click], indices: Sequence[int], progress: bool = False
    ) -> Iterator[tuple[int, PatchMask]]:
        """(click index, patch mask) for ``indices``; prob is 1 inside the mask."""
        size = self.patch_size
        patches = self.click_patches(reader, clicks, indices)
        for cp in tqdm(patches, total=len(indices), desc="nuclei", unit="nuc", disable=not progress, leave=False):
            ox, oy = cp.origin
            local = np.floor(cp.neighbours).astype(np.int64)[:, ::-1] - np.array([oy, ox])  # (row, col)
            local = local[((local >= 0) & (local < size)).all(axis=1)]
            local = local[cp.valid[local[:, 0], local[:, 1]]]
            mask = self.patch_mask(cp.rgb, cp.valid, cp.seed, local)
            yield cp.index, PatchMask(cp.origin, mask, mask.astype(np.float32), cp.seed)
