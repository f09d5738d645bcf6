"""``nuclick-bridge train``."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from bridge.errors import BridgeInputError
from bridge.evaluation.datasets import check_trainable, load_split


def _git_commit() -> str:
    try:
        # the package's own checkout, wherever the command is run from
        here = str(Path(__file__).resolve().parent)
        cmd = ["git", "-C", here, "rev-parse", "HEAD"]
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
    except Exception:
        return "unknown"


def run(args: argparse.Namespace) -> int:
    from bridge.model.architectures import JOINED_FROM, parse_arch
    from bridge.model.weights import resolve_device
    from bridge.train.loop import TrainConfig, train

    try:  # before any data is read
        spec = parse_arch(args.arch, args.width)
    except ValueError as exc:
        raise BridgeInputError(str(exc)) from exc
    if spec.label in JOINED_FROM and not args.init:
        raise BridgeInputError(
            f"{spec.label} starts from its trained parts: {JOINED_FROM[spec.label].recipe()}; "
            "then fine-tune the joined file as a whole with --init"
        )
    cfg = TrainConfig(
        arch=args.arch,
        width=args.width,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        sigma=args.sigma,
        jitter=args.jitter,
        samples_per_epoch=args.samples_per_epoch,
        seed=args.seed,
        threads=args.threads,
        precision=args.precision,
        warmup_steps=args.warmup_steps,
        ema_decay=args.ema_decay,
        drop_neighbour=args.drop_neighbours,
        augment=args.augment,
        loss=args.loss,
        patch_size=args.patch_size,
    )
    if args.val_limit < 0:
        raise BridgeInputError(f"--val-limit must be 0 (every val image) or more, not {args.val_limit}")

    roots = [Path(d) for d in args.data]
    for r in roots:
        if not (r / "images").is_dir():
            raise BridgeInputError(f"{r} is not a dataset folder (no images/ inside)")
    train_items = []
    val = {}
    for r in roots:
        items = load_split(r, args.train_split)
        empty = check_trainable(r, items)
        if empty:
            print(f"note: {len(empty)} {r.name} label map(s) have no nuclei and add no samples", file=sys.stderr)
        train_items += items
        if args.val_split:
            items = load_split(r, args.val_split)
            check_trainable(r, items)
            val[r.name] = items[: args.val_limit] if args.val_limit else items
    meta = {
        "name": spec.label,
        "data": [str(r) for r in roots],
        "train_split": args.train_split,
        "val_split": args.val_split,
        "code_commit": _git_commit(),
        "init": args.init,
        "licence": "CC BY-NC-SA 4.0 (trained on MoNuSeg/CoNSeP): non-commercial use only",
    }
    state = train(
        cfg,
        train_items,
        val,
        Path(args.out),
        resolve_device(args.device),
        Path(args.resume) if args.resume else None,
        meta,
        init=Path(args.init) if args.init else None,
    )
    print(json.dumps({"best_mean_val_aji": state["best_aji"], "epochs": state["epoch"], "out": args.out}))
    return 0
