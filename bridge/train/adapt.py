"""Adapting trained weights to one lab's outlines, on its own corrected nuclei,
within a time budget on a CPU.

What it does, in order:

1. hold back a deterministic part of the lab's nuclei (whole blocks of the
   image, so a held-back nucleus's neighbours are mostly held back too), whose
   pixels the training never sees as truth;
2. measure the starting weights on them (AJI, PQ, SQ per image);
3. fine-tune the whole network with NuClick's loss plus the Lovász hinge, a
   short warm-up and a cosine decay sized to the time left, an average of the
   weights, and checkpoints a repeated command resumes from;
4. choose the probability threshold on the nuclei it trained on (the lab's
   outline offset: a looser-drawing lab wants a lower one), never on the
   held-back ones;
5. measure the result on the held-back nuclei again.  The caller writes the
   new weights only when they beat the starting ones there.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from scipy.spatial import cKDTree
from torch import nn
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from bridge.errors import BridgeInputError
from bridge.evaluation.clicks import instance_slices, simulate_clicks
from bridge.evaluation.datasets import LabelledImage
from bridge.evaluation.metrics import all_metrics
from bridge.io.imageio import ArrayReader
from bridge.model.precision import prepare, resolve_precision
from bridge.model.weights import ModelInfo
from bridge.nuclick.engine import NuClickEngine
from bridge.results import Click
from bridge.train.augment import AUGMENT_POLICIES
from bridge.train.data import NucleusPatches
from bridge.train.loop import ema_update, lr_factor, save_checkpoint, train_step
from bridge.train.loss import LOSSES

log = logging.getLogger("bridge.adapt")

# Thresholds tried for the lab's outline offset (the shipped weights use 0.4).
THRESHOLDS = (0.25, 0.3, 0.35, 0.4, 0.45, 0.5)
# Side of the square blocks that are held back whole, in model pixels.
HOLDOUT_BLOCK = 256
# At least this many nuclei to train on and to measure on.
MIN_TRAIN, MIN_HELD = 20, 5
# How often (in steps) a time-budgeted run checks that it still fits its budget.
REPLAN_EVERY = 10
# The threshold is chosen on at most this many of the nuclei trained on.
CALIBRATE_MAX = 400
REPORTED = ("aji", "pq", "sq", "dq")
# The threshold an adapted network is written with unless told otherwise (see AdaptConfig.threshold).
ADAPTED_THRESHOLD = 0.5


@dataclass
class AdaptConfig:
    minutes: float = 14.0  # the whole run: measuring, training, choosing the threshold, measuring again
    steps: int = 0  # 0: as many as the time budget allows; >0: exactly this many (repeatable)
    max_steps: int = 1200  # cap of a time-budgeted run, for fast machines
    # A time-budgeted run also stops after this many passes over the trained nuclei: on cpm15_dev test, 4, 10.5,
    # 13 and 17 passes gave AJI 0.788 (mean of 3 seeds), 0.790, 0.787 and 0.783: longer only fits the trained
    # nuclei closer.
    max_epochs: float = 8.0
    lr: float = 3e-4
    batch_size: int = 16
    warmup_steps: int = 20
    ema_decay: float = 0.99
    holdout: float = 0.2
    seed: int = 0
    precision: str = "auto"
    threads: int = 0
    loss: str = "nuclick+lovasz"
    augment: str = "standard"
    jitter: float = 5.0
    drop_neighbour: float = 0.0
    # The adapted file's threshold: a number, "search" (the best AJI on the nuclei trained on) or "keep" (the
    # starting weights'). 0.5, where the loss puts the lab's outline, beat the search on the lab's other images
    # in every run measured: the trained nuclei, which the network has fitted, favour a lower one.
    threshold: float | str = ADAPTED_THRESHOLD
    freeze_bn: bool = False  # keep the BatchNorm statistics of the starting weights
    checks: int = 3  # measurements on the held-back nuclei during training (Ctrl-C keeps the best)

    def __post_init__(self) -> None:
        rules: list[tuple[str, Callable[[float], bool], str]] = [
            ("minutes", lambda v: v > 0, "above 0"),
            ("steps", lambda v: v >= 0, "0 (use the time budget) or more"),
            ("lr", lambda v: v > 0, "above 0"),
            ("batch_size", lambda v: v >= 1, "at least 1"),
            ("holdout", lambda v: 0 < v < 1, "between 0 and 1"),
            ("threads", lambda v: v >= 0, "0 or more"),
        ]
        for name, ok, rule in rules:
            if not ok(getattr(self, name)):
                raise BridgeInputError(f"--{name.replace('_', '-')} must be {rule}, not {getattr(self, name)}")
        if self.loss not in LOSSES:
            raise BridgeInputError(f"unknown loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        if self.augment not in AUGMENT_POLICIES:
            raise BridgeInputError(f"unknown augmentation {self.augment!r}")
        if isinstance(self.threshold, str) and self.threshold not in ("search", "keep"):
            raise BridgeInputError(f"--threshold must be a number, 'search' or 'keep', not {self.threshold!r}")
        if not isinstance(self.threshold, str) and not 0 < self.threshold < 1:
            raise BridgeInputError(f"--threshold must be between 0 and 1, not {self.threshold}")

    @property
    def calibrate(self) -> bool:
        return self.threshold == "search"


# ------------------------------------------------------------------ holding back


def _unit_hash(*parts: object) -> float:
    """A stable number in [0, 1) for ``parts`` (the same on every machine and run)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _centroids(item: LabelledImage) -> dict[int, tuple[float, float]]:
    """(row, col) centroid of every target nucleus of ``item``."""
    out = {}
    for i, (sr, sc) in instance_slices(item.labels).items():
        if item.targets is not None and i not in item.targets:
            continue
        rr, cc = np.nonzero(item.labels[sr, sc] == i)
        out[i] = (rr.mean() + sr.start, cc.mean() + sc.start)
    return out


@dataclass
class Split:
    """The lab's data split in two: what training sees, and the held-back
    nuclei (``held``: the same images, ``targets`` = the held-back ids)."""

    train: list[LabelledImage]
    held: list[LabelledImage]

    @property
    def n_train(self) -> int:
        return sum(len(t.targets or ()) for t in self.train)

    @property
    def n_held(self) -> int:
        return sum(len(h.targets or ()) for h in self.held)


def hold_back(items: list[LabelledImage], fraction: float, block: int = HOLDOUT_BLOCK) -> Split:
    """Hold back the nuclei whose centroid falls in a block chosen by a stable
    hash of (image name, block); when the blocks give too few on either side
    (little data), every nucleus is chosen by its own hash instead.

    Training keeps the held-back nuclei's clicks as neighbours but their
    pixels become unknown, so their outlines are never learned."""
    cents = [_centroids(it) for it in items]

    def choose(key: Callable[[str, int, tuple[float, float]], float]) -> list[set[int]]:
        return [
            {i for i, rc in c.items() if key(it.name, i, rc) < fraction} for it, c in zip(items, cents, strict=True)
        ]

    held = choose(lambda name, i, rc: _unit_hash(name, int(rc[0] // block), int(rc[1] // block)))
    total = sum(len(c) for c in cents)
    n_held = sum(map(len, held))
    if n_held < MIN_HELD or total - n_held < MIN_TRAIN:
        held = choose(lambda name, i, rc: _unit_hash(name, i))
        n_held = sum(map(len, held))
    if n_held < MIN_HELD or total - n_held < MIN_TRAIN:
        raise BridgeInputError(
            f"only {total} nuclei to learn from; adapting needs at least {MIN_TRAIN + MIN_HELD} "
            f"({MIN_TRAIN} to train on and {MIN_HELD} held back to measure); outline more nuclei"
        )
    train, measure = [], []
    for it, c, h in zip(items, cents, held, strict=True):
        keep = frozenset(c) - h
        if keep:
            known = np.ones(it.labels.shape, bool) if it.known is None else it.known.copy()
            known &= ~np.isin(it.labels, list(h))
            train.append(LabelledImage(it.name, it.image, it.labels, known=known, targets=keep))
        if h:
            measure.append(LabelledImage(it.name, it.image, it.labels, known=it.known, targets=frozenset(h)))
    return Split(train, measure)


# ------------------------------------------------------------------ measuring


def measure(engine: NuClickEngine, items: list[LabelledImage], jitter: float = 5.0, seed: int = 0) -> dict:
    """AJI, PQ, SQ, DQ on each item's target nuclei: every labelled nucleus is
    clicked (so the exclusion maps are as in use), only the targets' nuclei
    are scored.  ``mean`` weighs each item by its number of targets."""
    return measure_thresholds(engine, items, (engine.threshold,), jitter, seed)[engine.threshold]


def measure_thresholds(
    engine: NuClickEngine, items: list[LabelledImage], thresholds: Sequence[float], jitter: float = 5.0, seed: int = 0
) -> dict[float, dict]:
    """:func:`measure` at each threshold; the network runs once per patch and
    its probabilities are post-processed at every threshold."""
    per: dict[float, dict[str, dict]] = {t: {} for t in thresholds}
    counts = []
    for it in items:
        xy, ids = simulate_clicks(it.labels, jitter, np.random.default_rng((seed, _seed_of(it.name))))
        clicks = [Click(float(x), float(y), id=str(i)) for (x, y), i in zip(xy, ids, strict=True)]
        scored = [k + 1 for k, i in enumerate(ids) if it.targets is None or int(i) in it.targets]
        wanted = np.zeros(len(clicks) + 1, bool)
        wanted[scored] = True
        truth = it.labels if it.targets is None else np.where(np.isin(it.labels, list(it.targets)), it.labels, 0)
        counts.append(len(scored))
        # only the scored nuclei and the neighbours whose masks they are resolved against need the network
        todo = _within(xy, np.asarray(scored) - 1, engine.patch_size)
        reader = ArrayReader(it.image)
        tape = _Tape(engine)
        for t in thresholds:
            engine.threshold = t
            with tape:
                masks = dict(engine.iter_patches(reader, clicks, todo))
            pred = engine.finish(clicks, masks, {}).instance_map(*it.labels.shape)
            m = all_metrics(truth, np.where(wanted[pred], pred, 0))
            per[t][it.name] = {"nuclei": len(scored), **{k: round(float(m[k]), 4) for k in REPORTED}}
    w = np.asarray(counts, float)
    out = {}
    for t, rows in per.items():
        mean = {k: round(float(np.dot(w, [r[k] for r in rows.values()]) / w.sum()), 4) for k in REPORTED}
        out[t] = {"mean": {"nuclei": int(w.sum()), **mean}, "per_image": rows}
    return out


def _within(xy: np.ndarray, chosen: np.ndarray, reach: float) -> list[int]:
    """Indices of the clicks within ``reach`` px (Chebyshev) of a chosen one, the chosen included."""
    if len(chosen) == 0:
        return []
    near = cKDTree(xy).query_ball_point(xy[chosen], r=reach, p=np.inf)
    return sorted(set(int(k) for ks in near for k in ks))


class _Tape:
    """While entered, the engine's network outputs are recorded the first
    time and played back every later time (the same patches, in the same
    order), so only the post-processing runs again."""

    def __init__(self, engine: NuClickEngine) -> None:
        self.engine, self.recorded, self.filled = engine, [], False

    def __enter__(self) -> None:
        forward = self.engine.predict
        if self.filled:
            replay = iter(self.recorded)
            self.engine.predict = lambda batch: next(replay)  # type: ignore[method-assign]
        else:
            self.engine.predict = lambda batch: self.recorded.append(forward(batch)) or self.recorded[-1]  # type: ignore[method-assign]

    def __exit__(self, *exc: object) -> None:
        del self.engine.predict  # the class's method again
        self.filled = True


def _seed_of(name: str) -> int:
    return int(_unit_hash("clicks", name) * 2**31)


def engine_for(model: nn.Module, info: ModelInfo, device: torch.device, precision: str, threshold: float):
    return NuClickEngine(model, info, device=device, batch_size=64, precision=precision, threshold=threshold)


def choose_threshold(model: nn.Module, info: ModelInfo, items: list[LabelledImage], device, precision) -> tuple:
    """The threshold with the best AJI on ``items`` (the nuclei trained on),
    with every threshold's AJI; ties go to the one nearest the model's."""
    engine = engine_for(model, info, device, precision, info.threshold)
    scores = {
        t: m["mean"]["aji"] for t, m in measure_thresholds(engine, _sample(items, CALIBRATE_MAX), THRESHOLDS).items()
    }
    best = max(THRESHOLDS, key=lambda t: (scores[t], -abs(t - info.threshold)))
    return best, scores


def _sample(items: list[LabelledImage], most: int) -> list[LabelledImage]:
    """The same images with at most ``most`` of their targets, a deterministic choice."""
    ranked = sorted((_unit_hash("calibrate", it.name, i), k, i) for k, it in enumerate(items) for i in it.targets or ())
    keep: dict[int, set[int]] = {}
    for _, k, i in ranked[:most]:
        keep.setdefault(k, set()).add(i)
    return [replace(items[k], targets=frozenset(ids)) for k, ids in sorted(keep.items())]


# ------------------------------------------------------------------ training


@dataclass
class AdaptResult:
    model: nn.Module  # the averaged weights, eval mode
    threshold: float
    before: dict
    after: dict
    steps: int
    seconds: float
    thresholds: dict = field(default_factory=dict)
    interrupted: bool = False

    @property
    def improved(self) -> bool:
        return self.after["mean"]["aji"] > self.before["mean"]["aji"]


def adapt(
    model: nn.Module,
    info: ModelInfo,
    items: list[LabelledImage],
    cfg: AdaptConfig,
    ckpt: Path,
    device: torch.device,
    progress: bool = True,
) -> AdaptResult:
    """Fine-tune ``model`` (the starting weights, fp32) on ``items`` as the
    module docstring says; ``ckpt`` is where it checkpoints and resumes from
    (deleted by the caller once the result is written)."""
    t_start = time.monotonic()
    budget = cfg.minutes * 60
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    split = hold_back(items, cfg.holdout)
    precision = resolve_precision(cfg.precision, device, training=True)
    infer_precision = resolve_precision(cfg.precision, device)
    fingerprint = hashlib.sha256(
        repr([(h.name, sorted(h.targets or ())) for h in split.held] + [info.sha256, asdict(cfg)]).encode()
    ).hexdigest()[:16]

    model = prepare(model, device)
    ema = AveragedModel(model, multi_avg_fn=partial(ema_update, decay=cfg.ema_decay), use_buffers=True)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    state: dict = {"step": 0, "total": cfg.steps, "fingerprint": fingerprint, "best": None}
    resumed = False
    if ckpt.is_file():
        blob = torch.load(ckpt, map_location="cpu", weights_only=False)
        if blob["state"].get("fingerprint") == fingerprint:
            model.load_state_dict(blob["model"])
            ema.load_state_dict(blob["ema"])
            opt.load_state_dict(blob["opt"])
            state = blob["state"]
            resumed = True
            log.info("resuming from %s at step %d of %d", ckpt, state["step"], state["total"])
        else:
            log.warning("%s belongs to other data or settings; starting afresh", ckpt)
    if "before" not in state:
        state["before"] = measure(engine_for(model, info, device, infer_precision, info.threshold), split.held)
    before = state["before"]
    log.info(
        "%d nuclei to train on, %d held back; before: AJI %.4f PQ %.4f",
        split.n_train,
        split.n_held,
        before["mean"]["aji"],
        before["mean"]["pq"],
    )
    ds = NucleusPatches(
        split.train,
        info.patch_size,
        info.sigma,
        cfg.jitter,
        drop_neighbour=cfg.drop_neighbour,
        seed=cfg.seed,
        policy=cfg.augment,
    )
    # the time it takes to measure once, for the budget (the final measure, the threshold choice)
    t_measure = max(1.0, time.monotonic() - t_start) if not resumed else 5.0
    # what is left to do after training, and the checks during it, in units of one measurement
    calibrating = 1.5 * min(split.n_train, CALIBRATE_MAX) / max(1, split.n_held) if cfg.calibrate else 0.0
    reserve = t_measure * (1 + cfg.checks + calibrating)

    def step_once(k: int) -> float:
        rng = np.random.default_rng((cfg.seed, k))
        batch = [ds[int(i)] for i in rng.integers(0, len(ds), cfg.batch_size)]
        stacked = tuple(torch.stack(t) for t in zip(*batch, strict=True))
        return train_step(model, ema, opt, sched, stacked, device, precision, cfg.loss)

    # the schedule's length: fixed by --steps, else from the first steps' pace and the time left
    probe = 3
    if state["total"] == 0:  # the probe steps are inside the warm-up, whatever the total turns out to be
        sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(lr_factor, warmup=cfg.warmup_steps, total=cfg.max_steps))
        _train_mode(model, cfg.freeze_bn)
        t0 = time.monotonic()
        for _ in range(probe):
            step_once(state["step"])
            state["step"] += 1
        per_step = (time.monotonic() - t0) / probe
        left = budget - (time.monotonic() - t_start) - reserve
        epochs_cap = cfg.max_epochs * split.n_train / cfg.batch_size
        state["total"] = int(min(cfg.max_steps, max(probe + 10, min(left / per_step, epochs_cap))))
        log.info(
            "%.2f s per step: %d steps fit the %g-minute budget and %g passes over the nuclei",
            per_step,
            state["total"],
            cfg.minutes,
            cfg.max_epochs,
        )
    total = state["total"]
    # The schedule reads the planned length each step, so that a run that falls behind its budget (the
    # computer got busier after the probe) can end its cosine sooner instead of overrunning.
    plan = {"total": total}
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.warmup_steps, plan["total"]))
    if resumed and "sched" in blob:
        sched.load_state_dict(blob["sched"])
    else:
        for _ in range(state["step"]):
            sched.step()
    check_at = {round(total * (k + 1) / (cfg.checks + 1)) for k in range(cfg.checks)} if cfg.checks else set()
    interrupted = False
    bar = tqdm(total=total, initial=state["step"], desc="adapting", unit="step", disable=not progress, mininterval=5)
    run_loss = 0.0
    t_loop, first_step = time.monotonic(), state["step"]
    training_s = 0.0  # time in training steps alone (the checks are budgeted apart)
    try:
        _train_mode(model, cfg.freeze_bn)
        while state["step"] < total:
            t_step = time.monotonic()
            loss = step_once(state["step"])
            training_s += time.monotonic() - t_step
            state["step"] += 1
            run_loss = 0.95 * run_loss + 0.05 * loss if run_loss else loss
            bar.update(1)
            bar.set_postfix(loss=f"{run_loss:.3f}", refresh=False)
            if not progress and state["step"] % max(1, total // 10) == 0:  # a log or a script: a line per tenth
                done = state["step"] - first_step
                eta = (total - state["step"]) * (time.monotonic() - t_loop) / max(1, done) / 60
                log.info(
                    "step %d of %d, loss %.3f, about %.1f min of training left", state["step"], total, run_loss, eta
                )
            if not cfg.steps and state["step"] % REPLAN_EVERY == 0:
                left_checks = sum(1 for c in check_at if c > state["step"])
                left = budget - (time.monotonic() - t_start) - t_measure * (1 + left_checks + calibrating)
                fits = steps_that_fit(state["step"], total, left, training_s / max(1, state["step"] - first_step))
                if fits < total:
                    log.info("behind the time budget: ending at step %d instead of %d", fits, total)
                    total = plan["total"] = state["total"] = fits
                    bar.total = total
            if state["step"] in check_at:
                _check(state, ema.module, info, split, device, infer_precision, bar)
                save_checkpoint(ckpt, model, ema, opt, sched, state, cfg)
                _train_mode(model, cfg.freeze_bn)
    except KeyboardInterrupt:
        interrupted = True
        log.warning("interrupted at step %d of %d: keeping the best measured so far", state["step"], total)
    finally:
        bar.close()
    final = ema.module.eval()
    if interrupted and state.get("best_state") is not None:
        final.load_state_dict(state["best_state"])
    if not interrupted:
        save_checkpoint(ckpt, model, ema, opt, sched, state, cfg)
    threshold = info.threshold if isinstance(cfg.threshold, str) else float(cfg.threshold)
    scores: dict = {}
    if cfg.calibrate and not interrupted:
        threshold, scores = choose_threshold(final, info, split.train, device, infer_precision)
        log.info("threshold %.2f (AJI on the trained nuclei: %s)", threshold, scores)
    after = measure(engine_for(final, info, device, infer_precision, threshold), split.held)
    return AdaptResult(
        model=final.cpu().float(),
        threshold=threshold,
        before=before,
        after=after,
        steps=state["step"],
        seconds=time.monotonic() - t_start,
        thresholds=scores,
        interrupted=interrupted,
    )


def steps_that_fit(step: int, total: int, left_s: float, pace_s: float) -> int:
    """The run's new length: ``total`` while the steps left fit the ``left_s``
    seconds at ``pace_s`` a step, else as many as fit (at least one more)."""
    return min(total, step + max(1, int(left_s / max(pace_s, 1e-9))))


def _train_mode(model: nn.Module, freeze_bn: bool) -> None:
    """Training mode; with ``freeze_bn`` the BatchNorm layers keep normalising
    with the starting weights' statistics and do not update them."""
    model.train()
    if freeze_bn:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def _check(state: dict, model: nn.Module, info: ModelInfo, split: Split, device, precision, bar) -> None:
    """Measure the averaged weights on the held-back nuclei; keep the best
    state so that Ctrl-C can fall back on it."""
    model.eval()
    m = measure(engine_for(model, info, device, precision, info.threshold), split.held)["mean"]
    bar.write(f"step {state['step']}: held-back AJI {m['aji']:.4f} PQ {m['pq']:.4f}")
    if state["best"] is None or m["aji"] > state["best"]:
        state["best"] = m["aji"]
        state["best_state"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def summary_line(result: AdaptResult) -> str:
    b, a = result.before["mean"], result.after["mean"]
    return (
        f"held-back {a['nuclei']} nuclei: AJI {b['aji']:.4f} -> {a['aji']:.4f} ({a['aji'] - b['aji']:+.4f}), "
        f"PQ {b['pq']:.4f} -> {a['pq']:.4f} ({a['pq'] - b['pq']:+.4f}), "
        f"SQ {b['sq']:.4f} -> {a['sq']:.4f}; {result.steps} steps in {result.seconds / 60:.1f} min"
        + (f"; threshold {result.threshold:.2f}" if result.thresholds else "")
    )
