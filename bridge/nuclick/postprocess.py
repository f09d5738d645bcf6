"""Post-processing of NuClick's probability patches, as published: threshold,
remove small objects, morphological reconstruction from the click (only the
component under the click survives), fill holes; then a deterministic
resolution of pixels claimed by two neighbouring nuclei."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import cKDTree
from skimage import morphology

FOUR_CONNECTED = ndi.generate_binary_structure(2, 1)
# The paper removes objects under 10 px; training skips targets that small too.
MIN_OBJECT_PX = 10


def mask_box(mask: np.ndarray) -> tuple[slice, slice]:
    """(rows, cols) slices of the smallest window that holds every True pixel of
    ``mask``; empty slices at (0, 0) for an empty mask."""
    boxes = ndi.find_objects(mask.view(np.uint8))
    return boxes[0] if boxes else (slice(0, 0), slice(0, 0))


@dataclass
class PatchMask:
    """One click's mask and probabilities in a window at ``origin`` (level-0
    x, y): the whole patch at first, cropped to the mask by :meth:`cropped`."""

    origin: tuple[int, int]
    mask: np.ndarray  # bool (h, w)
    prob: np.ndarray  # float32 (h, w)
    seed: tuple[int, int]  # (row, col) of the click relative to origin; may lie outside a cropped window

    def box(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of the window in level-0 pixels."""
        h, w = self.mask.shape
        return self.origin[0], self.origin[1], self.origin[0] + w, self.origin[1] + h

    def cropped(self) -> PatchMask:
        """The same mask in the smallest window that holds it, so that whole-slide
        click sets keep a few kB per nucleus instead of a full patch."""
        rs, cs = mask_box(self.mask)
        return PatchMask(
            (self.origin[0] + cs.start, self.origin[1] + rs.start),
            self.mask[rs, cs].copy(),
            self.prob[rs, cs].copy(),
            (self.seed[0] - rs.start, self.seed[1] - cs.start),
        )


def component_at(mask: np.ndarray, seed: tuple[int, int], snap: float = 3.0) -> np.ndarray:
    """Morphological reconstruction of ``mask`` from the seed pixel.

    If the click itself landed on background (a jittered click at a nucleus
    edge), the nearest foreground pixel within ``snap`` px is used instead.
    """
    r, c = seed
    if not (0 <= r < mask.shape[0] and 0 <= c < mask.shape[1]):
        return np.zeros_like(mask)
    if not mask[r, c]:
        rows, cols = np.nonzero(mask)
        if len(rows) == 0:
            return np.zeros_like(mask)
        d2 = (rows - r) ** 2 + (cols - c) ** 2
        k = int(np.argmin(d2))
        if d2[k] > snap**2:
            return np.zeros_like(mask)
        r, c = int(rows[k]), int(cols[k])
    # Reconstruction by dilation from a single marker pixel inside a binary
    # mask is exactly the marker's 4-connected component; labelling finds it
    # in one pass instead of iterating dilations.
    labels, _ = ndi.label(mask, structure=FOUR_CONNECTED)
    return labels == labels[r, c]


def clean_patch(
    prob: np.ndarray,
    seed: tuple[int, int],
    threshold: float = 0.4,
    min_size: int = MIN_OBJECT_PX,
    valid: np.ndarray | None = None,
) -> np.ndarray:
    """Binary mask of the clicked nucleus from one probability patch.

    ``valid`` marks the patch pixels that lie inside the image; padding never
    becomes nucleus.
    """
    mask = prob > threshold
    if valid is not None:
        mask &= valid
    mask = morphology.remove_small_objects(mask, max_size=min_size - 1) if min_size > 1 else mask
    mask = component_at(mask, seed)
    # Holes of a single component lie inside its bounding box: fill only there.
    box = mask_box(mask)
    mask[box] = ndi.binary_fill_holes(mask[box])
    return mask


def keep_seed_component(mask: np.ndarray, seed: tuple[int, int]) -> np.ndarray:
    """The 4-connected component under ``seed``, or the largest one when the
    seed pixel was lost (or lies outside a cropped window)."""
    labels, n = ndi.label(mask, structure=FOUR_CONNECTED)
    if n <= 1:
        return mask
    r, c = seed
    if 0 <= r < mask.shape[0] and 0 <= c < mask.shape[1] and labels[r, c]:
        return labels == labels[r, c]
    sizes = np.bincount(labels.ravel())[1:]
    return labels == int(np.argmax(sizes)) + 1


def resolve_overlaps(items: list[PatchMask], min_size: int = MIN_OBJECT_PX) -> list[PatchMask]:
    """Give every pixel claimed by several nuclei to the one whose patch had the
    highest probability there (ties: the lower index in ``items``), independent
    of order; then keep each nucleus's component under its click.

    Only windows that intersect are compared, so this scales to whole-slide
    click sets.
    """
    if len(items) < 2:
        return items
    boxes = np.array([it.box() for it in items], dtype=np.float64)
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = float(np.max(boxes[:, 2:] - boxes[:, :2])) if len(boxes) else 0.0
    pairs = cKDTree(centres).query_pairs(r=half, p=np.inf, output_type="ndarray")
    lose = [np.zeros_like(it.mask) for it in items]
    for i, j in pairs:
        ax0, ay0, ax1, ay1 = items[i].box()
        bx0, by0, bx1, by1 = items[j].box()
        x0, y0, x1, y1 = max(ax0, bx0), max(ay0, by0), min(ax1, bx1), min(ay1, by1)
        if x1 <= x0 or y1 <= y0:
            continue
        ra = (slice(y0 - ay0, y1 - ay0), slice(x0 - ax0, x1 - ax0))
        rb = (slice(y0 - by0, y1 - by0), slice(x0 - bx0, x1 - bx0))
        both = items[i].mask[ra] & items[j].mask[rb]
        if not both.any():
            continue
        pa, pb = items[i].prob[ra], items[j].prob[rb]
        a_wins = (pa > pb) | ((pa == pb) & (i < j))
        lose[i][ra] |= both & ~a_wins
        lose[j][rb] |= both & a_wins
    out = []
    for it, lost in zip(items, lose, strict=True):
        if not lost.any():
            out.append(it)
            continue
        kept = keep_seed_component(it.mask & ~lost, it.seed)
        if kept.sum() < min_size:
            kept = np.zeros_like(kept)
        out.append(PatchMask(it.origin, kept, it.prob, it.seed))
    return out
