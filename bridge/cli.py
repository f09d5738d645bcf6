"""The ``nuclick-bridge`` command line.

Every subcommand turns bad input into one readable error line and a non-zero
exit; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap
from collections.abc import Callable

from bridge import __version__
from bridge.commands.common import add_device_options, add_server_options
from bridge.errors import BridgeInputError

EXIT_INPUT = 2
EXIT_INTERNAL = 1
# Packages only the `engine` extra installs: a command that segments in this process without
# them says so in one line (a client-only install has none of them, see pyproject.toml).
ENGINE_MODULES = frozenset({"torch", "grpc_reflection", "prometheus_client"})
ENGINE_HINT = "this needs the engine extra: pip install 'nuclick-bridge[engine]' (or segment on a server with --server)"

Handler = Callable[[argparse.Namespace], int]


def _add_engine(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--method",
        default="nuclick",
        choices=("nuclick", "watershed"),
        help="nuclick (the trained network, default) or watershed (the paper's baseline, no weights needed)",
    )
    p.add_argument(
        "--weights",
        default=None,
        metavar="FILE",
        help="NuClick weights file (default: the weights shipped inside the package)",
    )
    add_device_options(p)
    p.add_argument("--batch-size", type=int, default=32, metavar="N", help="patches per network batch (default: 32)")
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="probability threshold (default: the model's, 0.4 as published)",
    )
    p.add_argument(
        "--tta",
        type=int,
        default=1,
        choices=(1, 2, 4, 8),
        help="test-time augmentation: average over this many flips/rotations of each patch; "
        "costs that many times the network time for about +0.003 AJI (default: 1, off)",
    )


def version_text() -> str:
    """The package version and the shipped model's, read from the card's JSON (no torch needed)."""
    import json
    from importlib.resources import files

    try:
        card = json.loads(files("bridge").joinpath("weights/model_card.json").read_text())
        model = f"model {card['name']} version {card['version']}"
    except (OSError, ValueError, KeyError):
        model = "no model shipped"
    return f"nuclick-bridge {__version__} ({model})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nuclick-bridge",
        description="Click once inside each nucleus, get one exact polygon per click (NuClick).",
        epilog="Coordinates are level-0 image pixels; pixel (c, r) spans [c, c+1) x [r, r+1), as in QuPath. "
        "Run 'nuclick-bridge COMMAND --help' for each command.",
    )
    parser.add_argument("--version", action="version", version=version_text())
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "segment",
        help="segment the nuclei at the clicks in one image, write QuPath GeoJSON",
        description="Segment one nucleus per click and write a QuPath-importable GeoJSON "
        "FeatureCollection of detections. Only the pixels around the clicks are "
        "read, so large pyramidal TIFFs are fine.",
        epilog="example: nuclick-bridge segment slide.tif --points clicks.csv --out nuclei.geojson",
    )
    p.add_argument("image", help="RGB image: PNG, JPEG or (pyramidal, tiled) TIFF")
    p.add_argument(
        "--points",
        required=True,
        metavar="FILE",
        help="clicks: CSV with header x,y[,class] or QuPath GeoJSON points (Point/MultiPoint)",
    )
    p.add_argument("--out", required=True, metavar="OUT.geojson", help="output GeoJSON file")
    p.add_argument("--tolerance", type=float, default=0.5, help="polygon simplification in px (default: 0.5)")
    _add_engine(p)
    add_server_options(p)
    p.set_defaults(handler="bridge.commands.segment:run")

    p = sub.add_parser(
        "evaluate",
        help="measure accuracy against ground-truth instance labels",
        description="Segment every labelled nucleus from one click each and print the paper's "
        "six metrics (AJI, Dice, object Dice, SQ, DQ, PQ). The last stdout line is "
        "one JSON object.",
        epilog="example: nuclick-bridge evaluate --images ../shared/data/monuseg/images "
        "--labels ../shared/data/monuseg/labels --split val --jitter 5 --seed 0",
    )
    p.add_argument("--images", required=True, metavar="DIR", help="folder of RGB PNGs")
    p.add_argument(
        "--labels",
        required=True,
        metavar="DIR",
        help="folder of uint16 instance-label PNGs with the same file names",
    )
    p.add_argument(
        "--clicks",
        default=None,
        metavar="DIR",
        help="folder of STEM.csv click files (x,y); default: simulate one click per nucleus",
    )
    p.add_argument(
        "--split",
        default=None,
        help="only the images of this split from split.json next to the images folder (e.g. val); default: every image",
    )
    p.add_argument(
        "--jitter",
        type=float,
        default=0.0,
        help="simulated clicks: max distance in px from the nucleus centroid (default: 0)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed for simulated clicks (default: 0)")
    p.add_argument("--out", default=None, metavar="PRED_DIR", help="write predicted instance PNGs here")
    p.add_argument(
        "--figures",
        default=None,
        metavar="DIR",
        help="write pictures here: per image STEM_overlay.png (truth, prediction, clicks) and accuracy_by_size.png",
    )
    _add_engine(p)
    p.set_defaults(handler="bridge.commands.evaluate:run")

    p = sub.add_parser(
        "train",
        help="train NuClick weights on labelled data (needs torch)",
        description="Train a click-guided nucleus network in NuClick's framework (hybrid Dice + "
        "weighted BCE loss, jittered clicks, on-the-fly guidance maps) on the 'train' split of each "
        "--data folder, validating on its 'val' split every epoch; the epoch with the best mean "
        "validation AJI is written to OUT (weights averaged over training steps, see --ema-decay). "
        "The default network is a U-Net on an ImageNet-pretrained EfficientNet-Lite0 encoder "
        "(needs the 'train' extra: pip install 'nuclick-bridge[train]'); --arch nuclick gives the "
        "published topology at --width. Checkpoints go to OUT.ckpt every 200 steps and at every "
        "epoch's end; an interrupted run started again with the same command resumes from it.",
        epilog="example: nuclick-bridge train --data ../shared/data/monuseg "
        "--data ../shared/data/consep_tiles --out runs/lite0.pt --epochs 20 --samples-per-epoch 12000",
    )
    p.add_argument(
        "--data",
        action="append",
        required=True,
        metavar="DIR",
        help="dataset folder with images/, labels/, split.json (repeatable)",
    )
    p.add_argument("--out", required=True, metavar="WEIGHTS", help="where to write the best weights")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument(
        "--arch",
        default="effunet-lite0",
        metavar="ARCH",
        help="network: effunet-lite0, effunet-lite1 or effunet-lite2 = U-Net on an ImageNet-pretrained "
        "EfficientNet-LiteN encoder; effunet-lite0-edge = Lite0 plus a full-resolution refinement for outlines "
        "(--init with Lite0 weights grows it from them); effunet-lite0-x2 = Lite0 on the patch magnified twice "
        "(use with --patch-size 64: the same cost as Lite0 at 128, four times the encoder cells per nucleus; --init "
        "takes Lite0 weights); effunet-lite0-x4 = the same magnified four times (--patch-size 32; --init takes x2 "
        "weights or a joined file's x2 view); effunet-lite0-2scale = Lite0 and Lite0-x2 on one click, their "
        "logits averaged in the centre; effunet-lite0-3scale = those two plus Lite0-x4 on the centre quarter (both "
        "only fine-tuned as a whole: --init a file joined by scripts/combine_scales.py, --patch-size 128); "
        "nuclick = the published NuClick topology (scaled by --width)",
    )
    p.add_argument(
        "--width",
        type=float,
        default=0.25,
        help="channel width multiplier of --arch nuclick; 1.0 = the published network (default: 0.25)",
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="peak AdamW learning rate (default: 1e-3 for effunet, 3e-3 for nuclick as published)",
    )
    p.add_argument(
        "--warmup-steps",
        type=int,
        default=300,
        help="steps of linear learning-rate warm-up before the cosine decay (default: 300)",
    )
    p.add_argument(
        "--ema-decay",
        type=float,
        default=0.999,
        help="exponential moving average of the weights, which is what is validated and saved (0: off; default: 0.999)",
    )
    p.add_argument(
        "--drop-neighbours",
        type=float,
        default=0.1,
        help="chance that a neighbour's click is left out of a training patch's exclusion map (default: 0.1)",
    )
    p.add_argument(
        "--augment",
        choices=["standard", "strong"],
        default="standard",
        help="augmentation: standard = scale 0.9-1.1 and mild stain jitter (the shipped weights); strong = "
        "scale 0.8-1.25 and twice the stain jitter, for scanners and stains unlike the training data",
    )
    p.add_argument(
        "--loss",
        choices=["nuclick", "nuclick+lovasz"],
        default="nuclick",
        help="training loss: nuclick = soft Dice + BCE with neighbours weighted 10x (the paper's); "
        "nuclick+lovasz adds a Lovász hinge, a surrogate of each nucleus's IoU, which AJI and PQ score",
    )
    p.add_argument("--sigma", type=float, default=2.0, help="Gaussian sigma of the guidance maps (px)")
    p.add_argument("--jitter", type=float, default=5.0, help="click jitter in training (px)")
    p.add_argument(
        "--patch-size",
        type=int,
        default=128,
        help="side of the square patch per click (px), recorded in the weights so that inference uses the same; "
        "a multiple of 32 (default: 128, the paper's)",
    )
    p.add_argument(
        "--samples-per-epoch",
        type=int,
        default=4000,
        help="training patches between validations (0: every nucleus once; default: 4000)",
    )
    p.add_argument("--train-split", default="train", help="split(s) to train on, e.g. train or train+val")
    p.add_argument("--val-split", default="val", help="split to validate on ('' for none)")
    p.add_argument(
        "--val-limit",
        type=int,
        default=0,
        metavar="N",
        help="validate on at most N images per dataset (0: all)",
    )
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: default)")
    p.add_argument("--resume", default=None, metavar="CKPT", help="checkpoint to resume from")
    p.add_argument(
        "--init",
        default=None,
        metavar="WEIGHTS",
        help="start from these trained weights (fine-tuning) instead of random ones",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="random seed of the initial weights, patch order, clicks and augmentations (default: 0); "
        "when fine-tuning with --init, a new seed draws different samples from the previous run",
    )
    add_device_options(p, inference=False)
    p.set_defaults(handler="bridge.commands.train:run")

    from bridge.commands.adapt import DESCRIPTION as ADAPT_DESCRIPTION
    from bridge.commands.adapt import EPILOG as ADAPT_EPILOG

    p = sub.add_parser(
        "adapt",
        help="teach the network your lab's outlines from nuclei you corrected (QuPath, OMERO or a folder)",
        description=textwrap.fill(ADAPT_DESCRIPTION, 100),
        epilog=ADAPT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(handler="bridge.commands.adapt:run", add_arguments="bridge.commands.adapt:add_arguments")
    p = sub.add_parser(
        "serve",
        help="run the NuClick gRPC + HTTP/JSON server",
        description="Serve the model over gRPC (and HTTP/JSON for clients that cannot link "
        "gRPC, such as QuPath scripts). Binds to 127.0.0.1 unless told otherwise.",
        epilog="example: nuclick-bridge serve --host 0.0.0.0 --token-file token.txt "
        "--tls-cert server.crt --tls-key server.key",
    )
    p.set_defaults(handler="bridge.commands.serve:run", add_arguments="bridge.commands.serve:add_arguments")

    p = sub.add_parser(
        "qupath",
        help="segment the point annotations of a QuPath project (paquo)",
        description="For each image of a QuPath project, turn every point of every point "
        "annotation into a nucleus detection in the point's class. Never modifies "
        "or deletes your annotations.",
        epilog="example: nuclick-bridge qupath ~/projects/lung/project.qpproj --dry-run",
    )
    p.set_defaults(handler="bridge.commands.qupath:run", add_arguments="bridge.commands.qupath:add_arguments")

    p = sub.add_parser(
        "qupath-export",
        help="write our detections of one project image as QuPath GeoJSON",
        description="Export the nuclei that nuclick-bridge wrote into a QuPath project image "
        "as a GeoJSON file (the same format 'segment' writes).",
    )
    p.set_defaults(handler="bridge.commands.qupath:export", add_arguments="bridge.commands.qupath:add_export_arguments")

    p = sub.add_parser(
        "omero",
        help="segment the point ROIs of OMERO images (omero-py)",
        description="For each OMERO image, turn every Point ROI into a polygon ROI in the "
        "point's class. Never touches your ROIs.",
        epilog="example: OMERO_PASSWORD=... nuclick-bridge omero --host omero.lab.org "
        "--user alice --password-env OMERO_PASSWORD --dataset 51 --dry-run",
    )
    p.set_defaults(handler="bridge.commands.omero:run", add_arguments="bridge.commands.omero:add_arguments")
    for name in ("adapt", "serve", "qupath", "qupath-export", "omero"):
        _attach_arguments(sub.choices[name])
    return parser


def _attach_arguments(p: argparse.ArgumentParser) -> None:
    """Subcommands declare their flags in their own module (``add_arguments``),
    which imports nothing optional; an import error there is a bug and is raised."""
    _resolve(p.get_default("add_arguments"))(p)


def _resolve(spec: str) -> Handler:
    import importlib

    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return EXIT_INPUT
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return int(_resolve(args.handler)(args) or 0)
    except BridgeInputError as exc:
        if args.debug:
            raise
        print(f"nuclick-bridge {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print(f"nuclick-bridge {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        if isinstance(exc, ModuleNotFoundError) and (exc.name or "").partition(".")[0] in ENGINE_MODULES:
            print(f"nuclick-bridge {args.command}: error: {ENGINE_HINT} (no module {exc.name!r})", file=sys.stderr)
            return EXIT_INPUT
        print(
            f"nuclick-bridge {args.command}: internal error: {type(exc).__name__}: {exc} "
            "(run with --debug for details)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
