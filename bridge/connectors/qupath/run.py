"""``nuclick-bridge qupath``: the paquo-free core of the QuPath connector.

Why this shape: paquo drives QuPath's Java code, which CI cannot run.  So the
whole job (choosing images and points, reading pixels, segmenting, building
detections, deciding what to skip or replace, reporting) lives here and talks
to the project only through the small :class:`QuPathProjectLike` /
:class:`QuPathEntry` interface.  :mod:`bridge.connectors.qupath.paquo`
implements it with paquo; ``tests/support/qupath_memory.py`` implements it
in memory for the tests.

The run, per project:

1. **Plan** every selected image: read its objects, extract the clicks (every
   point of every point annotation, in the annotation's class, ``--class``
   filter), match them against our earlier detections (by the marker in the
   name, see :mod:`bridge.connectors.qupath.objects`), resolve the image URI to
   a local file and open it (missing, unreadable, non-RGB and unsupported files
   fail here, for that image only).  ``--dry-run`` stops after this step.
2. **Segment and write**, image by image: read level-0 tiles around groups of
   nearby clicks (``segmenter.segment_tiled``), build every detection of the
   image first, then hand them to the project in one call that adds them,
   removes (``--replace``) our earlier detections of those points, and saves
   that image.  Nothing else is ever removed: the user's annotations and
   detections are never modified.

**Interruptions.**  The project only changes on disk when an image is saved,
and each image is saved once, right after its objects are written.  Ctrl-C
(or SIGTERM) during that write-and-save is held until the save has finished
(:func:`hold_interrupts`), so an interrupted run leaves every image either
fully written (those before) or untouched (the current one and those after).
An exception while writing one image leaves that image unsaved, hence
untouched on disk, and the run goes on with the next.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tqdm import tqdm

from bridge.connectors.qupath.images import open_local_image
from bridge.connectors.qupath.objects import (
    Calibration,
    OurDetection,
    calibration_from_metadata,
    class_label,
    detection_features,
    export_collection,
    extract_points,
    new_run_id,
    our_detections,
    point_key,
    size_from_metadata,
    uri_to_path,
)
from bridge.errors import BridgeInputError
from bridge.io.imageio import RegionReader
from bridge.nuclick.tiling import DEFAULT_MAX_TILE, plan_tiles
from bridge.results import Click, NucleusResult

Log = Callable[[str], None]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- interface


class QuPathEntry(Protocol):
    """One image entry of a project, as the core needs it."""

    name: str

    def image_uri(self) -> str:
        """The image's URI (``file:/...`` for local files)."""
        ...

    def server_metadata(self) -> dict[str, Any]:
        """QuPath's image metadata (``server.json``'s ``metadata``: width,
        height, pixelCalibration); ``{}`` when unknown."""
        ...

    def read_objects(self) -> tuple[list[dict], list[dict]]:
        """(annotations, detections) as QuPath GeoJSON Features."""
        ...

    def write_objects(self, add: list[dict], remove_ids: list[str]) -> None:
        """Add the detection Features and remove the detections with these
        ids, then save this image: all of it, or (on error) nothing on disk."""
        ...


class QuPathProjectLike(Protocol):
    path: Path

    def entries(self) -> Sequence[QuPathEntry]: ...


SegmenterFactory = Callable[[], Any]  # -> object with segment_tiled(reader, clicks, progress=...) -> .results


# ----------------------------------------------------------------- options


@dataclass
class RunOptions:
    images: Sequence[str] = ()  # entry names; empty = every image
    classes: Sequence[str] = ()  # point classes; empty = every class
    replace: bool = False
    dry_run: bool = False
    progress: bool = False
    max_tile: int | None = None  # None: the segmenter's default
    run_id: str | None = None  # None: a fresh one


@dataclass
class ImageReport:
    """What happened to one image (printed, and summed into the summary)."""

    name: str
    status: str = "pending"  # written | would write | up to date | no points | failed
    points: int = 0
    by_class: dict[str, int] = field(default_factory=dict)
    todo: int = 0  # points to segment now
    already: int = 0  # points skipped: they already have our detection
    removed: int = 0  # our earlier detections removed (--replace)
    outside: int = 0  # points outside the image
    other_classes: int = 0  # points left out by the class filter
    detections: int = 0
    not_found: list[NucleusResult] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    error: str = ""
    seconds: float = 0.0


@dataclass
class RunSummary:
    run_id: str
    dry_run: bool
    images: list[ImageReport]
    seconds: float = 0.0

    def total(self, name: str) -> int:
        return sum(getattr(r, name) for r in self.images)

    @property
    def failed(self) -> list[ImageReport]:
        return [r for r in self.images if r.status == "failed"]

    @property
    def not_found(self) -> int:
        return sum(len(r.not_found) for r in self.images)

    def line(self) -> str:
        head = f"{len(self.images)} images ({len(self.failed)} failed), {self.total('points')} points"
        if self.dry_run:
            return (
                f"{head}: would segment {self.total('todo')}, skip {self.total('already')} already done, "
                f"remove {self.total('removed')} earlier detections; nothing written (run {self.run_id})"
            )
        return (
            f"{head}: segmented {self.total('todo')}, {self.total('detections')} detections written, "
            f"{self.not_found} not found, {self.total('already')} already done, "
            f"{self.total('removed')} earlier detections removed, {self.seconds:.1f} s (run {self.run_id})"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "dry_run": self.dry_run,
            "images": len(self.images),
            "failed": len(self.failed),
            "points": self.total("points"),
            "segmented": self.total("todo"),
            "detections": self.total("detections"),
            "not_found": self.not_found,
            "already_done": self.total("already"),
            "removed": self.total("removed"),
            "seconds": round(self.seconds, 2),
        }

    def fatal_reason(self) -> str | None:
        """Why the run did nothing at all (the CLI exits non-zero), or None."""
        if not self.images:
            return "the project has no images"
        if len(self.failed) == len(self.images):
            return f"nothing could be done: all {len(self.images)} images failed"
        if self.total("points") == 0 and not self.failed:
            return (
                "no point annotations found in "
                f"{len(self.images)} image{'s' if len(self.images) != 1 else ''}; place one point per nucleus"
                " with QuPath's Points tool (one class per cell type)"
            )
        if self.total("points") == 0:
            return "nothing could be done: no image with point annotations could be read"
        return None


# ----------------------------------------------------------------- planning


@dataclass
class PointPlan:
    todo: list[Click]
    already: list[Click]
    remove: list[OurDetection]


def plan_points(
    clicks: Sequence[Click], ours: Sequence[OurDetection], replace: bool, classes: Sequence[str] = ()
) -> PointPlan:
    """Which clicks to segment, which to skip, which of our detections to remove.

    Without ``replace``, a click whose point already has one of our
    detections (any run) is skipped.  With ``replace``, every click is
    segmented again and our earlier detections of those points are removed,
    together with our detections whose source point is gone (deleted by the
    user) when their class is among the selected classes.
    """
    done = {d.marker.key for d in ours}
    if not replace:
        todo = [c for c in clicks if point_key(c.x, c.y) not in done]
        already = [c for c in clicks if point_key(c.x, c.y) in done]
        return PointPlan(todo, already, [])
    keys = {point_key(c.x, c.y) for c in clicks}
    wanted = set(classes)
    remove = [d for d in ours if d.marker.key in keys or (not wanted or class_label(d.class_name) in wanted)]
    return PointPlan(list(clicks), [], remove)


@dataclass
class _Planned:
    entry: QuPathEntry
    report: ImageReport
    path: Path
    todo: list[Click]
    remove: list[OurDetection]
    calibration: Calibration | None


def _plan_entry(entry: QuPathEntry, options: RunOptions) -> _Planned:
    report = ImageReport(entry.name)
    annotations, detections = entry.read_objects()
    points = extract_points(annotations, options.classes)
    report.problems = list(points.problems)
    report.other_classes = points.other_classes
    report.points = len(points.clicks)
    report.by_class = dict(sorted(points.by_class.items()))
    if not points.clicks:
        report.status = "no points"
        return _Planned(entry, report, Path(), [], [], None)
    plan = plan_points(points.clicks, our_detections(detections), options.replace, options.classes)
    report.todo, report.already, report.removed = len(plan.todo), len(plan.already), len(plan.remove)
    if any(d.id is None for d in plan.remove):
        raise BridgeInputError("our earlier detections carry no object ids (QuPath < 0.4), so they cannot be replaced")
    if not plan.todo:  # nothing to segment: the pixels are not needed
        return _Planned(entry, report, Path(), [], plan.remove, None)
    path = uri_to_path(entry.image_uri())
    metadata = entry.server_metadata() or {}
    with open_local_image(path) as reader:
        width, height = reader.width, reader.height
    expected = size_from_metadata(metadata)
    if expected is not None and expected != (width, height):
        raise BridgeInputError(
            f"{path.name} is {width} x {height} px but QuPath's image is {expected[0]} x {expected[1]}"
            " (another series of a multi-image file, or a transformed image?); its points cannot be placed"
        )
    outside = [c for c in plan.todo if not (0 <= c.x < width and 0 <= c.y < height)]
    report.outside = len(outside)
    if len(outside) == len(plan.todo):
        raise BridgeInputError(
            f"all {len(outside)} points to segment are outside the image ({width} x {height} px);"
            " are they from another image?"
        )
    return _Planned(entry, report, path, plan.todo, plan.remove, calibration_from_metadata(metadata))


# ------------------------------------------------------------------ writing


@contextlib.contextmanager
def hold_interrupts() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) and SIGTERM until the block has finished, then act
    on them: KeyboardInterrupt for SIGINT, the previous handler for SIGTERM.
    Only in the main thread (signals are delivered there); elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def _hold(signum: int, _frame: Any) -> None:
        received.append(signum)

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        old = signal.getsignal(sig)
        previous[sig] = old if old is not None else signal.SIG_DFL
        signal.signal(sig, _hold)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        if signal.SIGTERM in received:
            os.kill(os.getpid(), signal.SIGTERM)
        if signal.SIGINT in received:
            raise KeyboardInterrupt


class _ProgressReader:
    """The image reader, ticking a per-image progress bar once per tile read."""

    def __init__(self, reader: RegionReader, bar: tqdm) -> None:
        self._reader, self._bar = reader, bar
        self.width, self.height = reader.width, reader.height

    def read_region(self, x0: int, y0: int, w: int, h: int):
        out = self._reader.read_region(x0, y0, w, h)
        self._bar.update(1)
        return out

    def close(self) -> None:
        pass

    def __enter__(self) -> _ProgressReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _segment(planned: _Planned, segmenter: Any, options: RunOptions) -> list[NucleusResult]:
    clicks = planned.todo
    with open_local_image(planned.path) as reader:
        patch = int(getattr(segmenter, "patch_size", 128))
        sigma = float(getattr(segmenter, "guidance_sigma", 2.0))
        n_tiles = len(
            plan_tiles(clicks, reader.width, reader.height, patch, sigma, options.max_tile or DEFAULT_MAX_TILE)
        )
        bar = tqdm(
            total=n_tiles,
            desc=planned.report.name,
            unit="tile",
            postfix={"points": len(clicks)},
            disable=not options.progress,
            leave=True,
            file=sys.stderr,
        )
        with bar:
            kwargs = {} if options.max_tile is None else {"max_tile": options.max_tile}
            seg = segmenter.segment_tiled(_ProgressReader(reader, bar), clicks, progress=False, **kwargs)
    results = list(seg.results)
    if len(results) != len(clicks):
        raise RuntimeError(f"the segmenter returned {len(results)} results for {len(clicks)} clicks")
    return results


# ---------------------------------------------------------------- reporting


def _describe_classes(by_class: dict[str, int]) -> str:
    return ", ".join(f"{name} {n}" for name, n in by_class.items())


def _report_line(r: ImageReport, dry_run: bool) -> str:
    if r.status == "failed":
        return f"{r.name}: skipped: {r.error}"
    if r.status == "no points":
        if r.other_classes:
            return f"{r.name}: no points of the selected classes ({r.other_classes} points of other classes)"
        return f"{r.name}: no point annotations"
    head = f"{r.name}: {r.points} points ({_describe_classes(r.by_class)})"
    if dry_run:
        parts = [f"would segment {r.todo}"]
        if r.outside:
            parts.append(f"{r.outside} of them outside the image")
        parts.append(f"skip {r.already} already done")
        parts.append(f"remove {r.removed} earlier detections")
        return f"{head}; " + ", ".join(parts)
    if r.status == "up to date":
        return f"{head}; all already done, nothing written"
    return (
        f"{head}; {r.detections} detections written, {len(r.not_found)} not found, "
        f"{r.already} already done, {r.removed} earlier removed ({r.seconds:.1f} s)"
    )


# --------------------------------------------------------------------- run


def select_entries(project: QuPathProjectLike, names: Sequence[str]) -> list[QuPathEntry]:
    """The project's entries, or those named (every entry with that name);
    an unknown name is an error before anything runs."""
    entries = list(project.entries())
    if not names:
        return entries
    known = {e.name for e in entries}
    unknown = [n for n in names if n not in known]
    if unknown:
        listing = ", ".join(sorted(known)) or "none"
        raise BridgeInputError(f"no image named {', '.join(map(repr, unknown))} in the project (images: {listing})")
    wanted = set(names)
    return [e for e in entries if e.name in wanted]


def run_project(
    project: QuPathProjectLike,
    make_segmenter: SegmenterFactory,
    options: RunOptions | None = None,
    log: Log = _stderr,
) -> RunSummary:
    """Segment the points of the selected images and write one detection per
    nucleus (see the module docstring).  Per-image problems are reported and
    skipped; the caller decides the exit status from ``fatal_reason()``.
    ``make_segmenter`` is called once, and only if something is to be
    segmented (a dry run never loads a model)."""
    options = options or RunOptions()
    run_id = options.run_id or new_run_id()
    t0 = time.perf_counter()
    entries = select_entries(project, options.images)
    summary = RunSummary(run_id, options.dry_run, [])

    planned: list[_Planned] = []
    for entry in entries:
        try:
            item = _plan_entry(entry, options)
        except Exception as exc:  # one bad image must not stop the project
            report = ImageReport(entry.name, status="failed", error=_describe(exc))
            summary.images.append(report)
            log(_report_line(report, options.dry_run))
            continue
        summary.images.append(item.report)
        for line in item.report.problems:
            log(f"{entry.name}: {line}")
        if item.report.status == "no points" or options.dry_run:
            if options.dry_run and item.report.status != "no points":
                item.report.status = "would write" if (item.todo or item.remove) else "up to date"
            log(_report_line(item.report, options.dry_run))
            continue
        planned.append(item)

    segmenter = None
    try:
        for item in planned:
            report = item.report
            t_image = time.perf_counter()
            if not item.todo and not item.remove:
                report.status = "up to date"
                log(_report_line(report, False))
                continue
            if item.todo and segmenter is None:
                segmenter = make_segmenter()  # errors here (bad weights, server down) end the run
            try:
                results = _segment(item, segmenter, options) if item.todo else []
                features = detection_features(results, run_id, item.calibration)
                with hold_interrupts():  # a Ctrl-C now is acted on once the image is saved
                    if features or item.remove:  # else leave the image as it is
                        item.entry.write_objects(features, [str(d.id) for d in item.remove])
                    report.status = "written"
            except Exception as exc:
                report.status, report.error = "failed", _describe(exc)
                report.todo = report.removed = 0
                log(_report_line(report, False))
                continue
            report.detections = len(features)
            report.not_found = [r for r in results if not r.found]
            report.seconds = time.perf_counter() - t_image
            log(_report_line(report, False))
            for r in report.not_found:
                c = r.click
                log(f"  not found: point {c.id} ({class_label(c.class_name)}) at ({c.x:.1f}, {c.y:.1f}): {r.reason}")
    except KeyboardInterrupt:
        written = [i.report.name for i in planned if i.report.status == "written"]
        log(
            f"interrupted: {len(written)} image(s) fully written"
            + (f" ({', '.join(written)})" if written else "")
            + "; the others are untouched"
        )
        raise
    finally:
        close = getattr(segmenter, "close", None)
        if callable(close):
            close()
    summary.seconds = time.perf_counter() - t0
    return summary


def export_image(project: QuPathProjectLike, image: str, run_id: str | None = None) -> dict[str, Any]:
    """Our detections of one image as a ``segment``-style FeatureCollection
    (:func:`~bridge.connectors.qupath.objects.export_collection`); an error if
    there are none, or if several images have that name."""
    entries = select_entries(project, [image])
    if len(entries) > 1:
        raise BridgeInputError(f"{len(entries)} images are named {image!r}; rename them in QuPath first")
    _, detections = entries[0].read_objects()
    collection = export_collection(detections, run_id)
    if not collection["features"]:
        which = f" from run {run_id}" if run_id else ""
        raise BridgeInputError(
            f"image {image!r} has no nuclick-bridge detections{which}; run 'nuclick-bridge qupath' first"
        )
    return collection


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BridgeInputError):
        return str(exc)
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
