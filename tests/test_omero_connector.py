"""The OMERO connector against an in-memory gateway, with real omero.model objects and real pixels.

No OMERO server can run here, so :class:`InMemoryOmero` stands in for
BlitzGateway: it stores real ``omero.model`` objects (``RoiI``, ``PointI``,
``PolygonI``, ``ImageI``, rtypes), serves raw tiles of a real MoNuSeg image
through a RawPixelsStore double, and keeps what is saved.  The segmenter is
the real watershed baseline (no weights).  A test against a real server runs
when OMERO_HOST, OMERO_USER and OMERO_PASSWORD are set (``-m omero``).
"""

from __future__ import annotations

import json
import os
from typing import ClassVar

import numpy as np
import pytest
from scipy import ndimage as ndi
from shapely.geometry import Point, Polygon

if os.environ.get("CI"):
    import omero  # CI installs omero-py ('make install-omero'): a missing one is a failure, not a skip
else:
    omero = pytest.importorskip("omero", reason="omero-py is not installed: run 'make install-omero'")

import Ice
from omero.gateway import DatasetWrapper, ImageWrapper, ProjectWrapper, ServiceOptsDict
from omero.model import (
    DatasetI,
    ExperimenterGroupI,
    ImageI,
    MapAnnotationI,
    PixelsI,
    PixelsTypeI,
    PointI,
    PolygonI,
    ProjectI,
    RectangleI,
    RoiI,
)
from omero.rtypes import rdouble, rint, rlong, rstring, unwrap
from test_omero_pixels import TileStore, make_pyramid

from bridge.cli import main
from bridge.connectors import omero_gateway
from bridge.connectors.omero_core import (
    NAMESPACE,
    PointRecord,
    class_stroke,
    parse_description,
    points_to_polygon,
    polygon_points,
    polygon_specs,
)
from bridge.connectors.omero_gateway import OmeroRun, connect, image_ids
from bridge.connectors.omero_model import build_roi, records_from_rois
from bridge.errors import BridgeInputError
from bridge.imageio import ArrayReader
from bridge.results import Click, NucleusResult
from bridge.watershed import WatershedSegmenter

GROUP = 53

# ---------------------------------------------------------------- the gateway double


class _Store(TileStore):
    def __init__(self, server: InMemoryOmero):
        super().__init__({}, tile=server.tile_size)
        self.server = server

    def setPixelsId(self, pid, bypass, ctx=None):
        self.server.check_group(ctx)
        self.planes = self.server.pixels[pid]
        self.server.stores.append(self)

    def getTile(self, *args):
        self.server.maybe_drop("getTile")
        return super().getTile(*args)


class InMemoryOmero:
    """A BlitzGateway double: exactly the calls the connector makes, nothing else.

    * ``SERVICE_OPTS``: a real ``omero.gateway.ServiceOptsDict`` (``setOmeroGroup``);
    * ``getObject(type, id)`` for Dataset / Project and ``getObject("Image", id,
      opts={"load_pixels": True})``: real omero.gateway wrappers around the stored
      model objects, or None;
    * ``getObjects("Image", opts={"dataset": id})``, ``getObjects("Dataset", opts={"project": id})``;
    * ``getRoiService().findByImage(image_id, None, ctx)`` -> ``omero.api.RoiResult``;
    * ``createRawPixelsStore()`` -> a RawPixelsStore serving tiles of in-memory pyramids
      (``setPixelsId``, ``getResolutionLevels``, ``setResolutionLevel``,
      ``getResolutionDescriptions``, ``getTileSize``, ``getTile``, ``close``);
    * ``getUpdateService().saveAndReturnArray(objects, ctx)``: gives ids, keeps the ROIs;
    * ``deleteObjects("Roi", ids, deleteAnns=True, deleteChildren=True, wait=True)``;
    * ``keepAlive()``, ``close()``.

    ``drop = {"save"|"findByImage"|"getTile": image id or True}`` makes that call
    raise ``Ice.ConnectionLostException`` (the server dropping mid-run);
    ``refuse = {"save": message}`` makes it raise ``omero.SecurityViolation``.
    """

    def __init__(self, tile_size=(256, 256)):
        self.SERVICE_OPTS = ServiceOptsDict()
        self.tile_size = tile_size
        self.images: dict[int, ImageI] = {}
        self.pixels: dict[int, dict[tuple[int, int], list[np.ndarray]]] = {}
        self.rois: dict[int, list[RoiI]] = {}
        self.datasets: dict[int, list[int]] = {}
        self.projects: dict[int, list[int]] = {}
        self.saves: list[list[RoiI]] = []
        self.deletes: list[list[int]] = []
        self.stores: list[_Store] = []
        self.drop: dict[str, object] = {}
        self.refuse: dict[str, str] = {}  # call -> message of an omero.SecurityViolation it raises
        self.alive = True
        self.closed = False
        self._next_id = 1000
        self._current_image: int | None = None

    # -- set-up helpers (not part of the gateway)

    def add_image(self, iid, planes, name="slide", size_c=3, ptype="uint8", levels=1):
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
        img.getDetails().setGroup(ExperimenterGroupI(GROUP, False))
        self.images[iid] = img
        self.pixels[pid] = {k: make_pyramid(v, levels) for k, v in planes.items()}
        self.rois.setdefault(iid, [])
        return img

    def add_rois(self, iid, rois):
        for roi in rois:
            roi.setImage(ImageI(iid, False))
        self._store_rois(rois)

    def _id(self):
        self._next_id += 1
        return rlong(self._next_id)

    def _store_rois(self, rois):
        for roi in rois:
            roi.setId(self._id())
            for shape in roi.copyShapes():
                shape.setId(self._id())
            for link in roi.copyAnnotationLinks():
                link.setId(self._id())
                link.getChild().setId(self._id())
            self.rois[unwrap(roi.getImage().getId())].append(roi)

    def maybe_drop(self, call, iid=None):
        target = self.drop.get(call)
        if target is True or (target is not None and target == iid):
            self.alive = False
            raise Ice.ConnectionLostException()
        if call in self.refuse:
            raise omero.SecurityViolation(message=self.refuse[call])

    def check_group(self, ctx):
        # reads and writes must run in the image's group, not "all groups" (-1)
        assert ctx is not None and str(ctx.getOmeroGroup()) == str(GROUP), ctx

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
        return [r for r in self.rois[iid] if parse_description(unwrap(r.getDescription()))]

    # -- the gateway calls

    def getObject(self, obj_type, oid, opts=None):
        if obj_type == "Image":
            assert opts == {"load_pixels": True}  # else the wrapper would query again for the pixels
            img = self.images.get(oid)
            return None if img is None else ImageWrapper(self, img)
        if obj_type == "Dataset":
            return DatasetWrapper(self, DatasetI(oid, True)) if oid in self.datasets else None
        if obj_type == "Project":
            return ProjectWrapper(self, ProjectI(oid, True)) if oid in self.projects else None
        raise AssertionError(f"getObject({obj_type!r}) is not a call the connector makes")

    def getObjects(self, obj_type, opts):
        if obj_type == "Image":
            return [ImageWrapper(self, self.images[i]) for i in self.datasets[opts["dataset"]]]
        if obj_type == "Dataset":
            return [DatasetWrapper(self, DatasetI(d, True)) for d in self.projects[opts["project"]]]
        raise AssertionError(f"getObjects({obj_type!r}) is not a call the connector makes")

    def getRoiService(self):
        return self

    def findByImage(self, image_id, options, ctx):
        self.check_group(ctx)
        self.maybe_drop("findByImage", image_id)
        return omero.api.RoiResult(rois=list(self.rois.get(image_id, [])))

    def createRawPixelsStore(self):
        return _Store(self)

    def getUpdateService(self):
        return self

    def saveAndReturnArray(self, objects, ctx):
        self.check_group(ctx)
        assert all(isinstance(o, RoiI) for o in objects)
        image_ids = {unwrap(o.getImage().getId()) for o in objects}
        assert len(image_ids) == 1, "one batch per image"
        self.maybe_drop("save", next(iter(image_ids)))
        self._store_rois(objects)
        self.saves.append(list(objects))
        return list(objects)

    def deleteObjects(self, graph, ids, deleteAnns=False, deleteChildren=False, wait=False):
        assert graph == "Roi" and isinstance(ids, list) and deleteAnns and deleteChildren and wait
        self.maybe_drop("delete")
        ids = set(ids)
        for iid in self.rois:
            self.rois[iid] = [r for r in self.rois[iid] if unwrap(r.getId()) not in ids]
        self.deletes.append(sorted(ids))

    def keepAlive(self):
        return self.alive

    def close(self):
        self.closed = True


# ---------------------------------------------------------------- fixtures


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


@pytest.fixture(scope="module")
def centres(monuseg_pair):
    """Centres (x, y) of the real nuclei, in continuous coordinates."""
    _, lab = monuseg_pair
    ids = np.unique(lab)[1:]
    com = ndi.center_of_mass(lab > 0, lab, ids)
    return [(c + 0.5, r + 0.5) for i, (r, c) in zip(ids, com, strict=True) if lab[int(r), int(c)] == i]


@pytest.fixture(scope="module")
def nuclei(centres):
    """14 of them, spread over the image."""
    rng = np.random.default_rng(0)
    return [centres[k] for k in rng.choice(len(centres), 14, replace=False)]


def near_origin(centres, size, n):
    """n nuclei well inside the size x size top-left corner, spread out."""
    inside = [(x, y) for x, y in centres if 20 < x < size - 20 and 20 < y < size - 20]
    return inside[:: max(1, len(inside) // n)][:n]


@pytest.fixture(scope="module")
def segmenter():
    return WatershedSegmenter()


def expected_points(segmenter, rgb, xys):
    """The polygon strings the same segmenter gives with the whole image in memory."""
    seg = segmenter.segment_tiled(ArrayReader(rgb), [Click(x, y, str(k)) for k, (x, y) in enumerate(xys)])
    return [polygon_points(r.polygon) if r.found else None for r in seg.results]


def saved_polygons(server, iid):
    """{source point id: (PolygonI, RoiI)} of our ROIs on an image."""
    out = {}
    for roi in server.ours(iid):
        (shape,) = roi.copyShapes()
        assert isinstance(shape, PolygonI)
        out[int(parse_description(unwrap(roi.getDescription()))[0])] = (shape, roi)
    return out


def run(server, segmenter=None, ids=(1,), reports=None, **kw):
    reports = [] if reports is None else reports
    job = OmeroRun(server, segmenter, report=reports.append, run_id=kw.pop("run_id", "run-test"), **kw)
    return job.run(list(ids)), reports


# ---------------------------------------------------------------- clicks from points


def test_clicks_from_points_keep_plane_and_class():
    rois = [
        point_roi((10.5, 20.5, 0, 1, "Tumor"), (30, 40, 1, 0, " Stroma ")),  # two points in one ROI
        point_roi((5, 6)),  # no plane, no class
        point_roi((7, 8, None, None, "")),  # empty class
    ]
    rect = RoiI()
    rect.addShape(RectangleI())
    rois.append(rect)
    server = InMemoryOmero()
    server.add_image(1, np.zeros((64, 64, 3), np.uint8))
    server.add_rois(1, rois)
    points, ours = records_from_rois(server.rois[1])
    assert ours == []
    got = [(p.x, p.y, p.z, p.t, p.class_name) for p in points]
    assert got == [
        (10.5, 20.5, 0, 1, "Tumor"),
        (30, 40, 1, 0, "Stroma"),
        (5, 6, None, None, None),
        (7, 8, None, None, None),
    ]
    assert [p.roi_id for p in points[:2]] == [unwrap(rois[0].getId())] * 2
    assert points[0].click() == Click(10.5, 20.5, str(points[0].shape_id), "Tumor")


def test_build_roi_is_one_polygon_with_marker():
    p = PointRecord(shape_id=77, roi_id=7, x=12.5, y=30.25, z=1, t=2, class_name="Tumor")
    poly = Polygon([(10, 28), (15, 28), (15, 33), (10, 33)])
    (spec,), _ = polygon_specs([p], [NucleusResult(p.click(), True, poly, 25.0, 0.8)], "r9")
    roi = build_roi(spec, 5)
    assert unwrap(roi.getImage().getId()) == 5
    (shape,) = roi.copyShapes()
    assert isinstance(shape, PolygonI)
    assert unwrap(shape.getPoints()) == "10,28 15,28 15,33 10,33"
    assert (unwrap(shape.getTheZ()), unwrap(shape.getTheT()), unwrap(shape.getTextValue())) == (1, 2, "Tumor")
    assert unwrap(shape.getStrokeColor()) == class_stroke("Tumor")
    assert parse_description(unwrap(roi.getDescription())) == ("77", "r9")
    (link,) = roi.copyAnnotationLinks()
    ann = link.getChild()
    assert isinstance(ann, MapAnnotationI) and unwrap(ann.getNs()) == NAMESPACE
    kv = {nv.name: nv.value for nv in ann.getMapValue()}
    assert kv["source_point_id"] == "77" and kv["source_roi_id"] == "7" and kv["run_id"] == "r9"


# ---------------------------------------------------------------- pixels and polygons


def test_run_writes_one_polygon_per_nucleus_from_tiles(monuseg_pair, nuclei, segmenter):
    rgb, _ = monuseg_pair
    server = InMemoryOmero(tile_size=(256, 192))
    server.add_image(1, rgb, levels=3)  # a pyramid: the full-resolution level is index 2
    classes = ["Tumor", None, "Immune cells"]
    user = [point_roi((x, y, None, None, classes[k % 3])) for k, (x, y) in enumerate(nuclei)]
    server.add_rois(1, user)
    before = server.user_snapshot()

    summary, reports = run(server, segmenter)

    assert summary.images_ok == 1 and summary.images_failed == 0
    assert len(server.saves) == 1  # one batch for the image
    expected = expected_points(segmenter, rgb, nuclei)
    assert summary.written == sum(e is not None for e in expected) >= len(nuclei) - 2
    assert summary.written + summary.not_found == len(nuclei)
    polys = saved_polygons(server, 1)
    for k, roi in enumerate(user):
        (pt,) = roi.copyShapes()
        sid = unwrap(pt.getId())
        if expected[k] is None:
            assert sid not in polys
            continue
        shape, our_roi = polys[sid]
        # the same polygon as with the whole image in memory: tiles, edges and pyramid level are right
        assert unwrap(shape.getPoints()) == expected[k]
        assert points_to_polygon(unwrap(shape.getPoints())).buffer(1).contains(Point(*nuclei[k]))
        assert unwrap(shape.getTextValue()) == classes[k % 3]
        assert unwrap(shape.getStrokeColor()) == class_stroke(classes[k % 3])
        assert unwrap(shape.getTheZ()) is None and unwrap(shape.getTheT()) is None
        assert unwrap(our_roi.getImage().getId()) == 1
    assert server.user_snapshot() == before  # the user's ROIs are untouched
    # only tiles around the clicks were fetched, each at most once, all at full resolution
    tiles = [c for s in server.stores for c in s.calls]
    assert all(s.level == 2 for s in server.stores)
    assert len(tiles) == len(set(tiles))
    assert all(w <= 256 and h <= 192 for *_, w, h in tiles)
    assert any("wrote" in r for r in reports)


def test_multi_plane_points_read_their_own_plane(monuseg_pair, nuclei, segmenter):
    rgb, _ = monuseg_pair
    shifted = np.ascontiguousarray(np.roll(rgb, (37, -53), axis=(0, 1)))
    server = InMemoryOmero()
    server.add_image(2, {(0, 0): rgb, (1, 0): np.zeros_like(rgb), (0, 1): shifted, (1, 1): np.zeros_like(rgb)})
    a = nuclei[:3]
    b = [((x - 53) % 1000, (y + 37) % 1000) for x, y in nuclei[3:6]]  # the same nuclei, moved with the plane
    server.add_rois(2, [point_roi(*[(x, y, 0, 0, "A") for x, y in a]), point_roi(*[(x, y, 0, 1, "B") for x, y in b])])

    summary, _ = run(server, segmenter, ids=[2])

    assert summary.images_ok == 1 and len(server.saves) == 1
    read = {(z, t) for s in server.stores for z, _, t, *_ in s.calls}
    assert read == {(0, 0), (0, 1)}  # only the planes that have points
    got = {}
    for shape, _ in saved_polygons(server, 2).values():
        got.setdefault((unwrap(shape.getTheZ()), unwrap(shape.getTheT()), unwrap(shape.getTextValue())), []).append(
            unwrap(shape.getPoints())
        )
    assert sorted(got[(0, 0, "A")]) == sorted(e for e in expected_points(segmenter, rgb, a) if e)
    assert sorted(got[(0, 1, "B")]) == sorted(e for e in expected_points(segmenter, shifted, b) if e)


# ---------------------------------------------------------------- re-runs, --replace, dry run


@pytest.fixture
def small_server(monuseg_pair, centres):
    rgb, _ = monuseg_pair
    crop = np.ascontiguousarray(rgb[:512, :512])
    inside = near_origin(centres, 512, 4)
    server = InMemoryOmero()
    server.add_image(1, crop)
    server.add_rois(1, [point_roi(*[(x, y, None, None, "Tumor") for x, y in inside])])
    return server, inside


def test_rerun_is_idempotent_and_replace_removes_only_ours(small_server, segmenter):
    server, inside = small_server
    user_before = server.user_snapshot()
    first, _ = run(server, segmenter, run_id="run-1")
    n = first.written
    assert n >= 3 and len(server.ours(1)) == n

    again, reports = run(server, segmenter, run_id="run-2")
    assert again.written == 0 and again.already_done == n and len(server.saves) == 1  # nothing saved
    assert len(server.ours(1)) == n and any("already done" in r for r in reports)

    # a new point is segmented alone on the next run
    server.add_rois(1, [point_roi((inside[0][0] + 0.0, inside[0][1] + 0.0, None, None, "Other"))])
    more, _ = run(server, segmenter, run_id="run-3")
    assert more.already_done == n and more.written + more.not_found == 1

    # someone adds a point to one of our ROIs: --replace leaves that ROI alone
    edited = server.ours(1)[0]
    edited_id = unwrap(edited.getId())
    extra = PointI()
    extra.setX(rdouble(1.0))
    extra.setY(rdouble(1.0))
    edited.addShape(extra)
    extra.setId(rlong(99999))
    ours_before = {unwrap(r.getId()) for r in server.ours(1)}
    user_before = server.user_snapshot()

    replaced, _ = run(server, segmenter, run_id="run-4", replace=True)
    assert replaced.images_ok == 1
    (deleted,) = server.deletes
    assert set(deleted) == ours_before - {edited_id}  # only our pure polygon ROIs
    assert edited_id in {unwrap(r.getId()) for r in server.rois[1]}
    assert server.user_snapshot() == user_before
    runs = {parse_description(unwrap(r.getDescription()))[1] for r in server.ours(1) if unwrap(r.getId()) != edited_id}
    assert runs == {"run-4"}


def test_dry_run_plans_and_writes_nothing(small_server, segmenter):
    server, inside = small_server
    server.add_rois(1, [point_roi((600.0, 10.0))])  # off the 512 x 512 image
    summary, reports = run(server, None, dry_run=True)
    assert summary.dry_run and summary.to_segment == len(inside) and summary.invalid == 1
    assert server.saves == [] and server.deletes == [] and server.stores == []  # no pixels either
    (plan,) = [r for r in reports if r.startswith("plan: ")]
    assert f"to segment {len(inside)}" in plan and "(512 x 512" in plan
    assert any("outside the image" in r for r in reports)
    assert summary.line().startswith("dry run: ")


# ---------------------------------------------------------------- bad input


def test_bad_images_are_reported_and_the_run_goes_on(monuseg_pair, centres, segmenter):
    rgb, _ = monuseg_pair
    crop = np.ascontiguousarray(rgb[:400, :400])
    inside = near_origin(centres, 400, 2)
    server = InMemoryOmero()
    server.add_image(1, np.zeros((64, 64, 3), np.uint8), name="no points")
    server.add_image(2, np.zeros((64, 64, 3), np.uint8), name="fluo", size_c=1, ptype="uint16")
    server.add_rois(2, [point_roi((5, 5))])
    server.add_image(3, crop, name="good")
    server.add_rois(3, [point_roi(*inside, (450.0, 20.0), (-1.0, 5.0))])  # two points off the image

    summary, reports = run(server, segmenter, ids=[1, 404, 2, 3])

    text = "\n".join(reports)
    assert "image 1 'no points': no Point ROIs" in text
    assert "image 404 not found" in text
    assert "image 2 'fluo' has uint16 pixels and 1 channel(s); NuClick needs 8-bit RGB" in text
    assert text.count("outside the image (400 x 400)") == 2
    assert summary.images == 4 and summary.images_failed == 2 and summary.images_ok == 2
    assert summary.images_without_points == 1 and summary.invalid == 2
    assert summary.written >= 1 and {unwrap(r.getImage().getId()) for s in server.saves for r in s} == {3}


def test_server_dropping_mid_run_leaves_no_half_written_image(monuseg_pair, centres, segmenter):
    rgb, _ = monuseg_pair
    crop = np.ascontiguousarray(rgb[:400, :400])
    inside = near_origin(centres, 400, 2)
    server = InMemoryOmero()
    for iid in (1, 2, 3):
        server.add_image(iid, crop)
        server.add_rois(iid, [point_roi(*inside)])
    server.drop = {"save": 2}
    reconnects = []

    def reconnect():
        reconnects.append(1)
        server.alive = True
        server.drop = {}
        return server

    summary, reports = run(server, segmenter, ids=[1, 2, 3], reconnect=reconnect)
    assert reconnects == [1] and "reconnected to the server" in reports
    assert summary.images_failed == 1 and summary.images_ok == 2
    assert server.ours(2) == []  # nothing of image 2 was written
    assert len(server.ours(1)) == len(server.ours(3)) >= 1
    assert any("image 2: connection to the server lost" in r for r in reports)

    # the re-run fills in image 2 only
    again, _ = run(server, segmenter, ids=[1, 2, 3])
    assert again.already_done == 2 * len(server.ours(1)) and len(server.ours(2)) == len(server.ours(1))


def test_server_refusing_a_write_is_reported(small_server, segmenter):
    server, _ = small_server
    server.refuse = {"save": "no permission to annotate"}
    summary, reports = run(server, segmenter)
    assert summary.images_failed == 1 and server.ours(1) == []
    assert any("the server refused: SecurityViolation: no permission to annotate" in r for r in reports)


def test_connection_lost_for_good_stops_with_a_list(monuseg_pair, segmenter):
    rgb, _ = monuseg_pair
    server = InMemoryOmero()
    for iid in (1, 2, 3):
        server.add_image(iid, np.ascontiguousarray(rgb[:300, :300]))
        server.add_rois(iid, [point_roi((100.0, 100.0))])
    server.drop = {"findByImage": 1}

    def reconnect():
        raise Ice.ConnectionRefusedException()

    summary, reports = run(server, segmenter, ids=[1, 2, 3], reconnect=reconnect)
    assert summary.images == 3 and summary.images_failed == 3 and server.saves == []
    assert any("2 image(s) not processed: 2, 3" in r for r in reports)


def test_image_ids_from_dataset_and_project():
    server = InMemoryOmero()
    for iid in (1, 2, 3):
        server.add_image(iid, np.zeros((8, 8, 3), np.uint8))
    server.datasets = {10: [1, 2], 11: [2, 3]}
    server.projects = {20: [10, 11]}
    assert image_ids(server, [3, 1, 3]) == [3, 1]
    assert image_ids(server, dataset=10) == [1, 2]
    assert image_ids(server, project=20) == [1, 2, 3]
    assert str(server.SERVICE_OPTS.getOmeroGroup()) == "-1"  # looked up in all the user's groups
    with pytest.raises(BridgeInputError, match="dataset 99 not found"):
        image_ids(server, dataset=99)
    with pytest.raises(BridgeInputError, match="project 98 not found"):
        image_ids(server, project=98)


# ---------------------------------------------------------------- logging in


class _Gateway:
    """BlitzGateway's constructor, connect() and getLastError(), refusing the login."""

    error: Exception = omero.SecurityViolation(message="bad password")
    made: ClassVar[list] = []

    def __init__(self, username=None, passwd=None, host=None, port=None, secure=None):
        _Gateway.made.append({"user": username, "host": host, "port": port, "secure": secure, "pw": passwd})

    def connect(self, sUuid=None):
        return False

    def getLastError(self):
        return self.error

    def close(self):
        pass


def test_connect_errors_never_show_the_secret():
    _Gateway.made = []
    with pytest.raises(BridgeInputError) as err:
        connect("omero.example.org", "alice", "pa55word", gateway_class=_Gateway)
    msg = str(err.value)
    assert "cannot log in" in msg and "'alice'" in msg and "pa55word" not in msg
    assert _Gateway.made[0]["secure"] is True and _Gateway.made[0]["port"] == 4064

    class Unreachable(_Gateway):
        error = Ice.ConnectionRefusedException()

    with pytest.raises(BridgeInputError, match=r"cannot reach the OMERO server at omero\.example\.org:4064"):
        connect("omero.example.org", "alice", "pa55word", gateway_class=Unreachable)
    with pytest.raises(BridgeInputError) as err:
        connect("h", session_key="0f0f-secret-key", gateway_class=_Gateway)
    assert "session key" in str(err.value) and "0f0f" not in str(err.value)
    import logging

    assert logging.getLogger("omero").getEffectiveLevel() >= logging.WARNING  # omero-py logs the session id


def test_patched_zeroc_ice_names_the_calling_function():
    """The Util.cpp fix (PyThreadState_GetFrame) of scripts/build_zeroc_ice.py, exercised."""
    ic = Ice.initialize()
    try:
        for _ in range(3):  # the frame reference is released: no crash on repeated calls
            with pytest.raises(ValueError, match="stringToProxy expects a string"):
                ic.stringToProxy(123)
    finally:
        ic.destroy()


def test_real_blitzgateway_to_a_closed_port():
    """The real omero-py client and Ice stack, against a loopback port nobody listens on."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(BridgeInputError, match=f"cannot reach the OMERO server at 127.0.0.1:{port}"):
        connect("127.0.0.1", "alice", "pa55word", port=port)
    with pytest.raises(BridgeInputError, match="cannot reach") as err:
        connect("127.0.0.1", session_key="0f0f-secret-key", port=port)
    assert "0f0f" not in str(err.value)


def test_command_end_to_end(small_server, monkeypatch, capsys):
    server, inside = small_server
    monkeypatch.setenv("NB_OMERO_PW", "pa55word")
    calls = []

    def fake_connect(host, user, password, port, session_key, secure):
        calls.append((host, user, port, session_key, secure))
        assert password == "pa55word"
        return server

    monkeypatch.setattr(omero_gateway, "connect", fake_connect)
    argv = ["omero", "--host", "omero.lab", "--user", "alice", "--password-env", "NB_OMERO_PW", "--image", "1"]
    assert main([*argv, "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out.strip().splitlines()[-1])["to_segment"] == len(inside)
    assert "dry run:" in err and server.saves == [] and "pa55word" not in out + err

    assert main([*argv, "--method", "watershed"]) == 0
    out, err = capsys.readouterr()
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["written"] == len(server.ours(1)) >= 1 and summary["images_failed"] == 0
    assert "polygon ROI(s) written" in err and server.closed
    assert calls[0] == ("omero.lab", "alice", 4064, None, True)

    assert main([*argv[:-1], "404", "1", "--method", "watershed"]) == 0  # one image failed, one was done
    assert "image 404 not found" in capsys.readouterr().err
    assert main([*argv[:-1], "404", "--method", "watershed"]) == 2  # nothing could be done

    # --server goes to make_segmenter with the other engine flags; its client is closed at the end
    import bridge.commands.common as common

    made = []

    class Remote(WatershedSegmenter):
        def close(self):
            made.append("closed")

    monkeypatch.setattr(common, "make_segmenter", lambda a: made.append(a.server) or Remote())
    assert main([*argv, "--server", "gpu-box:50051", "--replace"]) == 0
    assert made == ["gpu-box:50051", "closed"]


# ---------------------------------------------------------------- a real server


@pytest.mark.omero
@pytest.mark.skipif(
    not all(os.environ.get(k) for k in ("OMERO_HOST", "OMERO_USER", "OMERO_PASSWORD")),
    reason="set OMERO_HOST, OMERO_USER and OMERO_PASSWORD (and OMERO_TEST_IMAGE) to test against a real server",
)
def test_real_server_round_trip(segmenter):
    """Dry run on OMERO_TEST_IMAGE; with OMERO_TEST_WRITE=1 also writes, re-runs (writes nothing),
    then deletes what it wrote (only our ROIs)."""
    conn = connect(
        os.environ["OMERO_HOST"],
        os.environ["OMERO_USER"],
        os.environ["OMERO_PASSWORD"],
        port=int(os.environ.get("OMERO_PORT", "4064")),
    )
    try:
        image = os.environ.get("OMERO_TEST_IMAGE")
        if not image:
            assert conn.keepAlive()
            return
        ids = [int(image)]
        plan, _ = run(conn, None, ids=ids, dry_run=True)
        assert plan.images_failed == 0, plan.errors
        if os.environ.get("OMERO_TEST_WRITE") == "1":
            first, _ = run(conn, segmenter, ids=ids, run_id="nb-integration")
            assert first.images_failed == 0, first.errors
            again, _ = run(conn, segmenter, ids=ids)
            assert again.written == 0
            _, plan = OmeroRun(conn, None, dry_run=True, replace=True).plan(ids[0])
            assert len(plan.delete) == first.written
            conn.deleteObjects("Roi", [r.roi_id for r in plan.delete], deleteAnns=True, deleteChildren=True, wait=True)
    finally:
        conn.close()
