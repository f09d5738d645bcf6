"""The training loop: AdamW with a linear warm-up then cosine decay, NuClick's
hybrid loss (optionally plus a Lovász hinge), an exponential moving average of the weights (what is validated
and shipped), regular checkpoints that a later run of the same command resumes from, and
validation AJI per epoch on the validation split."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from bridge.errors import BridgeInputError
from bridge.evaluation.datasets import LabelledImage
from bridge.evaluation.evaluate import evaluate
from bridge.model.architectures import GROWS_FROM, JOINED_FROM, ArchSpec, build, parse_arch, spec_of
from bridge.model.effunet import EffUNet, load_pretrained_encoder
from bridge.model.precision import as_input, autocast, prepare, resolve_precision
from bridge.model.weights import ModelInfo, load_model, save_weights, source_record
from bridge.nuclick.engine import NuClickEngine
from bridge.train.augment import AUGMENT_POLICIES
from bridge.train.data import NucleusPatches
from bridge.train.loss import LOSSES, training_loss

log = logging.getLogger("bridge.train")


# (field, test, what the test asks) for TrainConfig's numbers
_RANGES: list[tuple[str, Callable[[float], bool], str]] = [
    ("epochs", lambda v: v >= 1, "at least 1"),
    ("batch_size", lambda v: v >= 1, "at least 1"),
    ("lr", lambda v: v > 0, "above 0"),
    ("sigma", lambda v: v > 0, "above 0"),
    ("jitter", lambda v: v >= 0, "0 or more"),
    ("val_jitter", lambda v: v >= 0, "0 or more"),
    ("patch_size", lambda v: v >= 32 and v % 32 == 0, "a multiple of 32 (the encoder's stride)"),
    ("samples_per_epoch", lambda v: v >= 0, "0 (every nucleus once) or more"),
    ("checkpoint_every", lambda v: v >= 1, "at least 1"),
    ("threads", lambda v: v >= 0, "0 (torch's default) or more"),
    ("warmup_steps", lambda v: v >= 0, "0 or more"),
    ("weight_decay", lambda v: v >= 0, "0 or more"),
    ("ema_decay", lambda v: 0 <= v < 1, "from 0 (no average) up to, not including, 1"),
    ("drop_neighbour", lambda v: 0 <= v <= 1, "a probability from 0 to 1"),
]
# CLI spellings where they differ from the field's name
_FLAGS = {"drop_neighbour": "drop_neighbours"}
# fields that `train` has no flag for: an error names them as the Python API spells them
_API_ONLY = {"val_jitter", "checkpoint_every"}


@dataclass
class TrainConfig:
    arch: str = "effunet-lite0"  # a name in bridge.model.architectures
    width: float = 0.25  # nuclick only
    epochs: int = 20
    batch_size: int = 16
    lr: float | None = None  # None: 3e-3 for nuclick (as published), 1e-3 for a pretrained effunet
    sigma: float = 2.0
    jitter: float = 5.0
    patch_size: int = 128
    samples_per_epoch: int = 0  # 0: every training nucleus once per epoch
    val_jitter: float = 5.0
    val_seed: int = 0
    checkpoint_every: int = 200  # steps
    seed: int = 0
    threads: int = 0  # 0: torch's default
    precision: str = "auto"  # autocast: bf16 on a CPU that has it, fp16 on CUDA
    warmup_steps: int = 300  # linear warm-up before the cosine decay
    weight_decay: float = 1e-4
    ema_decay: float = 0.999  # 0: no moving average; validate and ship the raw weights
    drop_neighbour: float = 0.1  # chance that a neighbour's click is left out of the exclusion map
    augment: str = "standard"  # a name in bridge.train.augment.AUGMENT_POLICIES
    pretrained: bool = True  # start an EfficientNet-Lite encoder from its ImageNet weights
    loss: str = "nuclick"  # a name in bridge.train.loss.LOSSES

    def __post_init__(self) -> None:
        if self.lr is None:
            self.lr = 3e-3 if self.arch == "nuclick" else 1e-3
        # refused here, before any data is read, not at the first step (or
        # never: a decay of 1.5 or a sigma of 0 would train garbage quietly)
        for name, ok, rule in _RANGES:
            value = getattr(self, name)
            if not ok(value):
                flag = f"TrainConfig.{name}" if name in _API_ONLY else "--" + _FLAGS.get(name, name).replace("_", "-")
                raise BridgeInputError(f"{flag} must be {rule}, not {value}")
        if self.loss not in LOSSES:
            raise BridgeInputError(f"unknown loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        if self.augment not in AUGMENT_POLICIES:
            raise BridgeInputError(
                f"unknown augmentation {self.augment!r}; choose one of {', '.join(AUGMENT_POLICIES)}"
            )


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up over ``warmup`` steps (a pretrained encoder is not shaken
    by the decoder's first random gradients), then cosine decay to 1%."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t))


def ema_decay_at(n: int, decay: float) -> float:
    """The moving average's decay after ``n`` updates: short at first, so the
    average is not mostly the random starting weights for thousands of steps
    (with a fixed 0.999 it still held 37% of them after the first 1000)."""
    return min(decay, (1 + n) / (10 + n))


@torch.no_grad()
def ema_update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged, decay: float) -> None:
    """``AveragedModel``'s multi-tensor update: averaged += (1 - d) * (current - averaged)."""
    d = ema_decay_at(int(num_averaged), decay)
    if averaged and averaged[0].is_floating_point():
        torch._foreach_lerp_(averaged, current, 1.0 - d)
    else:  # counters such as BatchNorm's num_batches_tracked are copied, not averaged
        torch._foreach_copy_(averaged, current)


def train_step(model, ema, opt, sched, batch, device, precision: str, loss_name: str) -> float:
    """One optimiser step on ``batch`` (inputs, targets, weights), then the
    schedule and the moving average (``ema`` may be None); returns the loss."""
    x, y, w = (as_input(batch[0], device), batch[1].to(device), batch[2].to(device))
    with autocast(device, precision):
        logits = model(x)
    loss = training_loss(loss_name, logits.float(), y, w)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    if ema is not None:
        ema.update_parameters(model)
    return float(loss.item())


def save_checkpoint(path: Path, model, ema, opt, sched, state: dict, cfg) -> None:
    """Everything a run resumes from (``cfg``: its config dataclass), written
    whole or not at all; ``ema`` may be None."""
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "model": model.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            "opt": opt.state_dict(),
            "sched": sched.state_dict(),
            "state": state,
            "config": asdict(cfg),
        },
        tmp,
    )
    tmp.replace(path)


def validate(model: nn.Module, cfg: TrainConfig, val: dict[str, list[LabelledImage]], device) -> dict:
    """Validation metrics per dataset with the inference engine itself."""
    info = ModelInfo("val", "val", "", cfg.width, cfg.patch_size, cfg.sigma, arch=cfg.arch)
    engine = NuClickEngine(model, info, device=device, batch_size=64, precision=cfg.precision)
    out = {}
    for name, items in val.items():
        rep = evaluate(items, engine.segment, jitter=cfg.val_jitter, seed=cfg.val_seed, progress=False)
        out[name] = {k: round(float(v), 4) for k, v in rep.summary.items()}
    model.train()
    return out


def start_from(model: nn.Module, spec: ArchSpec, init: Path) -> dict:
    """Load ``--init`` weights into ``model``: the same architecture, or the one
    it grows from (``GROWS_FROM``), whose weights fill every shared layer while
    the new parts keep their identity start.  From a joined file (``JOINED_FROM``,
    the two- and three-view networks) the view of that architecture is taken,
    unless the joined network itself is trained (fine-tuned as a whole).

    Returns the init file's :func:`source_record`, which the weights written
    by this run keep as ``init_from``."""
    start_model, start_info = load_model(init)
    record = source_record(init, start_info)
    start_arch = start_info.arch
    base, new_part = GROWS_FROM.get(spec.label, ("", ""))
    if start_arch in JOINED_FROM and start_arch != spec.label:  # start from its part of this architecture (or base)
        parts = {spec_of(m).label: m for m in start_model.children()}
        part = parts.get(spec.label, parts.get(base))
        if part is None:
            raise BridgeInputError(f"--init weights {init.name} are {start_arch}, with no {spec.label} part")
        start_model, start_arch = part, spec_of(part).label
    if start_arch == spec.label:
        model.load_state_dict(start_model.state_dict())
        return record
    if base != start_arch:
        raise BridgeInputError(f"--init weights {init.name} are {start_arch}, not {spec.label}")
    missing, unexpected = model.load_state_dict(start_model.state_dict(), strict=False)
    if unexpected or any(not new_part or not k.startswith(new_part) for k in missing):
        raise BridgeInputError(f"--init weights {init.name} do not fit {spec.label}")
    return record


def train(
    cfg: TrainConfig,
    train_items: list[LabelledImage],
    val: dict[str, list[LabelledImage]],
    out: Path,
    device: torch.device,
    resume: Path | None = None,
    meta: dict | None = None,
    init: Path | None = None,
) -> dict:
    """Train, checkpointing to ``OUT.ckpt`` beside ``out``; the weights with the
    best mean validation AJI are written to ``out``.  Returns the final state."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    ckpt_path = out.with_suffix(".ckpt")
    log_path = out.with_suffix(".log.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    ds = NucleusPatches(
        train_items,
        cfg.patch_size,
        cfg.sigma,
        cfg.jitter,
        drop_neighbour=cfg.drop_neighbour,
        seed=cfg.seed,
        policy=cfg.augment,
    )
    per_epoch = cfg.samples_per_epoch or len(ds)
    steps_per_epoch = max(1, per_epoch // cfg.batch_size)
    precision = resolve_precision(cfg.precision, device, training=True)
    spec = parse_arch(cfg.arch, cfg.width)
    model = build(spec)
    total = steps_per_epoch * cfg.epochs
    state = {"epoch": 0, "step_in_epoch": 0, "step": 0, "best_aji": -1.0, "history": []}
    src = resume if resume is not None else (ckpt_path if ckpt_path.is_file() else None)
    if init is not None and src is None:  # fine-tune from trained weights; a checkpoint of this run wins
        state["init_from"] = start_from(model, spec, init)  # kept in the checkpoint, for a resumed run
        log.info("starting from the weights in %s", init)
    elif src is None and cfg.pretrained and isinstance(model, EffUNet):
        load_pretrained_encoder(model)
        log.info("encoder initialised from ImageNet-pretrained EfficientNet-%s", model.variant.capitalize())
    model = prepare(model, device)
    ema = (
        AveragedModel(model, multi_avg_fn=partial(ema_update, decay=cfg.ema_decay), use_buffers=True)
        if cfg.ema_decay > 0
        else None
    )
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(lr_factor, warmup=cfg.warmup_steps, total=total))
    if src is not None:
        blob = torch.load(src, map_location="cpu", weights_only=False)
        model.load_state_dict(blob["model"])
        if ema is not None and blob.get("ema") is not None:
            ema.load_state_dict(blob["ema"])
        opt.load_state_dict(blob["opt"])
        sched.load_state_dict(blob["sched"])
        state = blob["state"]
        log.info("resumed from %s at epoch %d step %d", src, state["epoch"], state["step_in_epoch"])
    shipped = ema.module if ema is not None else model
    log.info(
        "training on %d nuclei, %d steps/epoch, %d epochs, device %s, precision %s",
        len(ds),
        steps_per_epoch,
        cfg.epochs,
        device,
        precision,
    )
    model.train()
    while state["epoch"] < cfg.epochs:
        epoch = state["epoch"]
        ds.epoch = epoch
        order = np.random.default_rng((cfg.seed, epoch)).permutation(len(ds))
        if per_epoch > len(ds):
            order = np.resize(order, per_epoch)
        order = order[: steps_per_epoch * cfg.batch_size]
        start = state["step_in_epoch"]
        loader = DataLoader(
            Subset(ds, order[start * cfg.batch_size :].tolist()),
            batch_size=cfg.batch_size,
            shuffle=False,
            num_workers=0,
            drop_last=True,
        )
        bar = tqdm(
            loader,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            initial=start,
            total=steps_per_epoch,
            mininterval=15,
        )
        run_loss, t0 = 0.0, time.time()
        for x, y, w in bar:
            loss = train_step(model, ema, opt, sched, (x, y, w), device, precision, cfg.loss)
            state["step"] += 1
            state["step_in_epoch"] += 1
            run_loss = 0.98 * run_loss + 0.02 * loss if run_loss else loss
            bar.set_postfix(loss=f"{run_loss:.4f}", lr=f"{sched.get_last_lr()[0]:.1e}", refresh=False)
            if state["step_in_epoch"] % cfg.checkpoint_every == 0:
                save_checkpoint(ckpt_path, model, ema, opt, sched, state, cfg)
        bar.close()
        model.eval()
        shipped.eval()
        metrics = validate(shipped, cfg, val, device) if val else {}
        mean_aji = float(np.mean([m["aji"] for m in metrics.values()])) if metrics else -float(run_loss)
        record = {
            "epoch": epoch + 1,
            "loss": round(run_loss, 5),
            "val": metrics,
            "mean_aji": round(mean_aji, 4),
            "seconds": round(time.time() - t0, 1),
        }
        log.info("epoch %d: %s", epoch + 1, json.dumps(record))
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        state["history"].append(record)
        if mean_aji > state["best_aji"]:
            state["best_aji"] = mean_aji
            save_weights(
                out,
                shipped,
                {
                    **(meta or {}),
                    **({"init_from": state["init_from"]} if state.get("init_from") else {}),
                    "patch_size": cfg.patch_size,
                    "sigma": cfg.sigma,
                    "epoch": epoch + 1,
                    "val": metrics,
                    "train_config": asdict(cfg),
                },
            )
            log.info("new best mean val AJI %.4f -> wrote %s", mean_aji, out)
        state["epoch"] += 1
        state["step_in_epoch"] = 0
        save_checkpoint(ckpt_path, model, ema, opt, sched, state, cfg)
        model.train()
    return state
