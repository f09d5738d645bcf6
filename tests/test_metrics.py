"""Metrics on hand-made label maps whose scores are worked out by hand, plus a
brute-force cross-check and one real MoNuSeg label map."""

from __future__ import annotations

from fractions import Fraction as F
from pathlib import Path

import numpy as np
import pytest

from bridge.evaluation.metrics import (
    METRIC_KEYS,
    aggregate,
    aji,
    all_metrics,
    by_size,
    dice,
    object_dice,
    overlap,
    pq_parts,
    scores,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MONUSEG_LABEL = DATA / "monuseg" / "labels" / "TCGA-21-5786-01Z-00-DX1.png"


def arr(rows: str) -> np.ndarray:
    """Label map from lines of digits, e.g. "0110"."""
    return np.array([[int(c) for c in line] for line in rows.split()], dtype=np.int32)


def check(gt: np.ndarray, pred: np.ndarray, expected: dict[str, F | int]) -> None:
    got = all_metrics(gt, pred)
    assert set(got) == set(METRIC_KEYS)
    for k, v in expected.items():
        assert got[k] == pytest.approx(float(v), abs=1e-12), k


def test_perfect_match_is_one() -> None:
    gt = arr("""
        000000
        011022
        011022
        000000
        330000
        330000
    """)
    check(gt, gt.copy(), dict.fromkeys(METRIC_KEYS, 1))


def test_split_object() -> None:
    # G1 = 8 px; pred splits it into P1 = 6 px and P2 = 2 px.
    gt = arr("""
        000000
        011110
        011110
        000000
    """)
    pred = arr("""
        000000
        011120
        011120
        000000
    """)
    # AJI: G1 -> P1 (IoU 6/8 > 2/8): inter 6, union 8; P2 unused adds 2 -> 6/10
    # dice: same foreground -> 1
    # dice_obj: GT side  G1 -> P1: 2*6/(8+6) = 6/7, weight 1
    #           pred side P1 -> G1: 6/7 weight 6/8; P2 -> G1: 2*2/(8+2) = 2/5 weight 2/8
    #           = 9/14 + 1/10 = 26/35;  0.5 * (6/7 + 26/35) = 0.5 * 56/35 = 4/5
    # PQ: (G1, P1) IoU 3/4 matches; P2 is FP -> DQ = 1 / (1 + 1/2) = 2/3, SQ = 3/4, PQ = 1/2
    check(
        gt,
        pred,
        {"aji": F(3, 5), "dice": 1, "dice_obj": F(4, 5), "dq": F(2, 3), "sq": F(3, 4), "pq": F(1, 2)},
    )


def test_merged_objects() -> None:
    # G1 = 4 px, G2 = 6 px; pred merges both into P1 = 10 px.
    gt = arr("""
        000000
        112220
        112220
        000000
    """)
    pred = arr("""
        000000
        111110
        111110
        000000
    """)
    # AJI: G1 -> P1: inter 4, union 10; G2 -> P1: inter 6, union 10 -> 10/20
    # dice_obj: GT side  G1: 2*4/14 = 4/7 weight 4/10; G2: 2*6/16 = 3/4 weight 6/10
    #           = 8/35 + 9/20 = 19/28;  pred side P1 -> G2 (overlap 6 > 4): 3/4, weight 1
    #           0.5 * (19/28 + 21/28) = 5/7
    # PQ: IoU(G2, P1) = 6/10 matches, IoU(G1, P1) = 4/10 -> G1 is FN
    #     DQ = 1 / (1 + 1/2) = 2/3, SQ = 3/5, PQ = 2/5
    check(
        gt,
        pred,
        {"aji": F(1, 2), "dice": 1, "dice_obj": F(5, 7), "dq": F(2, 3), "sq": F(3, 5), "pq": F(2, 5)},
    )


# G1 = 4 px found exactly; the other object (6 px) exists on one side only.
_ONE = arr("""
    110000
    110000
    000000
    000222
    000222
    000000
""")
_TWO_GONE = np.where(_ONE == 2, 0, _ONE)
# AJI: G1 inter 4 union 4; the lone 6 px object adds 6 to the union -> 4/10
# dice: 2*4 / (10 + 4) = 4/7
# dice_obj: the side holding both: 1 * 4/10 + 0 * 6/10 = 2/5; the other side: 1 -> 0.5 * 7/5 = 7/10
# PQ: TP 1, FN or FP 1 -> DQ 2/3, SQ 1, PQ 2/3
_ONE_SIDED = {"aji": F(2, 5), "dice": F(4, 7), "dice_obj": F(7, 10), "dq": F(2, 3), "sq": 1, "pq": F(2, 3)}


def test_missed_object_fn() -> None:
    check(_ONE, _TWO_GONE, _ONE_SIDED)


def test_spurious_object_fp() -> None:
    check(_TWO_GONE, _ONE, _ONE_SIDED)


def test_iou_exactly_half_is_not_a_match() -> None:
    # G1 = 6 px, P1 = 6 px shifted one column: inter 4, union 8, IoU = 1/2 exactly.
    gt = arr("""
        00000
        01110
        01110
        00000
    """)
    pred = arr("""
        00000
        00111
        00111
        00000
    """)
    # AJI 4/8; dice 2*4/12 = 2/3; dice_obj both sides 2/3
    # PQ: IoU 1/2 is not > 1/2 -> TP 0, FP 1, FN 1 -> DQ = SQ = PQ = 0
    check(gt, pred, {"aji": F(1, 2), "dice": F(2, 3), "dice_obj": F(2, 3), "dq": 0, "sq": 0, "pq": 0})


def test_iou_just_above_half_is_a_match() -> None:
    # G1 = 8 px, P1 = 8 px shifted one column: inter 6, union 10, IoU = 3/5.
    gt = arr("""
        0000000
        0111100
        0111100
        0000000
    """)
    pred = np.roll(gt, 1, axis=1)
    # AJI 6/10; dice = dice_obj = 2*6/16 = 3/4; PQ: TP 1 -> DQ 1, SQ 3/5, PQ 3/5
    check(
        gt,
        pred,
        {"aji": F(3, 5), "dice": F(3, 4), "dice_obj": F(3, 4), "dq": 1, "sq": F(3, 5), "pq": F(3, 5)},
    )


def test_tie_goes_to_lowest_pred_id() -> None:
    # G1 = 8 px split evenly: P1 and P2 both have IoU 4/8 (and overlap 4).
    gt = arr("""
        1111
        1111
    """)
    pred = arr("""
        1122
        1122
    """)
    # AJI: G1 -> P1 (tie, lowest id): inter 4, union 8; P2 unused adds 4 -> 4/12 = 1/3
    # dice_obj: GT side 2*4/12 = 2/3; pred side 2/3 * 1/2 + 2/3 * 1/2 = 2/3 -> 2/3
    assert aji(gt, pred) == pytest.approx(1 / 3)
    assert object_dice(gt, pred) == pytest.approx(2 / 3)
    assert pq_parts(gt, pred) == (0.0, 0.0, 0.0)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.uint32, np.int64, np.uint64])
def test_non_contiguous_ids_give_same_scores(dtype: type) -> None:
    gt = arr("""
        000000
        112220
        112220
        000000
        033000
        033000
    """)
    pred = arr("""
        000000
        111110
        111110
        000000
        002200
        002200
    """)
    ref = all_metrics(gt, pred)
    big = 200 if np.dtype(dtype).itemsize == 1 else 60000
    gt_map = np.array([0, 7, big, 3], dtype=dtype)
    pred_map = np.array([0, big + 1, 5], dtype=dtype)
    got = all_metrics(gt_map[gt], pred_map[pred])
    assert got == pytest.approx(ref)
    if np.dtype(dtype).itemsize == 8:  # huge ids take the np.unique path
        gt_huge = np.array([0, 1 << 40, 9, 1 << 50], dtype=dtype)
        assert all_metrics(gt_huge[gt], pred_map[pred]) == pytest.approx(ref)


def test_empty_cases() -> None:
    empty = np.zeros((5, 5), dtype=np.int32)
    some = empty.copy()
    some[1:3, 1:3] = 4
    check(empty, empty, dict.fromkeys(METRIC_KEYS, 1))
    check(empty, some, dict.fromkeys(METRIC_KEYS, 0))
    check(some, empty, dict.fromkeys(METRIC_KEYS, 0))
    zero_size = np.zeros((0, 0), dtype=np.int32)
    check(zero_size, zero_size, dict.fromkeys(METRIC_KEYS, 1))


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="shape"):
        all_metrics(np.zeros((3, 3), int), np.zeros((3, 4), int))
    with pytest.raises(ValueError, match="integer"):
        all_metrics(np.zeros((3, 3)), np.zeros((3, 3), int))
    with pytest.raises(ValueError, match="negative"):
        all_metrics(-np.ones((3, 3), int), np.zeros((3, 3), int))


def test_functions_accept_a_precomputed_overlap() -> None:
    gt = arr("1100 1100 0022")
    pred = arr("0110 0110 0022")
    ov = overlap(gt, pred)
    assert aji(ov) == aji(gt, pred)
    assert dice(ov) == dice(gt, pred)
    assert object_dice(ov) == object_dice(gt, pred)
    assert pq_parts(ov) == pq_parts(gt, pred)
    assert scores(gt, pred).as_dict() == all_metrics(gt, pred)


def test_aggregate_is_mean_over_images() -> None:
    a = dict.fromkeys(METRIC_KEYS, 1.0)
    b = dict.fromkeys(METRIC_KEYS, 0.0) | {"aji": 0.5}
    out = aggregate([a, b, b])
    assert out["aji"] == pytest.approx(2 / 3)
    assert out["pq"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        aggregate([])
    with pytest.raises(ValueError):
        aggregate([a, {"aji": 1.0}])


# --- brute force: one boolean mask per object, straight from the definitions ---


def _naive(gt: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    gs = [gt == i for i in np.unique(gt) if i]
    ps = [pred == j for j in np.unique(pred) if j]
    inter = np.array([[(g & p).sum() for p in ps] for g in gs]).reshape(len(gs), len(ps))
    ga = np.array([g.sum() for g in gs])
    pa = np.array([p.sum() for p in ps])
    union = ga[:, None] + pa[None, :] - inter
    iou = inter / union
    # AJI as HoVer-Net's get_fast_aji
    num = den = 0
    used = set()
    for i in range(len(gs)):
        j = int(np.argmax(iou[i]))
        if iou[i, j] > 0:
            num += inter[i, j]
            den += union[i, j]
            used.add(j)
        else:
            den += ga[i]
    den += sum(pa[j] for j in range(len(ps)) if j not in used)
    d = 2 * inter / (ga[:, None] + pa[None, :])
    obj_g = sum(ga[i] / ga.sum() * d[i, np.argmax(inter[i])] for i in range(len(gs)))
    obj_p = sum(pa[j] / pa.sum() * d[np.argmax(inter[:, j]), j] for j in range(len(ps)))
    m = iou > 0.5
    tp = m.sum()
    dq = tp / (tp + 0.5 * (len(ps) - tp) + 0.5 * (len(gs) - tp))
    sq = iou[m].mean() if tp else 0.0
    fg = 2 * ((gt > 0) & (pred > 0)).sum() / ((gt > 0).sum() + (pred > 0).sum())
    return {
        "aji": num / den,
        "dice": fg,
        "dice_obj": 0.5 * (obj_g + obj_p),
        "sq": sq,
        "dq": dq,
        "pq": dq * sq,
    }


def _blobs(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    out = np.zeros((size, size), dtype=np.int32)
    for k in rng.permutation(np.arange(1, n + 1)):
        r, c = rng.integers(0, size - 3, 2)
        h, w = rng.integers(2, 7, 2)
        out[r : r + h, c : c + w] = k
    return out


@pytest.mark.parametrize("seed", range(5))
def test_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    gt = _blobs(rng, 12, 24)
    pred = _blobs(rng, 10, 24)
    pred[rng.random(pred.shape) < 0.05] = 0
    # random, non-contiguous ids on the prediction
    pred = np.concatenate([[0], rng.choice(np.arange(1, 1000), 10, replace=False)])[pred]
    assert all_metrics(gt, pred) == pytest.approx(_naive(gt, pred))


def test_real_monuseg_label_map() -> None:
    if not MONUSEG_LABEL.exists():
        pytest.skip(f"{MONUSEG_LABEL} not available")
    from PIL import Image
    from skimage.segmentation import find_boundaries

    gt = np.asarray(Image.open(MONUSEG_LABEL))
    assert gt.ndim == 2 and gt.max() > 100
    assert all_metrics(gt, gt) == pytest.approx(dict.fromkeys(METRIC_KEYS, 1.0))
    # erode every object by one pixel: drop its inner boundary
    eroded = np.where(find_boundaries(gt, mode="inner"), 0, gt)
    got = all_metrics(gt, eroded)
    assert got["aji"] < 0.99
    assert got["dq"] == 1.0
    assert got["sq"] < 1.0


def test_by_size_on_a_real_label_map() -> None:
    """Every nucleus lands in exactly one size bin; a perfect prediction has IoU 1
    everywhere; eroding by two pixels misses some small nuclei (drawn too small)
    and hurts small nuclei more than large ones."""
    if not MONUSEG_LABEL.exists():
        pytest.skip(f"{MONUSEG_LABEL} not available")
    from PIL import Image
    from skimage.segmentation import find_boundaries

    gt = np.asarray(Image.open(MONUSEG_LABEL)).astype(np.int64)
    perfect = by_size([(gt, gt)])
    assert sum(b.count for b in perfect) == len(np.unique(gt)) - 1
    for b in perfect:
        if b.count:
            assert b.mean_iou == 1.0 and b.missed == 0.0
    eroded = gt.copy()
    for _ in range(2):
        eroded[find_boundaries(eroded, mode="inner")] = 0
    bins = [b for b in by_size([(gt, eroded)], edges=(0, 200, 800, np.inf)) if b.count]
    assert bins[0].mean_iou < bins[-1].mean_iou < 1.0
    assert bins[0].missed > 0 and bins[0].too_small == 1.0
    # nothing predicted: every nucleus missed, IoU 0
    empty = by_size([(gt, np.zeros_like(gt))])
    assert all(b.mean_iou == 0.0 and b.missed == 1.0 for b in empty if b.count)
