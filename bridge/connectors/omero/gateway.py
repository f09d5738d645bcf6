"""Talking to OMERO through omero-py's BlitzGateway (the thin omero-py layer).

The only gateway calls the connector makes (the test double in
``tests/test_omero_connector.py`` implements exactly these):

* ``conn.SERVICE_OPTS.setOmeroGroup(gid)``: -1 to find objects in any of the
  user's groups, then the image's group for its reads and writes;
* ``conn.getObject(type, id)`` for "Dataset", "Project", "Plate", "Screen",
  and "Image" with ``opts={"load_pixels": True}`` (None if missing), and
  ``conn.getObjects(type, opts={"dataset"|"project"|"screen": id})``;
  ``conn.getObjects("Well", opts={"plate": id, "load_images": True})`` and, on
  a well, ``getRow``, ``getColumn``, ``listChildren`` (its WellSamples) and,
  on those, ``getImage``;
  on an image wrapper: ``getId``, ``getName``, ``getSizeX/Y/Z/T/C``,
  ``getPixelsType``, ``getPixelsId``, ``getDetails().group.id``;
* ``conn.getRoiService().findByImage(image_id, None, ctx).rois``;
* ``conn.createRawPixelsStore()`` and, on it, ``setPixelsId``,
  ``getResolutionLevels``, ``setResolutionLevel``,
  ``getResolutionDescriptions``, ``getTileSize``, ``getTile``, ``close``
  (see :mod:`bridge.connectors.omero.pixels`).  BlitzGateway hands out one
  shared store per connection, so one plane is read at a time, and each
  reader sets its pixels id again before reading;
* ``conn.getUpdateService().saveAndReturnArray(rois, ctx)``: one call per image;
* ``conn.deleteObjects("Roi", ids, deleteAnns=True, deleteChildren=True)`` (only
  ROIs that are ours, after the image's new ROIs are saved) and, on the handle it
  returns, omero-py's ``omero.callbacks.CmdCallbackI(conn.c, handle)`` with
  ``loop``, ``getResponse`` and ``close``: see :func:`delete_rois` for why not
  ``wait=True``;
* ``conn.keepAlive()`` after a connection error, ``conn.close()``.

An image is written in two steps, save then delete, so that a failure at any
point never leaves a point without its nucleus: see :meth:`OmeroRun.write`.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import Ice
import omero
import omero.callbacks
import omero.cmd
from tqdm import tqdm

from bridge.connectors.omero.core import ImagePlan, PolygonSpec, RunSummary, new_run_id, plan_image, polygon_specs
from bridge.connectors.omero.model import build_roi, records_from_rois
from bridge.connectors.omero.pixels import OmeroPixelsReader, check_rgb8
from bridge.errors import BridgeInputError

log = logging.getLogger(__name__)

DEFAULT_PORT = 4064
ALL_GROUPS = -1
DEFAULT_DELETE_TIMEOUT_S = 60.0
_POLL_MS = 500  # how often the wait for a delete wakes up (the server also notifies on completion)


class ConnectionLost(Exception):
    """The server went away and could not be reached again."""


class DeleteIncomplete(Exception):
    """The server refused a delete, did not finish it in time, or deleted less than asked."""


# ---------------------------------------------------------------- connecting


def _quiet_omero_logs() -> None:
    # omero-py logs the session id (a credential) at INFO when it connects.
    logging.getLogger("omero").setLevel(logging.WARNING)


def connect(
    host: str,
    user: str | None = None,
    password: str | None = None,
    port: int = DEFAULT_PORT,
    session_key: str | None = None,
    secure: bool = True,
    gateway_class: Any = None,
) -> Any:
    """A connected BlitzGateway, logged in with a password or joined to a session.

    ``secure=True`` keeps the whole session on TLS (OMERO logs in over TLS
    in any case; without it, omero-py moves data to a plain connection).
    Failures raise :class:`BridgeInputError` with a message that never
    contains the password or the session key.
    """
    _quiet_omero_logs()
    if gateway_class is None:
        from omero.gateway import BlitzGateway as gateway_class
    where = f"{host}:{port}"
    if not session_key and (not user or password is None):
        raise BridgeInputError("give --user and a password (--password-env VAR), or --session-key")
    if session_key:
        conn = gateway_class(host=host, port=port, secure=secure)
        how = "with the given session key (expired, or for another server?)"
    else:
        conn = gateway_class(user, password, host=host, port=port, secure=secure)
        how = f"as {user!r} (wrong user name or password?)"
    err: BaseException | None = None
    try:
        ok = conn.connect(sUuid=session_key) if session_key else conn.connect()
        if not ok:
            err = conn.getLastError()
    except Ice.Exception as exc:  # BlitzGateway re-raises socket errors (refused, unreachable)
        ok, err = False, exc
    if not ok:
        with contextlib.suppress(Exception):  # the login error is the one to report
            conn.close()
        if isinstance(err, Ice.LocalException):
            raise BridgeInputError(f"cannot reach the OMERO server at {where} ({type(err).__name__})")
        raise BridgeInputError(f"cannot log in to the OMERO server at {where} {how}")
    return conn


# ---------------------------------------------------------------- what to process


def _ids(wrappers) -> list[int]:
    return [int(w.getId()) for w in wrappers]


def plate_image_ids(conn: Any, plate: int) -> list[int]:
    """The images of every well of a plate (every field), row by row."""
    wells = list(conn.getObjects("Well", opts={"plate": int(plate), "load_images": True}))
    wells.sort(key=lambda w: (w.getRow() or 0, w.getColumn() or 0))
    out: list[int] = []
    for well in wells:
        for sample in well.listChildren():
            image = sample.getImage()
            if image is not None and image.getId() is not None:
                out.append(int(image.getId()))
    return out


def image_ids(
    conn: Any,
    images: Sequence[int] = (),
    dataset: int | None = None,
    project: int | None = None,
    *,
    plate: int | None = None,
    screen: int | None = None,
) -> list[int]:
    """Image ids in order, without repeats: the given ones, a dataset's, a project's, a plate's or a screen's."""
    conn.SERVICE_OPTS.setOmeroGroup(ALL_GROUPS)
    out: list[int] = list(images)
    if dataset is not None:
        if conn.getObject("Dataset", int(dataset)) is None:
            raise BridgeInputError(f"dataset {dataset} not found on the server (or you cannot see it)")
        out += _ids(conn.getObjects("Image", opts={"dataset": int(dataset)}))
    if project is not None:
        if conn.getObject("Project", int(project)) is None:
            raise BridgeInputError(f"project {project} not found on the server (or you cannot see it)")
        for did in _ids(conn.getObjects("Dataset", opts={"project": int(project)})):
            out += _ids(conn.getObjects("Image", opts={"dataset": did}))
    if plate is not None:
        if conn.getObject("Plate", int(plate)) is None:
            raise BridgeInputError(f"plate {plate} not found on the server (or you cannot see it)")
        out += plate_image_ids(conn, int(plate))
    if screen is not None:
        if conn.getObject("Screen", int(screen)) is None:
            raise BridgeInputError(f"screen {screen} not found on the server (or you cannot see it)")
        for pid in _ids(conn.getObjects("Plate", opts={"screen": int(screen)})):
            out += plate_image_ids(conn, pid)
    return list(dict.fromkeys(int(i) for i in out))


@dataclass(frozen=True)
class ImageInfo:
    id: int
    name: str
    width: int
    height: int
    size_z: int
    size_t: int
    size_c: int
    pixels_type: str
    pixels_id: int
    group_id: int
    pixel_size_um: float | None = None  # mean of the physical X and Y sizes; None when not recorded


def _pixel_size_um(img: Any) -> float | None:
    """The image's physical pixel size in µm (any recorded length unit converted), or None."""
    sizes = []
    for get in (img.getPixelSizeX, img.getPixelSizeY):
        length = get(units="MICROMETER")
        value = None if length is None else float(length.getValue())
        if value is None or not value > 0:
            return None
        sizes.append(value)
    return sum(sizes) / 2


def load_image(conn: Any, image_id: int) -> ImageInfo:
    """The image's sizes and pixels, found in any of the user's groups; its group becomes current."""
    conn.SERVICE_OPTS.setOmeroGroup(ALL_GROUPS)
    # load_pixels: sizes and pixel type come with the image, in the same query
    img = conn.getObject("Image", int(image_id), opts={"load_pixels": True})
    if img is None:
        raise BridgeInputError(f"image {image_id} not found on the server (or you cannot see it)")
    size_x = img.getSizeX()
    if size_x is None:
        raise BridgeInputError(f"image {image_id} has no pixels")
    info = ImageInfo(
        id=int(img.getId()),
        name=str(img.getName() or ""),
        width=int(size_x),
        height=int(img.getSizeY()),
        size_z=int(img.getSizeZ()),
        size_t=int(img.getSizeT()),
        size_c=int(img.getSizeC()),
        pixels_type=str(img.getPixelsType()),
        pixels_id=int(img.getPixelsId()),
        group_id=int(img.getDetails().group.id.val),
        pixel_size_um=_pixel_size_um(img),
    )
    conn.SERVICE_OPTS.setOmeroGroup(info.group_id)
    return info


# ---------------------------------------------------------------- deleting


def _describe_response(rsp: Any) -> str:
    """One line for an omero.cmd.ERR (GraphException carries a message; others a name and parameters)."""
    message = getattr(rsp, "message", "") or ""
    params = dict(getattr(rsp, "parameters", None) or {})
    text = message or params.get("message", "") or "; ".join(f"{k}={v}" for k, v in params.items())
    name = getattr(rsp, "name", "") or type(rsp).__name__
    return " ".join(f"{name}: {text}".split()) if text else name


def _deleted_roi_ids(rsp: Any) -> set[int]:
    """ROI ids a Delete2Response lists (keys are class names such as ``ome.model.roi.Roi``)."""
    out: set[int] = set()
    for cls, ids in (getattr(rsp, "deletedObjects", None) or {}).items():
        if str(cls).rsplit(".", 1)[-1] == "Roi":
            out.update(int(i) for i in ids)
    return out


def delete_rois(conn: Any, ids: Sequence[int], timeout_s: float) -> None:
    """Delete ROIs (with their shapes and our annotations) and wait, at most ``timeout_s``, for the server.

    Why not ``deleteObjects(..., wait=True)``: omero-py then waits 10 x 500 ms
    and returns *silently* when the delete has not finished, and raises
    ``omero.CmdError`` (not an Ice exception) when the server refuses.  Here
    the wait is bounded by ``timeout_s`` and the response is checked: a
    refusal, a time-out, or a response that does not list every ROI raises
    :class:`DeleteIncomplete`.  A timed-out delete may still finish on the
    server later; either way, what is left is found and deleted by the next run.
    """
    ids = [int(i) for i in ids]
    handle = conn.deleteObjects("Roi", ids, deleteAnns=True, deleteChildren=True)
    try:
        callback = omero.callbacks.CmdCallbackI(conn.c, handle, foreground_poll=True)
    except BaseException:
        with contextlib.suppress(Exception):
            handle.close()
        raise
    try:
        ms = max(1, min(_POLL_MS, round(timeout_s * 1000)))
        loops = max(1, -(-round(timeout_s * 1000) // ms))
        try:
            rsp = callback.loop(loops, ms)
        except omero.LockTimeout as exc:
            raise DeleteIncomplete(f"the server did not finish deleting within {timeout_s:g} s") from exc
    finally:
        with contextlib.suppress(Exception):  # closing must not hide the outcome
            callback.close(True)
    if isinstance(rsp, omero.cmd.ERR):
        raise DeleteIncomplete(f"the server refused to delete them ({_describe_response(rsp)})")
    missing = sorted(set(ids) - _deleted_roi_ids(rsp))
    if missing:
        raise DeleteIncomplete(
            f"the server deleted {len(ids) - len(missing)} of {len(ids)}; not deleted: {', '.join(map(str, missing))}"
        )


# ---------------------------------------------------------------- the run

# The counters of RunSummary that an image adds to: an image's outcome is what it added.
OUTCOME_COUNTS = ("points", "to_segment", "written", "already_done", "not_found", "invalid", "other_class", "deleted")


@dataclass
class ImageOutcome:
    """One image of a run, for a per-image report (the OMERO script's CSV):
    what this image added to the summary's counts, and its error if it failed."""

    image_id: int
    name: str = ""
    status: str = "ok"  # ok, failed, no points
    counts: dict[str, int] = field(default_factory=dict)
    error: str = ""


def describe_error(exc: BaseException) -> str:
    """One line for an error from the server (omero exceptions print as multi-line dumps)."""
    if isinstance(exc, omero.ServerError):
        return f"{type(exc).__name__}: {exc.message}" if exc.message else type(exc).__name__
    if isinstance(exc, Ice.Exception):
        return type(exc).__name__
    return " ".join(str(exc).split()) or type(exc).__name__


class OmeroRun:
    """Segment the Point ROIs of OMERO images and write one polygon ROI per nucleus.

    ``segmenter`` is anything with ``segment_tiled(reader, clicks, max_tile,
    progress) -> Segmentation`` (the NuClick engine, the watershed baseline,
    a gRPC client).  ``reconnect`` returns a fresh connection after the
    server dropped (None: give up on the remaining images); closing the dead
    one is the caller's (only it knows whether the session may be killed).
    ``delete_timeout`` bounds the wait for each image's delete.
    Messages go to ``report`` (stderr by default); :meth:`run` returns the
    summary.  Whatever goes wrong with one image (the server, the model, a
    bug) is reported for that image and the run goes on to the next.
    """

    def __init__(
        self,
        conn: Any,
        segmenter: Any = None,
        *,
        replace: bool = False,
        dry_run: bool = False,
        run_id: str | None = None,
        progress: bool = False,
        max_tile: int = 2048,
        reconnect: Callable[[], Any] | None = None,
        report: Callable[[str], None] | None = None,
        delete_timeout: float = DEFAULT_DELETE_TIMEOUT_S,
        classes: Collection[str] | None = None,
    ) -> None:
        if segmenter is None and not dry_run:
            raise ValueError("a segmenter is needed unless dry_run")
        if not delete_timeout > 0:
            raise ValueError("delete_timeout must be positive")
        self.delete_timeout = float(delete_timeout)
        self._left = ""  # what the image being processed holds now, for the error message
        self.conn = conn
        self.segmenter = segmenter
        self.replace = replace
        self.dry_run = dry_run
        self.progress = progress
        self.max_tile = max_tile
        self.reconnect = reconnect
        self.report = report or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.summary = RunSummary(run_id=run_id or new_run_id(), dry_run=dry_run)
        self.classes = None if classes is None else tuple(classes)
        self.outcomes: list[ImageOutcome] = []  # one per image, in order
        self._name = ""  # the name of the image being processed, once read

    # -- whole run

    def run(self, ids: Sequence[int]) -> RunSummary:
        s = self.summary
        for k, iid in enumerate(ids):
            s.images += 1
            self._left = "nothing was written"
            self._name = ""
            before = {c: getattr(s, c) for c in OUTCOME_COUNTS}
            n_errors = len(s.errors)
            try:
                self.process_image(int(iid))
                s.images_ok += 1
            except BridgeInputError as exc:
                self._failed(iid, str(exc))
            except DeleteIncomplete as exc:
                self._failed(iid, f"{exc}; {self._left}")
            except Ice.LocalException as exc:  # transport-level: the server or the network went away
                self._failed(iid, f"connection to the server lost ({describe_error(exc)}); {self._left}")
                try:
                    self._recover()
                except ConnectionLost as lost:
                    self._outcome(int(iid), before, n_errors)
                    rest = [int(i) for i in ids[k + 1 :]]
                    if rest:
                        s.images += len(rest)
                        s.images_failed += len(rest)
                        msg = f"{lost}; {len(rest)} image(s) not processed: {', '.join(map(str, rest))}"
                        s.errors.append(msg)
                        self.report(f"error: {msg}")
                        for i in rest:
                            self.outcomes.append(ImageOutcome(i, status="failed", error=lost.args[0]))
                    break
            except Ice.Exception as exc:  # the server refused (permissions, validation, ...)
                self._failed(iid, f"the server refused: {describe_error(exc)}; {self._left}")
            except Exception as exc:  # the model (out of memory, ...), the segmentation server, a bug
                log.debug("image %s failed", iid, exc_info=True)
                self._failed(iid, f"{type(exc).__name__}: {describe_error(exc)}; {self._left}")
            self._outcome(int(iid), before, n_errors)
        return s

    def _outcome(self, iid: int, before: dict[str, int], n_errors: int) -> None:
        s = self.summary
        counts = {c: getattr(s, c) - before[c] for c in OUTCOME_COUNTS}
        errors = s.errors[n_errors:]
        status = "failed" if errors else ("no points" if not counts["points"] + counts["other_class"] else "ok")
        error = "; ".join(e.removeprefix(f"image {iid}: ") for e in errors)
        self.outcomes.append(ImageOutcome(iid, self._name, status, counts, error))

    def _failed(self, iid: int, msg: str) -> None:
        self.summary.images_failed += 1
        line = f"image {iid}: {msg}"
        self.summary.errors.append(line)
        self.report(f"error: {line}")

    def _recover(self) -> None:
        try:
            alive = bool(self.conn.keepAlive())
        except Exception:  # any failure here means "not alive"
            alive = False
        if alive:
            return
        if self.reconnect is None:
            raise ConnectionLost("the connection to the server is lost")
        try:
            fresh = self.reconnect()
        except Exception as exc:
            raise ConnectionLost(f"the connection to the server is lost and reconnecting failed ({exc})") from exc
        self.conn = fresh
        self.report("reconnected to the server")

    # -- one image

    def plan(self, iid: int) -> tuple[Any, ImagePlan]:
        info = load_image(self.conn, iid)
        self._name = info.name
        result = self.conn.getRoiService().findByImage(info.id, None, self.conn.SERVICE_OPTS)
        points, ours = records_from_rois(result.rois or [])
        plan = plan_image(
            info.id,
            info.name,
            info.width,
            info.height,
            points,
            ours,
            info.size_z,
            info.size_t,
            self.replace,
            classes=self.classes,
        )
        return info, plan

    def process_image(self, iid: int) -> ImagePlan:
        info, plan = self.plan(iid)
        label = f"image {info.id} {info.name!r}"
        if plan.n_points == 0:
            self.summary.add_plan(plan)
            self.report(f"{label}: no Point ROIs, nothing to do")
            return plan
        check_rgb8(info.size_c, info.pixels_type, label)
        self.summary.add_plan(plan)
        for _point, reason in plan.invalid:
            self.report(f"{label}: skipped {reason}")
        for r in plan.kept_ours:
            self.report(f"{label}: our ROI {r.roi_id} now holds other shapes too; kept, point {r.point_id} skipped")
        if self.dry_run:
            self.report(f"plan: {plan.describe()}")
            return plan
        if plan.n_todo == 0 and not plan.to_delete:
            self.report(f"{label}: all {len(plan.done)} point(s) already done")
            return plan

        specs = self.segment(info, plan)
        self.write(info, plan, specs)
        return plan

    def segment(self, info: ImageInfo, plan: ImagePlan) -> list[PolygonSpec]:
        specs: list[PolygonSpec] = []
        bar = tqdm(total=plan.n_todo, desc=f"image {info.id}", unit="point", disable=not self.progress)
        try:
            for (z, t), points in sorted(plan.todo.items()):
                store = self.conn.createRawPixelsStore()
                with OmeroPixelsReader(
                    store, info.pixels_id, info.width, info.height, z, t, ctx=self.conn.SERVICE_OPTS
                ) as reader:
                    seg = self.segmenter.segment_tiled(
                        reader, [p.click() for p in points], max_tile=self.max_tile, progress=False
                    )
                plane_specs, missing = polygon_specs(points, seg.results, self.summary.run_id)
                specs += plane_specs
                self.summary.not_found += len(missing)
                for p, reason in missing:
                    self.report(f"image {info.id}: not found: point {p.shape_id} at ({p.x:.1f}, {p.y:.1f}): {reason}")
                bar.update(len(points))
        finally:
            bar.close()
        return specs

    def write(self, info: ImageInfo, plan: ImagePlan, specs: list[PolygonSpec]) -> None:
        """Save all of this image's new ROIs in one call, then delete our earlier ones.

        One save is one server transaction: the image gets all its new ROIs
        or none.  Saving first means that no failure leaves a point without
        its nucleus: a failed save leaves the image as it was; a failed or
        timed-out delete leaves old and new ROIs side by side, each marked
        with its run, and the next run deletes the older ones
        (:func:`~bridge.connectors.omero.core.leftover_rois`).
        """
        label = f"image {info.id} {info.name!r}"
        old = plan.to_delete
        saved = []
        if specs:
            rois = [build_roi(spec, info.id) for spec in specs]
            self._left = "none of its new ROIs were saved, unless the server committed all of them before the error"
            if old:
                self._left += f"; its {len(old)} earlier ROI(s) of ours are untouched"
            saved = self.conn.getUpdateService().saveAndReturnArray(rois, self.conn.SERVICE_OPTS)
            self.summary.written += len(saved)
        if old:
            self._left = (
                f"its {len(saved)} new ROI(s) are saved and its {len(old)} earlier ROI(s) of ours may still be "
                "there: the next run deletes what is left"
            )
            try:
                delete_rois(self.conn, [r.roi_id for r in old], self.delete_timeout)
            except BaseException:
                self.summary.not_deleted += len(old)
                raise
            self.summary.deleted += len(old)
        extra = ""
        if plan.delete:
            extra += f", replaced {len(plan.delete)} earlier"
        if plan.leftovers:
            extra += f", deleted {len(plan.leftovers)} leftover(s) of an interrupted earlier run"
        self.report(f"{label}: wrote {len(saved)} polygon ROI(s){extra}; {len(plan.done)} already done")
