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
   filter), match them against our earlier nuclei, detections or annotations
   (by the marker in the name, see :mod:`bridge.connectors.qupath.objects`),
   find the orphans among those (:func:`plan_points`), resolve the image URI
   to a local file and open it (missing, unreadable, non-RGB and unsupported
   files fail here, for that image only).  ``--dry-run`` stops after this step.
2. **Segment and write**, image by image: read level-0 tiles around groups of
   nearby clicks (``segmenter.segment_tiled``), build every detection of the
   image first, then :func:`write_image`: insert them, remove (``--replace``)
   our earlier nuclei of those points and our orphans, and save that image.
   Nothing else is ever removed: the user's annotations and detections are
   never modified.

**All or nothing per image.**  The project only changes on disk when an image
is saved, and each image is saved once, right after its objects are written.
If inserting, removing or saving raises, :func:`write_image` puts the image's
data file back as it was (:mod:`bridge.connectors.qupath.safe_save`; QuPath
itself restores it only on an ``IOException``) and drops the unsaved changes
from memory, so nothing can save them later; the image is reported as failed
and the run goes on with the next.  Ctrl-C (or SIGTERM) during the write is
held until it has finished (:func:`hold_interrupts`), so an interrupted run
leaves every image either fully written (those before) or untouched (the
current one and those after).
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
    OurNucleus,
    calibration_from_metadata,
    class_label,
    detection_features,
    export_collection,
    extract_points,
    new_run_id,
    our_nuclei,
    point_index,
    point_key,
    size_from_metadata,
    uri_to_path,
)
from bridge.connectors.qupath.safe_save import restore_on_failure
from bridge.errors import BridgeInputError
from bridge.io.imageio import RegionReader
from bridge.nuclick.tiling import DEFAULT_MAX_TILE, plan_tiles
from bridge.results import Click, NucleusResult

Log = Callable[[str], None]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- interface


class QuPathEntry(Protocol):
    """One image entry of a project, as the core needs it: reading, and the
    three steps of a write as paquo does them (insert into the in-memory
    hierarchy, remove from it, save the image), each of which can fail."""

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

    def data_file(self) -> Path | None:
        """The file QuPath keeps this image's objects in (``data.qpdata``),
        guarded during a save; None when there is none to guard."""
        ...

    def insert_objects(self, features: list[dict]) -> None:
        """Add these Features to the image's hierarchy in memory."""
        ...

    def remove_objects(self, ids: list[str]) -> None:
        """Remove the objects with these ids from the hierarchy in memory (an
        error, before removing any, if one is missing)."""
        ...

    def save(self) -> None:
        """Write the image's hierarchy to disk."""
        ...

    def discard_changes(self) -> None:
        """Forget unsaved changes: the hierarchy in memory is read again from disk."""
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
    removed: int = 0  # our earlier nuclei removed (--replace), orphans included
    orphans: int = 0  # our nuclei whose point was deleted (removed only with --replace)
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
            "orphans": self.total("orphans"),
            "seconds": round(self.seconds, 2),
        }

    def fatal_reason(self) -> str | None:
        """Why the run did nothing at all (the CLI exits non-zero), or None."""
        if not self.images:
            return "the project has no images"
        if len(self.failed) == len(self.images):
            return f"nothing could be done: all {len(self.images)} images failed"
        if self.total("points") == 0 and self.total("removed") == 0 and not self.failed:
            kept = self.total("orphans")
            hint = f"; {kept} nuclei of ours lost their points (run with --replace to remove them)" if kept else ""
            return (
                "no point annotations found in "
                f"{len(self.images)} image{'s' if len(self.images) != 1 else ''}; place one point per nucleus"
                " with QuPath's Points tool (one class per cell type)" + hint
            )
        if self.total("points") == 0 and self.total("removed") == 0:
            return "nothing could be done: no image with point annotations could be read"
        return None


# ----------------------------------------------------------------- planning


@dataclass
class PointPlan:
    todo: list[Click]
    already: list[Click]
    remove: list[OurNucleus]
    orphans: list[OurNucleus]  # of the selected classes; in ``remove`` only with ``replace``


def plan_points(
    clicks: Sequence[Click],
    ours: Sequence[OurNucleus],
    replace: bool,
    classes: Sequence[str] = (),
    *,
    points: set[tuple[str, str]],
) -> PointPlan:
    """Which clicks to segment, which to skip, which of our nuclei to remove.

    ``ours`` are our nuclei of the image (detections and annotations, see
    :func:`~bridge.connectors.qupath.objects.our_nuclei`); ``points`` is the
    image's :func:`~bridge.connectors.qupath.objects.point_index` (every
    point, whatever its class), which decides the orphans: nuclei that record
    a point id whose annotation no longer holds their point.

    Without ``replace``, a click whose point already has one of our nuclei
    (any run, detection or annotation) is skipped, and nothing is removed.
    With ``replace``, every click is segmented again and these of our nuclei
    are removed: those of the points being segmented, and the orphans (of the
    selected classes, when ``classes`` is given).  Every other nucleus of ours
    is kept, in particular those without a point id (released by the
    extension, or from older runs).
    """
    wanted = set(classes)
    orphans = [n for n in ours if n.is_orphan(points) and (not wanted or class_label(n.class_name) in wanted)]
    done = {n.marker.key for n in ours}
    if not replace:
        todo = [c for c in clicks if point_key(c.x, c.y) not in done]
        already = [c for c in clicks if point_key(c.x, c.y) in done]
        return PointPlan(todo, already, [], orphans)
    keys = {point_key(c.x, c.y) for c in clicks}
    orphan_ids = {id(n) for n in orphans}
    remove = [n for n in ours if n.marker.key in keys or id(n) in orphan_ids]
    return PointPlan(list(clicks), [], remove, orphans)


@dataclass
class _Planned:
    entry: QuPathEntry
    report: ImageReport
    path: Path
    todo: list[Click]
    remove: list[OurNucleus]
    calibration: Calibration | None


def _plan_entry(entry: QuPathEntry, options: RunOptions) -> _Planned:
    report = ImageReport(entry.name)
    annotations, detections = entry.read_objects()
    points = extract_points(annotations, options.classes)
    report.problems = list(points.problems)
    report.other_classes = points.other_classes
    report.points = len(points.clicks)
    report.by_class = dict(sorted(points.by_class.items()))
    ours = our_nuclei([*annotations, *detections])
    plan = plan_points(points.clicks, ours, options.replace, options.classes, points=point_index(annotations))
    report.orphans = len(plan.orphans)
    if not points.clicks and not plan.remove:
        report.status = "no points"
        return _Planned(entry, report, Path(), [], [], None)
    report.todo, report.already, report.removed = len(plan.todo), len(plan.already), len(plan.remove)
    if any(d.id is None for d in plan.remove):
        raise BridgeInputError("our earlier nuclei carry no object ids (QuPath < 0.4), so they cannot be replaced")
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


def write_image(entry: QuPathEntry, add: list[dict], remove_ids: list[str]) -> None:
    """Insert ``add``, remove ``remove_ids`` and save the image: all of it, or
    nothing, on disk and in memory.  On any error the data file is put back
    (:func:`~bridge.connectors.qupath.safe_save.restore_on_failure`) and the
    unsaved changes are dropped, then the error goes on to the caller."""
    try:
        if add:
            entry.insert_objects(add)
        if remove_ids:
            entry.remove_objects(remove_ids)
        with restore_on_failure(entry.data_file()):
            entry.save()
    except BaseException as exc:
        try:
            entry.discard_changes()
        except Exception as again:  # the disk is safe; say that memory is not
            exc.add_note(f"and its unsaved changes could not be dropped ({type(again).__name__}: {again})")
        raise


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
    orphans = (
        f"; {r.orphans} nuclei of ours lost their points (--replace removes them)"
        if r.orphans and not r.removed
        else ""
    )
    if r.status == "no points":
        if r.other_classes:
            return f"{r.name}: no points of the selected classes ({r.other_classes} points of other classes){orphans}"
        return f"{r.name}: no point annotations{orphans}"
    classes = _describe_classes(r.by_class)
    head = f"{r.name}: {r.points} points ({classes})" if r.points else f"{r.name}: no points left"
    if dry_run:
        parts = [f"would segment {r.todo}"]
        if r.outside:
            parts.append(f"{r.outside} of them outside the image")
        parts.append(f"skip {r.already} already done")
        parts.append(f"remove {r.removed} earlier detections")
        if r.removed and r.orphans:
            parts[-1] += f" ({r.orphans} of them orphans: their points were deleted)"
        return f"{head}; " + ", ".join(parts) + orphans
    if r.status == "up to date":
        return f"{head}; all already done, nothing written{orphans}"
    removed = f"{r.removed} earlier removed" + (f" ({r.orphans} orphans)" if r.removed and r.orphans else "")
    return (
        f"{head}; {r.detections} detections written, {len(r.not_found)} not found, "
        f"{r.already} already done, {removed} ({r.seconds:.1f} s){orphans}"
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
                        write_image(item.entry, features, [str(d.id) for d in item.remove])
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
    annotations, detections = entries[0].read_objects()
    collection = export_collection([*detections, *annotations], run_id)
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
