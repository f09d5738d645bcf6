"""``nuclick-bridge qupath`` and ``nuclick-bridge qupath-export``.

This module is imported when the parser is built, so it imports nothing heavy
at module level (no paquo, no torch): the connector, paquo and the segmenter
are loaded inside :func:`run` and :func:`export`.
"""

from __future__ import annotations

import argparse
import json
import sys

from bridge.commands.common import add_device_options, add_server_options


def _add_project(p: argparse.ArgumentParser) -> None:
    p.add_argument("project", metavar="PROJECT", help="a QuPath project: its project.qpproj or its folder")


def add_arguments(p: argparse.ArgumentParser) -> None:
    _add_project(p)
    p.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="NAME",
        help="only the image entry with this name (repeatable; default: every image)",
    )
    p.add_argument(
        "--class",
        dest="classes",
        action="append",
        default=[],
        metavar="NAME",
        help="only points of this class (repeatable; 'Unclassified' for points without a class; default: all)",
    )
    p.add_argument(
        "--replace",
        action="store_true",
        help="segment every point again, removing the nuclei nuclick-bridge (or its QuPath extension) made for "
        "them before, and the orphans: our nuclei whose point was deleted since (with --class, of those "
        "classes). Nuclei whose points the extension removed on purpose are kept, and so are your own "
        "objects. Default: skip points that already have a nucleus of ours, remove nothing.",
    )
    p.add_argument("--dry-run", action="store_true", help="report what would change, write nothing")
    add_server_options(p)
    p.add_argument("--tolerance", type=float, default=0.5, help="polygon simplification in px (default: 0.5)")
    p.add_argument(
        "--method",
        default="nuclick",
        choices=("nuclick", "watershed"),
        help="nuclick (the trained network, default) or watershed (the paper's baseline, no weights needed)",
    )
    p.add_argument("--weights", default=None, metavar="FILE", help="NuClick weights (default: the shipped ones)")
    add_device_options(p)
    p.add_argument("--batch-size", type=int, default=32, metavar="N", help="patches per network batch (default: 32)")
    p.add_argument("--threshold", type=float, default=None, help="probability threshold (default: the model's)")


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    _add_project(p)
    p.add_argument("--image", required=True, metavar="NAME", help="the image entry to export")
    p.add_argument("--out", required=True, metavar="FILE.geojson", help="output GeoJSON file")
    p.add_argument("--run", default=None, metavar="RUN_ID", help="only the detections of this run (default: all)")


def run(args: argparse.Namespace) -> int:
    from bridge.connectors.qupath.paquo import open_project, project_file

    project_file(args.project)  # a clear error before paquo starts Java
    _check_args(args)
    return run_on(open_project(args.project, readonly=args.dry_run), args)


def _check_args(args: argparse.Namespace) -> None:
    from bridge.commands.common import check_server_options
    from bridge.errors import BridgeInputError

    check_server_options(args)
    if args.tolerance < 0:
        raise BridgeInputError("--tolerance must be >= 0")


def run_on(project, args: argparse.Namespace) -> int:
    """The ``qupath`` command on an opened project (paquo's, or any
    :class:`~bridge.connectors.qupath.run.QuPathProjectLike`)."""
    from bridge.connectors.qupath.run import RunOptions, run_project
    from bridge.errors import BridgeInputError

    _check_args(args)

    def segmenter():
        from bridge.commands.common import make_segmenter

        return make_segmenter(args)

    options = RunOptions(
        images=args.image,
        classes=args.classes,
        replace=args.replace,
        dry_run=args.dry_run,
        progress=sys.stderr.isatty(),
    )
    summary = run_project(project, segmenter, options)
    print(("dry run: " if args.dry_run else "") + summary.line(), file=sys.stderr)
    print(json.dumps(summary.as_dict()))
    reason = summary.fatal_reason()
    if reason:
        raise BridgeInputError(reason)
    return 0


def export(args: argparse.Namespace) -> int:
    from bridge.connectors.qupath.paquo import open_project, project_file
    from bridge.io.geojson import check_writable

    project_file(args.project)
    check_writable(args.out)
    return export_from(open_project(args.project, readonly=True), args)


def export_from(project, args: argparse.Namespace) -> int:
    """The ``qupath-export`` command on an opened project."""
    from bridge.commands.common import disk_errors
    from bridge.connectors.qupath.run import export_image
    from bridge.io.geojson import atomic_write_text

    collection = export_image(project, args.image, args.run)
    n = len(collection["features"])
    with disk_errors(args.out):  # a full disk is one line; atomic_write_text leaves no partial file
        atomic_write_text(args.out, json.dumps(collection, allow_nan=False) + "\n")
    print(json.dumps({"image": args.image, "detections": n, "out": str(args.out)}))
    return 0
