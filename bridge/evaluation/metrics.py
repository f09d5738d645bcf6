"""Instance-segmentation metrics of the NuClick paper (Koohbanani et al. 2020).

Both inputs are 2-D integer instance maps of the same shape: 0 is background,
every other value is one object; ids need not be contiguous and the two maps'
ids are unrelated.  All pairwise overlaps are taken from a single joint
histogram of (gt id, pred id) pixel pairs, so the cost is a few passes over
the pixels whatever the number of objects (no per-object mask loop).

Edge cases (chosen so that "nothing to find and nothing found" is a perfect
score and "something on one side only" is a total failure):

* no GT and no pred objects: every metric is 1.0;
* objects on one side only: AJI, object Dice, DQ, SQ and PQ are 0.0, and so
  is pixel Dice (one foreground is empty, the other is not).

Ties (two candidates with the same IoU or overlap) go to the lowest id, as
``np.argmax`` does in HoVer-Net's reference code.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

METRIC_KEYS = ("aji", "dice", "dice_obj", "sq", "dq", "pq")

# A dense (G+1) x (P+1) joint histogram is the fastest way to count pairs; past
# this many cells (32 MiB of int64) we sort the pixel keys instead.
_DENSE_LIMIT = 1 << 22
# Ids up to this value are compacted with a lookup table (O(n)), beyond it with
# np.unique (a sort).
_LUT_LIMIT = 1 << 24


@dataclass(frozen=True)
class Overlap:
    """Everything the metrics need, computed once per (gt, pred) pair.

    ``gt_area[i]`` / ``pred_area[j]`` are object sizes in pixels; the pair
    arrays ``pair_gt``, ``pair_pred``, ``pair_inter`` list every (i, j) with a
    non-empty intersection (0-based indices into the areas, not the raw ids).
    """

    gt_ids: np.ndarray
    pred_ids: np.ndarray
    gt_area: np.ndarray
    pred_area: np.ndarray
    pair_gt: np.ndarray
    pair_pred: np.ndarray
    pair_inter: np.ndarray

    @property
    def n_gt(self) -> int:
        return len(self.gt_ids)

    @property
    def n_pred(self) -> int:
        return len(self.pred_ids)

    @property
    def pair_union(self) -> np.ndarray:
        return self.gt_area[self.pair_gt] + self.pred_area[self.pair_pred] - self.pair_inter


@dataclass(frozen=True)
class Scores:
    """The six NuClick metrics for one image (or their means over images)."""

    aji: float
    dice: float
    dice_obj: float
    sq: float
    dq: float
    pq: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _compact(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map ids to 0..K (0 stays background) -> (sorted non-zero ids, index map)."""
    flat = labels.ravel()
    top = int(flat.max()) if flat.size else 0
    if top < _LUT_LIMIT:
        present = np.bincount(flat, minlength=1) > 0
        present[0] = False
        ids = np.flatnonzero(present)
        lut = np.zeros(top + 1, dtype=np.int64)
        lut[ids] = np.arange(1, len(ids) + 1)
        return ids, lut[flat]
    ids, inv = np.unique(flat, return_inverse=True)
    inv = inv.astype(np.int64).ravel()
    if ids[0] == 0:
        return ids[1:], inv
    return ids, inv + 1


def _as_labels(a: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype == bool:
        a = a.astype(np.uint8)
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must be an integer instance map, got dtype {a.dtype}")
    if a.size and a.min() < 0:
        raise ValueError(f"{name} has negative ids")
    if a.dtype == np.uint64:  # np.bincount refuses uint64
        a = a.astype(np.int64)
    return a


def overlap(gt: np.ndarray, pred: np.ndarray) -> Overlap:
    """Object sizes and all non-empty pairwise intersections, in one pass."""
    gt = _as_labels(gt, "gt")
    pred = _as_labels(pred, "pred")
    if gt.shape != pred.shape:
        raise ValueError(f"shape mismatch: gt {gt.shape} vs pred {pred.shape}")
    gt_ids, g = _compact(gt)
    pred_ids, p = _compact(pred)
    ng, npred = len(gt_ids), len(pred_ids)
    width = npred + 1
    key = g * width + p
    if (ng + 1) * width <= _DENSE_LIMIT:
        counts = np.bincount(key, minlength=(ng + 1) * width)
        keys = np.flatnonzero(counts)
        counts = counts[keys]
    else:
        keys, counts = np.unique(key, return_counts=True)
    kg, kp = keys // width, keys % width
    gt_area = np.bincount(kg, weights=counts, minlength=ng + 1)[1:].astype(np.int64)
    pred_area = np.bincount(kp, weights=counts, minlength=npred + 1)[1:].astype(np.int64)
    both = (kg > 0) & (kp > 0)
    return Overlap(
        gt_ids=gt_ids,
        pred_ids=pred_ids,
        gt_area=gt_area,
        pred_area=pred_area,
        pair_gt=kg[both] - 1,
        pair_pred=kp[both] - 1,
        pair_inter=counts[both].astype(np.int64),
    )


def _best_per(owner: np.ndarray, other: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Index (into the pair arrays) of the best-scoring pair for each distinct
    ``owner``; ties go to the lowest ``other`` index."""
    if len(owner) == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort((other, -score, owner))
    first = np.ones(len(order), dtype=bool)
    first[1:] = owner[order[1:]] != owner[order[:-1]]
    return order[first]


def _ov(gt_or_ov: np.ndarray | Overlap, pred: np.ndarray | None) -> Overlap:
    if isinstance(gt_or_ov, Overlap):
        return gt_or_ov
    if pred is None:
        raise TypeError("pred is required unless an Overlap is given")
    return overlap(gt_or_ov, pred)


def aji(gt: np.ndarray | Overlap, pred: np.ndarray | None = None) -> float:
    """Aggregated Jaccard Index (Kumar et al. 2017), HoVer-Net's ``get_fast_aji``.

    Each GT object is paired with the intersecting pred of highest IoU (a pred
    may be paired with several GT objects and then counts several times);
    unpaired GT and never-paired pred objects add their area to the union.
    """
    ov = _ov(gt, pred)
    if ov.n_gt == 0 and ov.n_pred == 0:
        return 1.0
    union = ov.pair_union
    best = _best_per(ov.pair_gt, ov.pair_pred, ov.pair_inter / union)
    inter_sum = int(ov.pair_inter[best].sum())
    union_sum = int(union[best].sum())
    gt_paired = np.zeros(ov.n_gt, dtype=bool)
    gt_paired[ov.pair_gt[best]] = True
    pred_used = np.zeros(ov.n_pred, dtype=bool)
    pred_used[ov.pair_pred[best]] = True
    union_sum += int(ov.gt_area[~gt_paired].sum()) + int(ov.pred_area[~pred_used].sum())
    return inter_sum / union_sum


def dice(gt: np.ndarray | Overlap, pred: np.ndarray | None = None) -> float:
    """Pixel-level Dice of the foregrounds (all objects vs background)."""
    ov = _ov(gt, pred)
    total = int(ov.gt_area.sum()) + int(ov.pred_area.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(ov.pair_inter.sum()) / total


def object_dice(gt: np.ndarray | Overlap, pred: np.ndarray | None = None) -> float:
    """Object-level Dice (Sirinukunwattana et al. 2017), as used by NuClick.

    0.5 * (size-weighted mean over GT objects of the Dice with the pred of
    largest overlap + the same over pred objects); an object that overlaps
    nothing scores 0.
    """
    ov = _ov(gt, pred)
    if ov.n_gt == 0 and ov.n_pred == 0:
        return 1.0
    if ov.n_gt == 0 or ov.n_pred == 0:
        return 0.0
    pair_dice = 2.0 * ov.pair_inter / (ov.gt_area[ov.pair_gt] + ov.pred_area[ov.pair_pred])
    halves = []
    for owner, other, area in (
        (ov.pair_gt, ov.pair_pred, ov.gt_area),
        (ov.pair_pred, ov.pair_gt, ov.pred_area),
    ):
        best = _best_per(owner, other, ov.pair_inter.astype(np.float64))
        # weight |X_i| / sum |X|; objects with no overlap contribute 0
        halves.append(float((area[owner[best]] * pair_dice[best]).sum() / area.sum()))
    return 0.5 * (halves[0] + halves[1])


def pq_parts(gt: np.ndarray | Overlap, pred: np.ndarray | None = None) -> tuple[float, float, float]:
    """Panoptic quality (Kirillov et al. 2019) -> (DQ, SQ, PQ).

    A pair matches when IoU > 0.5 (strictly), which makes matches unique.
    DQ = TP / (TP + FP/2 + FN/2), SQ = mean IoU of the matches (0 if none),
    PQ = DQ * SQ.
    """
    ov = _ov(gt, pred)
    if ov.n_gt == 0 and ov.n_pred == 0:
        return 1.0, 1.0, 1.0
    union = ov.pair_union
    matched = 2 * ov.pair_inter > union  # IoU > 0.5 in exact integer arithmetic
    tp = int(matched.sum())
    fp = ov.n_pred - tp
    fn = ov.n_gt - tp
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = float((ov.pair_inter[matched] / union[matched]).mean()) if tp else 0.0
    return dq, sq, dq * sq


@dataclass(frozen=True)
class SizeBin:
    """How well GT nuclei of one size range were found (see :func:`by_size`)."""

    lo: float
    hi: float
    count: int
    mean_iou: float  # best IoU of each GT nucleus with any prediction (0 if none)
    missed: float  # fraction with best IoU <= 0.5 (not a PQ match)
    too_small: float  # of the missed ones, the fraction whose best prediction is smaller than the GT


# Nucleus areas in level-0 pixels at 40x: tiny lymphocytes up to large tumour nuclei.
SIZE_EDGES = (0, 100, 200, 400, 800, 1600, np.inf)


def by_size(pairs: Sequence[tuple[np.ndarray, np.ndarray]], edges: Sequence[float] = SIZE_EDGES) -> list[SizeBin]:
    """Accuracy per GT nucleus size over (gt, pred) image pairs: the model
    card's "where it fails" table, because a mean hides a size bias (small
    nuclei drawn too big, large ones too small)."""
    areas, ious, ratios = [], [], []
    for gt, pred in pairs:
        ov = overlap(gt, pred)
        best_iou = np.zeros(ov.n_gt)
        ratio = np.zeros(ov.n_gt)
        if len(ov.pair_gt):
            iou = ov.pair_inter / ov.pair_union
            best = _best_per(ov.pair_gt, ov.pair_pred, iou)
            owner = ov.pair_gt[best]
            best_iou[owner] = iou[best]
            ratio[owner] = ov.pred_area[ov.pair_pred[best]] / ov.gt_area[owner]
        areas.append(ov.gt_area)
        ious.append(best_iou)
        ratios.append(ratio)
    area, iou, ratio = (np.concatenate(a) if a else np.zeros(0) for a in (areas, ious, ratios))
    out = []
    for lo, hi in itertools.pairwise(edges):
        sel = (area >= lo) & (area < hi)
        n = int(sel.sum())
        miss = sel & (iou <= 0.5)
        out.append(
            SizeBin(
                lo=float(lo),
                hi=float(hi),
                count=n,
                mean_iou=float(iou[sel].mean()) if n else float("nan"),
                missed=float(miss.sum() / n) if n else float("nan"),
                too_small=float((ratio[miss] < 1).mean()) if miss.any() else float("nan"),
            )
        )
    return out


def scores(gt: np.ndarray, pred: np.ndarray) -> Scores:
    """All six metrics, sharing one overlap computation."""
    ov = overlap(gt, pred)
    dq, sq, pq = pq_parts(ov)
    return Scores(aji=aji(ov), dice=dice(ov), dice_obj=object_dice(ov), sq=sq, dq=dq, pq=pq)


def all_metrics(gt: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """All six metrics as a dict keyed by ``METRIC_KEYS``."""
    return scores(gt, pred).as_dict()


def aggregate(per_image: Sequence[dict[str, float]]) -> dict[str, float]:
    """Mean over images of each metric (an unweighted mean of per-image scores,
    which is how NuClick reports the Kumar/MoNuSeg test set), not a metric
    recomputed on pooled pixels or objects."""
    if len(per_image) == 0:
        raise ValueError("aggregate() needs at least one image")
    keys = list(per_image[0])
    for d in per_image[1:]:
        if set(d) != set(keys):
            raise ValueError(f"images have different metric keys: {sorted(d)} vs {sorted(keys)}")
    return {k: float(np.mean([float(d[k]) for d in per_image])) for k in keys}
