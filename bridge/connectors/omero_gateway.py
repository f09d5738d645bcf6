"""Talking to OMERO through omero-py's BlitzGateway (the thin omero-py layer).

The only gateway calls the connector makes (the test double in
``tests/test_omero_connector.py`` implements exactly these):

* ``conn.SERVICE_OPTS.setOmeroGroup(gid)``: -1 to find objects in any of the
  user's groups, then the image's group for its reads and writes;
* ``conn.getObject(type, id)`` for "Dataset", "Project", and "Image" with
  ``opts={"load_pixels": True}`` (None if missing), and
  ``conn.getObjects(type, opts={"dataset"|"project": id})``;
  on an image wrapper: ``getId``, ``getName``, ``getSizeX/Y/Z/T/C``,
  ``getPixelsType``, ``getPixelsId``, ``getDetails().group.id``;
* ``conn.getRoiService().findByImage(image_id, None, ctx).rois``;
* ``conn.createRawPixelsStore()`` and, on it, ``setPixelsId``,
  ``getResolutionLevels``, ``setResolutionLevel``,
  ``getResolutionDescriptions``, ``getTileSize``, ``getTile``, ``close``
  (see :mod:`bridge.connectors.omero_pixels`);
* ``conn.getUpdateService().saveAndReturnArray(rois, ctx)``: one call per image;
* ``conn.deleteObjects("Roi", ids, deleteAnns=True, deleteChildren=True, wait=True)``
  (``--replace`` only, and only ROIs that are ours);
* ``conn.keepAlive()`` after a connection error, ``conn.close()``.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import Ice
import omero
from tqdm import tqdm

from bridge.connectors.omero_core import ImagePlan, PolygonSpec, RunSummary, new_run_id, plan_image, polygon_specs
from bridge.connectors.omero_model import build_roi, records_from_rois
from bridge.connectors.omero_pixels import OmeroPixelsReader, check_rgb8
from bridge.errors import BridgeInputError

log = logging.getLogger(__name__)

DEFAULT_PORT = 4064
ALL_GROUPS = -1


class ConnectionLost(Exception):
    """The server went away and could not be reached again."""


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


def image_ids(
    conn: Any, images: Sequence[int] = (), dataset: int | None = None, project: int | None = None
) -> list[int]:
    """Image ids in order, without repeats: the given ones, a dataset's, or a project's."""
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
    )
    conn.SERVICE_OPTS.setOmeroGroup(info.group_id)
    return info


# ---------------------------------------------------------------- the run


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
    server dropped (None: give up on the remaining images).  Messages go to
    ``report`` (stderr by default); :meth:`run` returns the summary.
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
    ) -> None:
        if segmenter is None and not dry_run:
            raise ValueError("a segmenter is needed unless dry_run")
        self.conn = conn
        self.segmenter = segmenter
        self.replace = replace
        self.dry_run = dry_run
        self.progress = progress
        self.max_tile = max_tile
        self.reconnect = reconnect
        self.report = report or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.summary = RunSummary(run_id=run_id or new_run_id(), dry_run=dry_run)

    # -- whole run

    def run(self, ids: Sequence[int]) -> RunSummary:
        s = self.summary
        for k, iid in enumerate(ids):
            s.images += 1
            try:
                self.process_image(int(iid))
                s.images_ok += 1
            except BridgeInputError as exc:
                self._failed(iid, str(exc))
            except Ice.LocalException as exc:  # transport-level: the server or the network went away
                self._failed(iid, f"connection to the server lost ({describe_error(exc)}); nothing written")
                try:
                    self._recover()
                except ConnectionLost as lost:
                    rest = [int(i) for i in ids[k + 1 :]]
                    if rest:
                        s.images += len(rest)
                        s.images_failed += len(rest)
                        msg = f"{lost}; {len(rest)} image(s) not processed: {', '.join(map(str, rest))}"
                        s.errors.append(msg)
                        self.report(f"error: {msg}")
                    break
            except Ice.Exception as exc:  # the server refused (permissions, validation, ...)
                self._failed(iid, f"the server refused: {describe_error(exc)}")
        return s

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
            self.conn = self.reconnect()
        except Exception as exc:
            raise ConnectionLost(f"the connection to the server is lost and reconnecting failed ({exc})") from exc
        self.report("reconnected to the server")

    # -- one image

    def plan(self, iid: int) -> tuple[Any, ImagePlan]:
        info = load_image(self.conn, iid)
        result = self.conn.getRoiService().findByImage(info.id, None, self.conn.SERVICE_OPTS)
        points, ours = records_from_rois(result.rois or [])
        plan = plan_image(
            info.id, info.name, info.width, info.height, points, ours, info.size_z, info.size_t, self.replace
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
        if plan.n_todo == 0 and not plan.delete:
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
        """Delete our earlier ROIs (``--replace``), then save all of this image's ROIs in one call.

        One call is one server transaction: a dropped connection leaves all
        of the image's new ROIs written or none.  Deleting first means a
        failure between the two leaves points without a polygon, which a
        plain re-run fills in, never duplicates.
        """
        label = f"image {info.id} {info.name!r}"
        if plan.delete:
            ids = [r.roi_id for r in plan.delete]
            self.conn.deleteObjects("Roi", ids, deleteAnns=True, deleteChildren=True, wait=True)
            self.summary.deleted += len(ids)
        saved = []
        if specs:
            rois = [build_roi(spec, info.id) for spec in specs]
            try:
                saved = self.conn.getUpdateService().saveAndReturnArray(rois, self.conn.SERVICE_OPTS)
            except Exception:
                if plan.delete:
                    self.report(
                        f"{label}: its {len(plan.delete)} earlier ROI(s) were deleted but the new ones were not "
                        "saved; run again (without --replace) to write them"
                    )
                raise
            self.summary.written += len(saved)
        extra = f", replaced {len(plan.delete)} earlier" if plan.delete else ""
        self.report(f"{label}: wrote {len(saved)} polygon ROI(s){extra}; {len(plan.done)} already done")
