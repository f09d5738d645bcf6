"""The OMERO connector's logic, free of omero-py (importable and testable anywhere).

What lives here: the plain records the omero-py layer (``gateway``)
turns OMERO objects into (:class:`PointRecord`, :class:`OurRoi`), the per-image
plan (which points to segment on which Z/T plane, which are already done,
which of our earlier ROIs ``--replace`` deletes), the polygon ``points``
strings, OMERO's packed RGBA colours, the marker we put on our ROIs, and the
run summary.

How our ROIs are recognised: each ROI we write holds one Polygon and has the
description ``nuclick-bridge nucleus; point=<shape id>; run=<run id>`` (a
MapAnnotation in :data:`NAMESPACE` with the same facts is linked to it for
people and queries).  A re-run skips every point whose shape id appears in
such a description; ``--replace`` writes new ones and then deletes exactly
those earlier ROIs (and only when they hold nothing but Polygons).  A point
with more than one such ROI (a run stopped between its save and its delete)
keeps the newest (highest ROI id); the next run deletes the others.  ROIs
without the marker (the user's Point ROIs and anything else) are never
modified.
"""

from __future__ import annotations

import math
import re
import time
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from shapely.geometry import MultiPolygon, Polygon

from bridge.io.coords import level0_to_omero, omero_to_level0
from bridge.io.geojson import class_color
from bridge.results import Click, NucleusResult

NAMESPACE = "nuclick-bridge/nucleus"
MARKER = "nuclick-bridge nucleus"
DEFAULT_COLOR = (255, 255, 0)  # points without a class
STROKE_ALPHA = 255
STROKE_WIDTH = 1.0
COORD_DECIMALS = 2  # polygon vertices: 1/100 px is far below any segmentation error

_DESCRIPTION_RE = re.compile(rf"^{re.escape(MARKER)}; point=(?P<point>[^;\s]+); run=(?P<run>[^;\s]+)")


# ---------------------------------------------------------------- records


@dataclass(frozen=True)
class PointRecord:
    """One Point shape of an image, as stored in OMERO.

    ``x``/``y`` are OMERO coordinates; ``z``/``t`` are None when the point is
    on every plane (then the polygon is too, and plane 0 is segmented).
    """

    shape_id: int
    roi_id: int
    x: float
    y: float
    z: int | None = None
    t: int | None = None
    class_name: str | None = None

    @property
    def plane(self) -> tuple[int, int]:
        return (self.z or 0, self.t or 0)

    def click(self) -> Click:
        x, y = omero_to_level0(self.x, self.y)
        return Click(x=x, y=y, id=str(self.shape_id), class_name=self.class_name)


@dataclass(frozen=True)
class OurRoi:
    """An ROI that nuclick-bridge wrote earlier (found by its description)."""

    roi_id: int
    point_id: str
    run_id: str
    only_polygons: bool = True


@dataclass(frozen=True)
class PolygonSpec:
    """One ROI to write: a Polygon for one nucleus, with everything OMERO needs."""

    point: PointRecord
    points: str  # OMERO's canonical "x,y x,y ..."
    stroke: int  # packed signed RGBA
    description: str
    run_id: str
    area_px: float
    score: float

    @property
    def z(self) -> int | None:
        return self.point.z

    @property
    def t(self) -> int | None:
        return self.point.t

    @property
    def class_name(self) -> str | None:
        return self.point.class_name

    def key_values(self) -> list[list[str]]:
        """The MapAnnotation linked to the ROI: what was segmented, from what, when."""
        p = self.point
        return [
            ["source_point_id", str(p.shape_id)],
            ["source_roi_id", str(p.roi_id)],
            ["source_point_xy", f"{_num(p.x)},{_num(p.y)}"],
            ["class", p.class_name or ""],
            ["run_id", self.run_id],
            ["area_px", f"{self.area_px:.1f}"],
            ["score", f"{self.score:.3f}"],
        ]


# ---------------------------------------------------------------- markers


def new_run_id() -> str:
    """UTC time plus a random suffix, e.g. ``20250101T120000Z-1a2b3c``."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def roi_description(point_id: int | str, run_id: str) -> str:
    return f"{MARKER}; point={point_id}; run={run_id}"


def parse_description(text: str | None) -> tuple[str, str] | None:
    """(point id, run id) from one of our ROI descriptions, or None if it isn't ours."""
    if not text:
        return None
    m = _DESCRIPTION_RE.match(text)
    return (m.group("point"), m.group("run")) if m else None


# ---------------------------------------------------------------- geometry


def _num(v: float) -> str:
    """Shortest fixed-point text of ``v`` at :data:`COORD_DECIMALS` ("12", "12.5", "-0.25")."""
    text = f"{round(float(v), COORD_DECIMALS):.{COORD_DECIMALS}f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def polygon_points(polygon: Polygon | MultiPolygon) -> str:
    """OMERO's canonical polygon ``points`` string ``"x,y x,y ..."`` in OMERO coordinates.

    The exterior ring only (nuclei have no holes), without the closing
    repeat of the first vertex (OMERO polygons are closed implicitly),
    rounded to :data:`COORD_DECIMALS`; consecutive vertices that round to the
    same text are dropped.  A MultiPolygon gives its largest part.
    """
    if isinstance(polygon, MultiPolygon):
        polygon = max(polygon.geoms, key=lambda g: g.area)
    if polygon is None or polygon.is_empty:
        raise ValueError("empty polygon")
    coords = list(polygon.exterior.coords)[:-1]
    parts: list[str] = []
    for x, y in coords:
        ox, oy = level0_to_omero(x, y)
        text = f"{_num(ox)},{_num(oy)}"
        if not parts or parts[-1] != text:
            parts.append(text)
    if len(parts) > 1 and parts[0] == parts[-1]:
        parts.pop()
    if len(parts) < 3:
        raise ValueError("polygon has fewer than 3 distinct vertices")
    return " ".join(parts)


# ---------------------------------------------------------------- colours


def pack_rgba(r: int, g: int, b: int, a: int = 255) -> int:
    """OMERO's colour: RGBA bytes packed big-endian into a *signed* 32-bit int."""
    for v in (r, g, b, a):
        if not 0 <= int(v) <= 255:
            raise ValueError(f"colour component {v} is not in 0..255")
    value = (int(r) << 24) | (int(g) << 16) | (int(b) << 8) | int(a)
    return value - (1 << 32) if value >= 1 << 31 else value


def class_stroke(class_name: str | None) -> int:
    """Stroke colour of a class: the same colour QuPath output uses (``bridge.io.geojson``)."""
    rgb = class_color(class_name) if class_name else DEFAULT_COLOR
    return pack_rgba(*rgb, STROKE_ALPHA)


# ---------------------------------------------------------------- planning


@dataclass
class ImagePlan:
    """What a run does to one image; ``--dry-run`` prints it and stops."""

    image_id: int
    name: str
    width: int
    height: int
    size_z: int = 1
    size_t: int = 1
    todo: dict[tuple[int, int], list[PointRecord]] = field(default_factory=dict)
    done: list[PointRecord] = field(default_factory=list)
    invalid: list[tuple[PointRecord, str]] = field(default_factory=list)
    delete: list[OurRoi] = field(default_factory=list)  # --replace: all our earlier ROIs
    leftovers: list[OurRoi] = field(default_factory=list)  # older duplicates of an interrupted --replace
    kept_ours: list[OurRoi] = field(default_factory=list)  # ours, but edited by someone: left alone
    other_class: list[PointRecord] = field(default_factory=list)  # not of the classes asked for: left alone

    @property
    def to_delete(self) -> list[OurRoi]:
        """Our ROIs to delete once this run's new ones are saved."""
        return self.delete + self.leftovers

    @property
    def n_points(self) -> int:
        return self.n_todo + len(self.done) + len(self.invalid)

    @property
    def n_todo(self) -> int:
        return sum(len(v) for v in self.todo.values())

    def describe(self) -> str:
        planes = ", ".join(f"z={z} t={t}: {len(p)}" for (z, t), p in sorted(self.todo.items())) or "none"
        parts = [
            f"image {self.image_id} {self.name!r} ({self.width} x {self.height}, Z={self.size_z}, T={self.size_t})",
            f"{self.n_points} point(s)",
            f"to segment {self.n_todo} [{planes}]",
            f"already done {len(self.done)}",
            f"invalid {len(self.invalid)}",
            f"our earlier ROIs to delete {len(self.delete)}",
        ]
        if self.other_class:
            parts.append(f"of other classes (skipped) {len(self.other_class)}")
        if self.leftovers:
            parts.append(f"leftovers of an interrupted earlier run to delete {len(self.leftovers)}")
        return "; ".join(parts)


def plan_image(
    image_id: int,
    name: str,
    width: int,
    height: int,
    points: Sequence[PointRecord],
    ours: Sequence[OurRoi],
    size_z: int = 1,
    size_t: int = 1,
    replace: bool = False,
    classes: Collection[str] | None = None,
) -> ImagePlan:
    """Sort an image's points into to-do (per plane), already done and invalid.

    Without ``replace`` a point is done when one of our ROIs names it; with
    ``replace`` every point is redone and our earlier ROIs are deleted, except
    ones that now hold other shapes too (someone edited them): those are kept
    and their points skipped, so nothing of the user's is ever deleted.
    ``classes`` (None: all) keeps only the points whose text is one of them
    (ignoring case; a point without text has no class and is left out); the
    others go to :attr:`ImagePlan.other_class` and, with ``replace``, only our
    ROIs of the kept points are deleted (a class filter never removes a
    nucleus it does not redo, nor one whose point is gone).
    Without ``replace``, a point named by several of our polygon-only ROIs
    (a ``--replace`` that saved its new ROIs but could not delete the old
    ones) keeps the newest and the others become :attr:`ImagePlan.leftovers`.
    """
    plan = ImagePlan(image_id, name, width, height, size_z, size_t)
    if classes is not None:
        wanted = {c.strip().casefold() for c in classes}
        chosen = [p for p in points if (p.class_name or "").strip().casefold() in wanted - {""}]
        plan.other_class = sorted(set(points) - set(chosen), key=lambda p: p.shape_id)
        points = chosen
        chosen_ids = {str(p.shape_id) for p in chosen}
        ours = [r for r in ours if r.point_id in chosen_ids or not replace]
    if replace:
        plan.delete = [r for r in ours if r.only_polygons]
        plan.kept_ours = [r for r in ours if not r.only_polygons]
        done_ids = {r.point_id for r in plan.kept_ours}
    else:
        done_ids = {r.point_id for r in ours}
        plan.leftovers = leftover_rois(ours)
    for p in sorted(points, key=lambda p: p.shape_id):
        reason = point_problem(p, width, height, size_z, size_t)
        if reason:
            plan.invalid.append((p, reason))
        elif str(p.shape_id) in done_ids:
            plan.done.append(p)
        else:
            plan.todo.setdefault(p.plane, []).append(p)
    return plan


def leftover_rois(ours: Sequence[OurRoi]) -> list[OurRoi]:
    """Our polygon-only ROIs that a newer one of ours for the same point supersedes.

    The newest is the one with the highest ROI id (OMERO hands out ids in
    increasing order, and a run saves its ROIs before deleting older ones).
    ROIs that someone edited (not polygon-only) are never leftovers.
    """
    by_point: dict[str, list[OurRoi]] = {}
    for r in ours:
        if r.only_polygons:
            by_point.setdefault(r.point_id, []).append(r)
    out: list[OurRoi] = []
    for rois in by_point.values():
        out += sorted(rois, key=lambda r: r.roi_id)[:-1]
    return sorted(out, key=lambda r: r.roi_id)


def point_problem(p: PointRecord, width: int, height: int, size_z: int, size_t: int) -> str:
    """Why a point cannot be segmented, or ''."""
    x, y = omero_to_level0(p.x, p.y)
    if not (math.isfinite(x) and math.isfinite(y)):
        return f"point {p.shape_id} has a non-finite coordinate ({p.x}, {p.y})"
    if not (0 <= x < width and 0 <= y < height):
        return f"point {p.shape_id} at ({p.x:.1f}, {p.y:.1f}) is outside the image ({width} x {height})"
    z, t = p.plane
    if not 0 <= z < size_z:
        return f"point {p.shape_id} is on Z={z}, but the image has {size_z} Z plane(s)"
    if not 0 <= t < size_t:
        return f"point {p.shape_id} is on T={t}, but the image has {size_t} timepoint(s)"
    return ""


def polygon_specs(
    points: Sequence[PointRecord], results: Sequence[NucleusResult], run_id: str
) -> tuple[list[PolygonSpec], list[tuple[PointRecord, str]]]:
    """ROIs to write for one plane's segmentation, and the points with no nucleus (and why)."""
    specs: list[PolygonSpec] = []
    missing: list[tuple[PointRecord, str]] = []
    for p, r in zip(points, results, strict=True):
        if not r.found or r.polygon is None or r.polygon.is_empty:
            missing.append((p, r.reason or "no nucleus found"))
            continue
        try:
            text = polygon_points(r.polygon)
        except ValueError as exc:
            missing.append((p, f"polygon too small to write ({exc})"))
            continue
        specs.append(
            PolygonSpec(
                point=p,
                points=text,
                stroke=class_stroke(p.class_name),
                description=roi_description(p.shape_id, run_id),
                run_id=run_id,
                area_px=float(r.area_px or r.polygon.area),
                score=float(r.score),
            )
        )
    return specs, missing


# ---------------------------------------------------------------- summary


@dataclass
class RunSummary:
    """Counts over a whole run; :meth:`line` is the closing line."""

    run_id: str
    dry_run: bool = False
    images: int = 0
    images_ok: int = 0
    images_failed: int = 0
    images_without_points: int = 0
    points: int = 0
    written: int = 0
    already_done: int = 0
    not_found: int = 0
    invalid: int = 0
    deleted: int = 0  # earlier ROIs the server confirmed deleted
    not_deleted: int = 0  # earlier ROIs whose delete was refused or timed out (the next run retries)
    other_class: int = 0  # points left alone: not of the classes asked for
    to_segment: int = 0  # dry run
    errors: list[str] = field(default_factory=list)

    def add_plan(self, plan: ImagePlan) -> None:
        self.points += plan.n_points
        self.already_done += len(plan.done)
        self.invalid += len(plan.invalid)
        self.to_segment += plan.n_todo
        self.other_class += len(plan.other_class)
        if plan.n_points == 0:
            self.images_without_points += 1

    def line(self) -> str:
        head = "dry run: " if self.dry_run else ""
        images = f"{self.images} image(s): {self.images_ok} ok, {self.images_failed} failed"
        if self.images_without_points:
            images += f", {self.images_without_points} without points"
        if self.dry_run:
            work = f"{self.to_segment} to segment, {self.already_done} already done, {self.invalid} invalid"
        else:
            work = (
                f"{self.written} polygon ROI(s) written, {self.already_done} already done, "
                f"{self.not_found} not found, {self.invalid} invalid, {self.deleted} earlier ROI(s) deleted"
            )
            if self.not_deleted:
                work += f", {self.not_deleted} left to delete on the next run"
        if self.other_class:
            work += f"; {self.other_class} point(s) of other classes left alone"
        return f"{head}{images}; {self.points} point(s): {work}; run {self.run_id}"

    def fatal_reason(self) -> str | None:
        """Why the run did nothing at all (the command exits non-zero), or None; as ``qupath`` does."""
        if not self.images:
            return "no images to process"
        if self.images_failed == self.images:
            return f"nothing could be done: all {self.images} image(s) failed"
        if self.points == 0 and self.other_class:
            return f"none of the {self.other_class} point(s) found has one of the classes asked for"
        if self.points == 0 and not self.images_failed:
            return (
                f"no Point ROIs found in {self.images} image(s); place one Point per nucleus "
                "(OMERO.iviewer's point tool; its text is the class)"
            )
        if self.points == 0:
            return "nothing could be done: no image with Point ROIs could be read"
        return None

    def as_dict(self) -> dict:
        out = dict(vars(self))
        out["errors"] = list(self.errors)
        return out
