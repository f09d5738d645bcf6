"""An in-memory OMERO for tests: BlitzGateway's calls over real ``omero.model`` objects and real pixels.

No OMERO server can run here, so :class:`InMemoryOmero` stands in for the
server and :class:`Gateway` for a BlitzGateway connection to it: it stores
real ``omero.model`` objects (``RoiI``, ``PointI``, ``PolygonI``, ``ImageI``,
rtypes), serves raw tiles through a RawPixelsStore double, keeps what is
saved, and fails the way the server does when told to.  Used by the OMERO
connector's and the OMERO script's tests (moved here from
tests/test_omero_connector.py unchanged).
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import threading

import Ice
import numpy as np
import omero
import omero.clients
from omero.gateway import (
    BlitzGateway,
    DatasetWrapper,
    ImageWrapper,
    PlateWrapper,
    ProjectWrapper,
    ScreenWrapper,
    ServiceOptsDict,
    WellWrapper,
)
from omero.model import (
    DatasetI,
    ExperimenterGroupI,
    FileAnnotationI,
    ImageI,
    OriginalFileI,
    PixelsI,
    PixelsTypeI,
    PlateI,
    PointI,
    ProjectI,
    RoiI,
    WellI,
    WellSampleI,
)
from omero.rtypes import rdouble, rint, rlong, rstring, unwrap
from test_omero_pixels import TileStore, make_pyramid

from bridge.connectors.omero.core import parse_description

GROUP = 53  # the user's default group
OTHER_GROUP = 54

# ---------------------------------------------------------------- the gateway double

_CALLBACKS: list = []  # one Ice communicator and adapter for command callbacks, made on first use


def _callback_adapter():
    """A real, activated Ice object adapter on loopback: where omero-py's CmdCallbackI lives."""
    if not _CALLBACKS:
        ic = Ice.initialize()
        adapter = ic.createObjectAdapterWithEndpoints("nb-test-callbacks", "tcp -h 127.0.0.1")
        adapter.activate()
        atexit.register(ic.destroy)
        _CALLBACKS.append(adapter)
    return _CALLBACKS[0]


def _group(ctx) -> int:
    """The group a call runs in: the context's omero.group, or the user's default group."""
    g = None if ctx is None else ctx.getOmeroGroup()
    return GROUP if g is None else int(g)


class _Handle:
    """A submitted command (omero.cmd.HandlePrx) as the server keeps it: a response once it finished,
    and the client's callbacks, told through Ice (``CmdCallbackPrx.finished``) when it does."""

    def __init__(self):
        self.response = None
        self.status = None
        self.callbacks = []
        self.closed = False
        self.lock = threading.Lock()

    def addCallback(self, prx, ctx=None):
        with self.lock:
            self.callbacks.append(prx)

    def getResponse(self, ctx=None):
        return self.response

    def getStatus(self, ctx=None):
        return self.status

    def close(self, ctx=None):
        self.closed = True

    def finish(self, rsp, failed=False):
        with self.lock:
            self.status = omero.cmd.Status(flags=[omero.cmd.State.FAILURE] if failed else [])
            self.response = rsp
            callbacks = list(self.callbacks)
        for prx in callbacks:
            with contextlib.suppress(Ice.Exception):  # the client stopped waiting and removed it
                prx.finished(rsp, self.status)


class _Store(TileStore):
    """The connection's RawPixelsStore.  As with BlitzGateway, ``createRawPixelsStore()`` returns the same
    one every time; ``close()`` ends the service, and the next one knows no pixels until ``setPixelsId``."""

    def __init__(self, conn: Gateway):
        super().__init__({}, tile=conn.server.tile_size)
        self.conn = conn
        self.planes = None

    def setPixelsId(self, pid, bypass, ctx=None):
        self.conn.check("setPixelsId")
        group = _group(ctx)
        if group != self.conn.server.group_of_pixels(pid):  # a stateful service runs in one group, never -1
            raise omero.SecurityViolation(message=f"Pixels:{pid} is not in group {group}")
        self.pixels_id = pid
        self.planes = self.conn.server.pixels[pid]

    def getResolutionLevels(self):
        self._opened()
        return super().getResolutionLevels()

    def getTile(self, z, c, t, x, y, w, h):
        self.conn.check("getTile")
        self._opened()
        data = super().getTile(z, c, t, x, y, w, h)
        self.conn.server.tiles.append((self.pixels_id, self.level, z, c, t, x, y, w, h))
        return data

    def _opened(self):
        if self.planes is None:
            raise omero.ApiUsageException(message="no pixels set: call setPixelsId first")

    def close(self):
        super().close()
        self.planes = self.pixels_id = self.level = None


class _Client:
    """The omero.client behind a connection, as far as omero-py's own command waiting uses it."""

    waitOnCmd = omero.clients.BaseClient.waitOnCmd  # omero-py's code, unchanged

    def __init__(self, conn: Gateway):
        self.conn = conn
        self.sf = self  # the ServiceFactory: only submit() is used

    def getAdapter(self):
        return _callback_adapter()

    def getCategory(self):
        return "nb-test"

    def submit(self, request, ctx=None):
        self.conn.check("delete")
        return self.conn.server.submit(request, _group(ctx))


class Gateway:
    """One BlitzGateway connection: exactly the calls the connector makes, nothing else.

    * ``SERVICE_OPTS``: a real ``omero.gateway.ServiceOptsDict``; every lookup respects its group
      (-1: all of the user's groups; unset: the default group), as the server's filters do;
    * ``getObject(type, id)`` for Dataset / Project and ``getObject("Image", id, opts={"load_pixels":
      True})``: real omero.gateway wrappers around *copies* of the stored objects, or None;
    * ``getObjects("Image", opts={"dataset": id})``, ``getObjects("Dataset", opts={"project": id})``;
    * ``getRoiService().findByImage(image_id, None, ctx)`` -> ``omero.api.RoiResult`` of copies;
    * ``createRawPixelsStore()`` -> the connection's one shared RawPixelsStore (:class:`_Store`);
    * ``getUpdateService().saveAndReturnArray(objects, ctx)``: in the image's group only (else
      ``omero.SecurityViolation``); one transaction; the caller's objects stay unsaved, copies with ids
      come back;
    * ``deleteObjects`` and its waiting are omero-py's own (``BlitzGateway.deleteObjects``,
      ``omero.client.waitOnCmd``, ``CmdCallbackI`` on a real Ice adapter): only the command's
      submission and its handle are simulated, by the server (:meth:`InMemoryOmero.submit`);
    * ``keepAlive()``, ``close(hard=True)``.

    After the connection drops, every call raises ``Ice.ConnectionLostException``.
    """

    deleteObjects = BlitzGateway.deleteObjects
    _waitOnCmd = BlitzGateway._waitOnCmd

    def __init__(self, server: InMemoryOmero):
        self.server = server
        self.SERVICE_OPTS = ServiceOptsDict()
        self.c = _Client(self)
        self.alive = True
        self.closed: str | None = None  # "hard" (session killed) or "soft" (detached)
        self._store: _Store | None = None

    def check(self, call, iid=None):
        """Fail the way the server was told to (``server.drop`` / ``server.refuse``) before ``call``."""
        if self.closed or not self.alive:
            raise Ice.ConnectionLostException()
        target = self.server.drop.get(call)
        if target is True or (target is not None and target == iid):
            self.alive = False
            raise Ice.ConnectionLostException()
        if call in self.server.refuse:
            raise omero.SecurityViolation(message=self.server.refuse[call])

    def group(self) -> int:
        return _group(self.SERVICE_OPTS)

    # -- the gateway calls

    def getObject(self, obj_type, oid, opts=None):
        self.check("getObject")
        if obj_type == "Image":
            assert opts == {"load_pixels": True}  # else the wrapper would query again for the pixels
            img = self.server.images.get(oid)
            if img is None or not self.server.visible(self.group(), img):
                return None
            return ImageWrapper(self, copy.deepcopy(img))
        if obj_type == "Dataset":
            return DatasetWrapper(self, DatasetI(oid, True)) if oid in self.server.datasets else None
        if obj_type == "Project":
            return ProjectWrapper(self, ProjectI(oid, True)) if oid in self.server.projects else None
        raise AssertionError(f"getObject({obj_type!r}) is not a call the connector makes")

    def getObjects(self, obj_type, opts):
        self.check("getObjects")
        if obj_type == "Image":
            images = [self.server.images[i] for i in self.server.datasets[opts["dataset"]]]
            return [ImageWrapper(self, copy.deepcopy(i)) for i in images if self.server.visible(self.group(), i)]
        if obj_type == "Dataset":
            return [DatasetWrapper(self, DatasetI(d, True)) for d in self.server.projects[opts["project"]]]
        raise AssertionError(f"getObjects({obj_type!r}) is not a call the connector makes")

    def getRoiService(self):
        return self

    def findByImage(self, image_id, options, ctx):
        self.check("findByImage", image_id)
        img = self.server.images.get(image_id)
        if img is None or not self.server.visible(_group(ctx), img):
            return omero.api.RoiResult(rois=[])  # the server's group filter hides it
        return omero.api.RoiResult(rois=[copy.deepcopy(r) for r in self.server.rois.get(image_id, [])])

    def createRawPixelsStore(self):
        if self._store is None:
            self._store = _Store(self)
            self.server.stores.append(self._store)
        return self._store

    def getUpdateService(self):
        return self

    def saveAndReturnArray(self, objects, ctx):
        assert all(isinstance(o, RoiI) for o in objects)
        image_ids = {unwrap(o.getImage().getId()) for o in objects}
        assert len(image_ids) == 1, "one batch per image"
        (iid,) = image_ids
        self.check("save", iid)
        group = _group(ctx)
        if group != self.server.images[iid].getDetails().getGroup().getId().val:
            raise omero.SecurityViolation(message=f"cannot link to Image:{iid} from group {group}")
        stored = self.server.store_rois([copy.deepcopy(o) for o in objects])
        self.server.saves.append(stored)
        if self.server.lose_reply.get("save") == iid:  # committed; the reply never arrives
            self.alive = False
            raise Ice.ConnectionLostException()
        return [copy.deepcopy(o) for o in stored]

    def keepAlive(self):
        return self.alive and not self.closed

    def close(self, hard=True):
        self.closed = "hard" if hard else "soft"


class InMemoryOmero:
    """The server's side: images, pixels, ROIs (real ``omero.model`` objects), and how it fails.

    ``connect()`` opens a :class:`Gateway`.  ``drop = {call: image id or True}`` makes that call
    ("getObject", "getObjects", "findByImage", "setPixelsId", "getTile", "save", "delete") raise
    ``Ice.ConnectionLostException`` and kills the connection; ``lose_reply = {"save": image id}``
    commits the save and then drops the connection; ``refuse = {call: message}`` raises
    ``omero.SecurityViolation``.  ``delete_mode`` is what a submitted delete does: "now" (finishes at
    once), ("after", seconds) (finishes later; the client is told through its callback), "never",
    or ("refuse", message) (an ``omero.cmd.GraphException`` response; nothing deleted).
    """

    def __init__(self, tile_size=(256, 256)):
        self.tile_size = tile_size
        self.images: dict[int, ImageI] = {}
        self.pixels: dict[int, dict[tuple[int, int], list[np.ndarray]]] = {}
        self.rois: dict[int, list[RoiI]] = {}
        self.datasets: dict[int, list[int]] = {}
        self.projects: dict[int, list[int]] = {}
        self.saves: list[list[RoiI]] = []
        self.deletes: list[list[int]] = []
        self.handles: list[_Handle] = []
        self.stores: list[_Store] = []
        self.tiles: list[tuple] = []  # (pixels id, level, z, c, t, x, y, w, h) of every getTile
        self.connections: list[Gateway] = []
        self.drop: dict[str, object] = {}
        self.lose_reply: dict[str, int] = {}
        self.refuse: dict[str, str] = {}
        self.delete_mode: object = "now"
        self._next_id = 1000
        self.lock = threading.Lock()

    def connect(self) -> Gateway:
        conn = Gateway(self)
        self.connections.append(conn)
        return conn

    # -- set-up helpers (not part of the gateway)

    def add_image(self, iid, planes, name="slide", size_c=3, ptype="uint8", levels=1, group=GROUP):
        """``planes``: {(z, t): (H, W, 3) uint8 array} (or one array for a 1-plane image)."""
        if isinstance(planes, np.ndarray):
            planes = {(0, 0): planes}
        first = next(iter(planes.values()))
        h, w = first.shape[:2]
        pid = iid + 500
        img = ImageI(iid, True)
        img.setName(rstring(name))
        px = PixelsI(pid, True)
        px.setSizeX(rint(w))
        px.setSizeY(rint(h))
        px.setSizeZ(rint(1 + max(z for z, _ in planes)))
        px.setSizeT(rint(1 + max(t for _, t in planes)))
        px.setSizeC(rint(size_c))
        ptype_obj = PixelsTypeI()
        ptype_obj.setValue(rstring(ptype))
        px.setPixelsType(ptype_obj)
        img.addPixels(px)
        img.getDetails().setGroup(ExperimenterGroupI(group, False))
        self.images[iid] = img
        self.pixels[pid] = {k: make_pyramid(v, levels) for k, v in planes.items()}
        self.rois.setdefault(iid, [])
        return img

    def add_rois(self, iid, rois):
        """The user's own ROIs, saved by their client: ``rois`` get their ids; the server keeps copies."""
        for roi in rois:
            roi.setImage(ImageI(iid, False))
        for roi, stored in zip(rois, self.store_rois([copy.deepcopy(r) for r in rois]), strict=True):
            roi.setId(stored.getId())
            for shape, kept in zip(roi.copyShapes(), stored.copyShapes(), strict=True):
                shape.setId(kept.getId())

    def group_of_pixels(self, pid) -> int:
        (img,) = [i for i in self.images.values() if i.getPrimaryPixels().getId().val == pid]
        return img.getDetails().getGroup().getId().val

    def visible(self, group: int, img: ImageI) -> bool:
        return group == -1 or group == img.getDetails().getGroup().getId().val

    def _id(self):
        self._next_id += 1
        return rlong(self._next_id)

    def store_rois(self, rois):
        with self.lock:
            for roi in rois:
                roi.setId(self._id())
                for shape in roi.copyShapes():
                    shape.setId(self._id())
                for link in roi.copyAnnotationLinks():
                    link.setId(self._id())
                    link.getChild().setId(self._id())
                self.rois[unwrap(roi.getImage().getId())].append(roi)
        return rois

    def submit(self, request, group):
        """A command from ``deleteObjects``: the ``Delete2`` omero-py built; its handle."""
        assert isinstance(request, omero.cmd.Delete2) and set(request.targetObjects) == {"Roi"}
        ids = [int(i) for i in request.targetObjects["Roi"]]
        handle = _Handle()
        self.handles.append(handle)
        mode = self.delete_mode
        if mode == "now":
            handle.finish(self.delete(ids, group))
        elif isinstance(mode, tuple) and mode[0] == "after":
            threading.Timer(mode[1], lambda: handle.finish(self.delete(ids, group))).start()
        elif isinstance(mode, tuple) and mode[0] == "refuse":
            handle.finish(omero.cmd.GraphException(name="ome.services.graphs.GraphException", message=mode[1]), True)
        else:
            assert mode == "never", mode
        return handle

    def delete(self, ids, group):
        """Delete the ROIs of ``ids`` visible in ``group`` (with shapes and annotations): a Delete2Response."""
        deleted: dict[str, list[int]] = {}
        with self.lock:
            for iid, rois in self.rois.items():
                if not self.visible(group, self.images[iid]):
                    continue
                for roi in [r for r in rois if unwrap(r.getId()) in ids]:
                    rois.remove(roi)
                    deleted.setdefault("ome.model.roi.Roi", []).append(unwrap(roi.getId()))
                    for shape in roi.copyShapes():
                        deleted.setdefault(f"ome.model.roi.{type(shape).__name__[:-1]}", []).append(
                            unwrap(shape.getId())
                        )
                    for link in roi.copyAnnotationLinks():
                        deleted.setdefault("ome.model.annotations.MapAnnotation", []).append(
                            unwrap(link.getChild().getId())
                        )
            self.deletes.append(sorted(deleted.get("ome.model.roi.Roi", [])))
        return omero.cmd.Delete2Response(deletedObjects=deleted)

    def user_snapshot(self):
        """Every ROI that is not ours, as plain data."""
        out = {}
        for iid, rois in self.rois.items():
            for roi in rois:
                if parse_description(unwrap(roi.getDescription())):
                    continue
                shapes = [
                    (type(s).__name__, unwrap(s.getId()), unwrap(s.getTheZ()), unwrap(s.getTheT()),
                     unwrap(s.getTextValue()), unwrap(getattr(s, "getX", lambda: None)()))
                    for s in roi.copyShapes()
                ]  # fmt: skip
                out[unwrap(roi.getId())] = (iid, unwrap(roi.getDescription()), shapes)
        return out

    def ours(self, iid):
        """Our ROIs on the image, as stored (editing one is someone else editing it on the server)."""
        return [r for r in self.rois[iid] if parse_description(unwrap(r.getDescription()))]

    def runs_by_point(self, iid):
        """{point id: sorted run ids of our ROIs for it}."""
        out: dict[int, list[str]] = {}
        for roi in self.ours(iid):
            point, run_id = parse_description(unwrap(roi.getDescription()))
            out.setdefault(int(point), []).append(run_id)
        return {k: sorted(v) for k, v in out.items()}


def point_roi(*points, description=None):
    """A user ROI holding Point shapes: each (x, y[, z, t[, class]])."""
    roi = RoiI()
    if description:
        roi.setDescription(rstring(description))
    for spec in points:
        x, y, *rest = spec
        z, t, cls = [*rest, None, None, None][:3]
        p = PointI()
        p.setX(rdouble(x))
        p.setY(rdouble(y))
        if z is not None:
            p.setTheZ(rint(z))
        if t is not None:
            p.setTheT(rint(t))
        if cls is not None:
            p.setTextValue(rstring(cls))
        roi.addShape(p)
    return roi


# ---------------------------------------------------------------- what the OMERO script adds


class _RawFileStore:
    """A RawFileStore: ``setFileId``, ``write`` blocks, ``save`` (the file as stored), ``close``."""

    def __init__(self, conn: ScriptGateway):
        self.conn = conn
        self.file_id = None
        self.closed = False

    def setFileId(self, fid, ctx=None):
        self.conn.check("setFileId")
        if fid not in self.conn.server.files:
            raise omero.ValidationException(message=f"OriginalFile:{fid} not found")
        self.file_id = fid

    def write(self, buf, position, length, ctx=None):
        self.conn.check("write")
        data = self.conn.server.file_bytes.setdefault(self.file_id, bytearray())
        data[position : position + length] = bytes(buf[:length])

    def save(self, ctx=None):
        return copy.deepcopy(self.conn.server.files[self.file_id])

    def close(self):
        self.closed = True


class ScriptGateway(Gateway):
    """A BlitzGateway on the script's session: the connector's calls (:class:`Gateway`) plus what the OMERO
    script adds: the wells of a plate and the plates of a screen (real ``WellI``/``WellSampleI`` under
    omero-py's ``WellWrapper``), and, to report in a CSV file, omero-py's own ``createFileAnnfromLocalFile``
    (unchanged) over ``saveAndReturnObject`` and a RawFileStore, ``saveObject`` of annotation links, and
    ``getObject`` of a Dataset, Project, Plate or Screen with its group.  Writes happen in one group
    (never -1), as on the server; a link must be in the group of its parent and of its annotation (else
    ``omero.SecurityViolation``)."""

    createFileAnnfromLocalFile = BlitzGateway.createFileAnnfromLocalFile
    createOriginalFileFromLocalFile = BlitzGateway.createOriginalFileFromLocalFile
    createOriginalFileFromFileObj = BlitzGateway.createOriginalFileFromFileObj

    def getObject(self, obj_type, oid, opts=None):
        if obj_type in ("Plate", "Screen"):
            self.check("getObject")
            known = self.server.plates if obj_type == "Plate" else self.server.screens
            wrapper = None
            if oid in known:
                wrapper = (PlateWrapper if obj_type == "Plate" else ScreenWrapper)(
                    self, getattr(omero.model, f"{obj_type}I")(oid, True)
                )
        else:
            wrapper = super().getObject(obj_type, oid, opts)
        if wrapper is not None and obj_type in ("Dataset", "Project", "Plate", "Screen"):
            group = self.server.container_groups.get((obj_type, oid), GROUP)
            if not self.server.visible(self.group(), _Grouped(group)):
                return None
            wrapper._obj.getDetails().setGroup(ExperimenterGroupI(group, False))
        return wrapper

    def getObjects(self, obj_type, opts):
        """Also the wells of a plate (``load_images``: each with its WellSamples and their images loaded,
        as omero-py's query fetches them) and the plates of a screen."""
        if obj_type == "Well":
            self.check("getObjects")
            assert opts.get("load_images") is True, "without load_images, listChildren queries again"
            wells = []
            for row, column, images in self.server.plates[opts["plate"]]:
                well = WellI(self.server._id(), True)
                well.setRow(rint(row))
                well.setColumn(rint(column))
                for iid in images:
                    sample = WellSampleI(self.server._id(), True)
                    sample.setImage(copy.deepcopy(self.server.images[iid]))
                    well.addWellSample(sample)
                wells.append(WellWrapper(self, well))
            return wells
        if obj_type == "Plate":
            self.check("getObjects")
            return [PlateWrapper(self, PlateI(p, True)) for p in self.server.screens[opts["screen"]]]
        return super().getObjects(obj_type, opts)

    def _write_group(self, ctx) -> int:
        group = _group(ctx)
        if group < 0:
            raise omero.SecurityViolation(message="cannot write with omero.group=-1: pick the object's group")
        return group

    def saveAndReturnObject(self, obj, ctx=None):
        self.check("save")
        group = self._write_group(ctx)
        stored = copy.deepcopy(obj)
        stored.setId(self.server._id())
        stored.getDetails().setGroup(ExperimenterGroupI(group, False))
        if isinstance(stored, OriginalFileI):
            self.server.files[stored.getId().val] = stored
        elif isinstance(stored, FileAnnotationI):
            self.server.annotations[stored.getId().val] = stored
        else:
            raise AssertionError(f"saveAndReturnObject({type(obj).__name__}) is not a call the script makes")
        return copy.deepcopy(stored)

    def createRawFileStore(self):
        return _RawFileStore(self)

    def saveObject(self, link, ctx=None):
        self.check("save")
        group = self._write_group(ctx)
        parent, child = link.getParent(), link.getChild()
        kind = type(parent).__name__[:-1]
        pid, aid = unwrap(parent.getId()), unwrap(child.getId())
        if kind == "Image":
            parent_group = self.server.images[pid].getDetails().getGroup().getId().val
        else:
            parent_group = self.server.container_groups.get((kind, pid), GROUP)
        ann = self.server.annotations.get(aid)
        if ann is None:
            raise omero.ValidationException(message=f"FileAnnotation:{aid} not found")
        if group != parent_group or group != ann.getDetails().getGroup().getId().val:
            raise omero.SecurityViolation(message=f"cannot link {kind}:{pid} and FileAnnotation:{aid} in group {group}")
        self.server.links.append((kind, pid, aid))


class _Grouped:
    """Something in a group, for :meth:`InMemoryOmero.visible`."""

    def __init__(self, group: int):
        self._group = group

    def getDetails(self):
        return self

    def getGroup(self):
        return self

    def getId(self):
        return rlong(self._group)


class ScriptOmero(InMemoryOmero):
    """The server side for the script: also files, annotations and links, and the group of each container."""

    def __init__(self, tile_size=(256, 256)):
        super().__init__(tile_size)
        self.files: dict[int, OriginalFileI] = {}
        self.file_bytes: dict[int, bytearray] = {}
        self.annotations: dict[int, FileAnnotationI] = {}
        self.links: list[tuple[str, int, int]] = []
        self.container_groups: dict[tuple[str, int], int] = {}
        self.plates: dict[int, list[tuple[int, int, list[int]]]] = {}  # plate id: [(row, column, image ids)]
        self.screens: dict[int, list[int]] = {}  # screen id: plate ids

    def connect(self) -> ScriptGateway:
        conn = ScriptGateway(self)
        self.connections.append(conn)
        return conn

    def csv_text(self, aid: int) -> str:
        """The uploaded CSV of FileAnnotation ``aid``."""
        fid = unwrap(self.annotations[aid].getFile().getId())
        return bytes(self.file_bytes[fid]).decode("utf-8")
