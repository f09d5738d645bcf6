"""``nuclick-bridge adapt``: fine-tune weights on a lab's own corrected nuclei.

Imported when the parser is built: nothing heavy at module level (torch,
paquo and omero-py load inside :func:`run`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from dataclasses import asdict
from pathlib import Path

from bridge.commands.common import add_device_options
from bridge.errors import BridgeInputError

DEFAULT_REGION_CLASS = "NuClick training"
DEFAULT_MINUTES = 14.0
SHOWN_IMAGES = 20  # per-image (per-region) lines printed; the JSON report has them all

DESCRIPTION = (
    "Teach the network your lab's own outlines. Start from the shipped weights (or --init FILE) and fine-tune "
    "them on nuclei your annotators drew or corrected, within a time budget that fits a lab computer. Part of "
    "your nuclei is held back (the same part every time) and the held-back AJI / PQ / SQ is measured before and "
    "after; the new weights file is written only when it beats its starting weights there. Stop it with "
    "Ctrl-C at any time: it keeps the best weights measured so far. Run the same command again to resume."
)
EPILOG = """sources of nuclei (choose one):
  --data DIR        images/ + labels/ (uint16 instance maps) as in ../shared/data; every image, or --split
  --qupath PROJECT  areas annotated with the class --region-class (default 'NuClick training') are complete:
                    every nucleus inside is outlined (our detections after your edits, or your own
                    detections/annotations). Nuclei outside regions are used as neighbours only.
  --omero           rectangle or polygon ROIs named --region-name on the --image ids; nuclei are the
                    polygon ROIs inside them (login flags as for 'nuclick-bridge omero')

examples:
  nuclick-bridge adapt --qupath ~/projects/liver --out lab.pt
  nuclick-bridge adapt --data ../shared/data/cpm15_dev --split adapt --out runs/cpm15.pt
then serve it beside the shipped model:
  nuclick-bridge serve --weights lab=lab.pt     (requests name the model 'lab')"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("where the lab's nuclei are").add_mutually_exclusive_group(required=True)
    src.add_argument("--data", metavar="DIR", help="a dataset folder: images/*.png, labels/*.png (uint16 instance ids)")
    src.add_argument("--qupath", metavar="PROJECT", help="a QuPath project (project.qpproj or its folder)")
    src.add_argument("--omero", action="store_true", help="an OMERO server (see the OMERO flags below)")
    p.add_argument("--split", default=None, help="with --data: only the images of this split in split.json")
    p.add_argument(
        "--region-class",
        default=DEFAULT_REGION_CLASS,
        metavar="NAME",
        help="the class of the QuPath area annotations (with --omero: the name of the ROIs) that mark complete "
        f"regions (default: {DEFAULT_REGION_CLASS!r})",
    )
    p.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="NAME|ID",
        help="with --qupath: only this image entry (repeatable; default: every image with regions); "
        "with --omero: an image id (repeatable)",
    )
    p.add_argument("--dataset", type=int, default=None, metavar="ID", help="with --omero: every image of this dataset")
    p.add_argument("--project", type=int, default=None, metavar="ID", help="with --omero: every image of this project")
    p.add_argument(
        "--pixel-size",
        type=float,
        default=None,
        metavar="UM",
        help="pixel size in µm for images that record none (default: such images are refused; --data images "
        "are taken to be at the model's 0.25 µm)",
    )
    p.add_argument("--out", required=True, metavar="WEIGHTS", help="where to write the adapted weights file")
    p.add_argument("--init", default=None, metavar="FILE", help="weights to start from (default: the shipped ones)")
    p.add_argument("--name", default=None, help="the model's name in the file (default: the --out file's stem)")
    p.add_argument(
        "--minutes",
        type=float,
        default=DEFAULT_MINUTES,
        help=f"time budget for the whole run, measuring included (default: {DEFAULT_MINUTES:g})",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=0,
        help="train exactly this many steps instead of filling the time budget (repeatable results; default: 0)",
    )
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (default: 3e-4)")
    p.add_argument("--holdout", type=float, default=0.2, help="share of the nuclei held back to measure (default: 0.2)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: its default)")
    p.add_argument(
        "--threshold",
        type=_threshold,
        default=0.5,
        metavar="T|search|keep",
        help="the adapted file's probability threshold: a number (default: 0.5, where training puts your lab's "
        "outline), 'search' for the best on the nuclei trained on, or 'keep' for the starting weights' (0.4 "
        "for the shipped ones)",
    )
    p.add_argument(
        "--no-threshold-search", dest="threshold", action="store_const", const="keep", help=argparse.SUPPRESS
    )
    p.add_argument(
        "--augment",
        choices=("standard", "strong"),
        default="standard",
        help="training augmentation: standard (default), or strong = wider scale and stain jitter",
    )
    p.add_argument(
        "--freeze-bn",
        action="store_true",
        help="keep the starting weights' BatchNorm statistics instead of learning the lab's (default: learn them)",
    )
    p.add_argument(
        "--force", action="store_true", help="write the file even when it does not beat its starting weights"
    )
    add_device_options(p, inference=False)
    from bridge.commands.omero import add_login_arguments

    add_login_arguments(p, required=False)


def load_items(args: argparse.Namespace, pixel_size_um: float) -> tuple[list, str, int]:
    """(training images, a description of the source, how many nuclei)."""
    if args.data:
        from bridge.evaluation.datasets import load_split

        root = Path(args.data)
        if not (root / "images").is_dir():
            raise BridgeInputError(f"{root} is not a dataset folder (no images/ inside)")
        items = load_split(root, args.split)
        source = f"data {root.resolve()}" + (f" split {args.split}" if args.split else "")
    elif args.qupath:
        from bridge.connectors.qupath.paquo import open_project, project_file

        project_file(args.qupath)  # a clear error before paquo starts Java
        items = qupath_items(open_project(args.qupath, readonly=True), args, pixel_size_um)
        source = f"qupath {Path(args.qupath).resolve()} class {args.region_class!r}"
    else:
        from bridge.commands.omero import connect_from_args

        conn, hard = connect_from_args(args)
        try:
            items = omero_items(conn, args, pixel_size_um)
        finally:
            conn.close(hard=hard)
        source = f"omero {args.host} ROIs named {args.region_class!r}"
    n = sum(len(it.targets) if it.targets is not None else len(set(it.labels[it.labels > 0].tolist())) for it in items)
    return items, source, n


def _samples(labs: list, args: argparse.Namespace, pixel_size_um: float) -> list:
    """The training images of every lab image's regions; each image's pixels are closed once read."""
    from bridge.io.regions import region_samples

    items = []
    try:
        for lab in labs:
            if lab.pixel_size_um is None and args.pixel_size:
                lab.pixel_size_um = args.pixel_size
            items += region_samples(lab, pixel_size_um)
    finally:
        for lab in labs:
            lab.reader.close()
    return items


def qupath_items(project, args: argparse.Namespace, pixel_size_um: float) -> list:
    """Training images from an opened QuPath project (paquo's, or its test double)."""
    from bridge.connectors.qupath.regions import project_regions

    return _samples(project_regions(project, args.region_class, args.image), args, pixel_size_um)


def omero_items(conn, args: argparse.Namespace, pixel_size_um: float) -> list:
    """Training images from a logged-in OMERO connection (BlitzGateway, or its test double)."""
    from bridge.connectors.omero.gateway import image_ids
    from bridge.connectors.omero.regions import omero_regions

    try:
        wanted = [int(i) for i in args.image]
    except ValueError as exc:
        raise BridgeInputError(f"with --omero, --image takes image ids (numbers), not {exc}") from exc
    if not (wanted or args.dataset is not None or args.project is not None):
        raise BridgeInputError("--omero needs the images: --image ID (repeatable), --dataset ID or --project ID")
    ids = image_ids(conn, wanted, args.dataset, args.project)
    if not ids:
        raise BridgeInputError("no images to learn from (the dataset or project is empty)")
    return _samples(omero_regions(conn, ids, args.region_class), args, pixel_size_um)


def _threshold(text: str) -> float | str:
    """``--threshold``'s value: 'search', 'keep' or a number between 0 and 1."""
    if text in ("search", "keep"):
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, 'search' or 'keep', not {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, not {value}")
    return value


def config_from_args(args: argparse.Namespace):
    """The :class:`~bridge.train.adapt.AdaptConfig` the flags ask for."""
    from bridge.train.adapt import AdaptConfig

    if args.pixel_size is not None and args.pixel_size <= 0:
        raise BridgeInputError(f"--pixel-size must be above 0, not {args.pixel_size}")
    return AdaptConfig(
        minutes=args.minutes,
        steps=args.steps,
        lr=args.lr,
        holdout=args.holdout,
        seed=args.seed,
        precision=args.precision,
        threads=args.threads,
        threshold=args.threshold,
        freeze_bn=args.freeze_bn,
        augment=args.augment,
    )


def run(args: argparse.Namespace) -> int:
    from bridge.model.weights import load_model, resolve_device

    out = Path(args.out)
    if out.suffix != ".pt":
        raise BridgeInputError(f"--out must name a .pt file, not {out.name}")
    if not out.parent.exists():
        raise BridgeInputError(f"the folder of --out does not exist: {out.parent}")
    cfg = config_from_args(args)
    device = resolve_device(args.device)
    model, info = load_model(args.init)
    items, source, n_nuclei = load_items(args, info.pixel_size_um)
    return adapt_and_write(args, cfg, (model, info), items, source, n_nuclei, device)


def adapt_and_write(
    args: argparse.Namespace, cfg, start: tuple, items: list, source: str, n_nuclei: int, device
) -> int:
    """Adapt ``start`` (network, info) on ``items``, report, and write --out
    only when it beats the starting weights on the held-back nuclei (or --force)."""
    from bridge.model.weights import derived_meta, save_weights, source_record
    from bridge.train.adapt import adapt, summary_line

    model, info = start
    out = Path(args.out)
    ckpt = out.with_suffix(".ckpt")
    result = adapt(model, info, items, cfg, ckpt, device, progress=sys.stderr.isatty())
    print(summary_line(result), file=sys.stderr)
    shown = list(result.after["per_image"].items())
    for name, a in shown[:SHOWN_IMAGES]:
        b = result.before["per_image"][name]
        print(
            f"  {name}: {a['nuclei']} nuclei, AJI {b['aji']:.4f} -> {a['aji']:.4f}, PQ {b['pq']:.4f} -> {a['pq']:.4f}",
            file=sys.stderr,
        )
    if len(shown) > SHOWN_IMAGES:
        print(f"  ... and {len(shown) - SHOWN_IMAGES} more (every one in the JSON line below)", file=sys.stderr)
    report = {
        "out": str(out),
        "written": False,
        "source": source,
        "nuclei": n_nuclei,
        "before": result.before,
        "after": result.after,
        "threshold": result.threshold,
        "steps": result.steps,
        "minutes": round(result.seconds / 60, 2),
    }
    if not result.improved and not args.force:
        ckpt.unlink(missing_ok=True)  # the run is over: nothing to resume, nothing left behind
        print(json.dumps(report))
        b, a = result.before["mean"], result.after["mean"]
        raise BridgeInputError(
            f"not written: the adapted weights do not beat the starting ones on the {a['nuclei']} held-back nuclei "
            f"(AJI {b['aji']:.4f} -> {a['aji']:.4f}, PQ {b['pq']:.4f} -> {a['pq']:.4f}); outline more nuclei, "
            "give it more --minutes, or keep it anyway with --force"
        )
    meta = derived_meta(
        info,
        adapted_from=source_record(args.init or "shipped", info),
        adapt={
            "date": dt.date.today().isoformat(),
            "source": source,
            "nuclei": n_nuclei,
            "held_back": result.after["mean"]["nuclei"],
            "before": result.before,
            "after": result.after,
            "steps": result.steps,
            "minutes": round(result.seconds / 60, 2),
            "interrupted": result.interrupted,
            "threshold_search": result.thresholds,
            "config": asdict(cfg),
        },
    )
    meta.update(name=args.name or out.stem, threshold=result.threshold)
    save_weights(out, result.model, meta)
    if result.interrupted:  # the same command again goes on from the last checkpoint
        print(
            f"interrupted: wrote the best weights so far; run the same command again to go on ({ckpt})", file=sys.stderr
        )
    else:
        ckpt.unlink(missing_ok=True)
    report["written"] = True
    print(json.dumps(report))
    return 0
