"""The OMERO connector against an in-memory gateway, with real omero.model objects and real pixels.

No OMERO server can run here, so :class:`InMemoryOmero` (tests/support/omero_memory.py)
stands in for BlitzGateway: it stores real ``omero.model`` objects (``RoiI``, ``PointI``,
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
import omero_env
import pytest
from scipy import ndimage as ndi
from shapely.geometry import Point, Polygon

if reason := omero_env.skip_reason():  # only where omero-py is not installed (and not in CI)
    pytest.skip(reason, allow_module_level=True)
import Ice
import omero  # installed: a broken install is a failure, never a skip
import omero.clients
from omero.model import (
    ImageI,
    MapAnnotationI,
    PointI,
    PolygonI,
    RectangleI,
    RoiI,
)
from omero.rtypes import rdouble, rlong, rstring, unwrap

from bridge.cli import main
from bridge.connectors.omero import gateway as omero_gateway
from bridge.connectors.omero.core import (
    NAMESPACE,
    PointRecord,
    class_stroke,
    parse_description,
    polygon_points,
    polygon_specs,
)
from bridge.connectors.omero.gateway import OmeroRun, connect, image_ids
from bridge.connectors.omero.model import build_roi, records_from_rois
from bridge.errors import BridgeInputError
from bridge.evaluation.watershed import WatershedSegmenter
from bridge.io.imageio import ArrayReader
from bridge.results import Click, NucleusResult
from support.omero_memory import GROUP, OTHER_GROUP, InMemoryOmero, point_roi
from support.omero_shapes import points_to_polygon

# ---------------------------------------------------------------- fixtures


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


def three_clicked_images(monuseg_pair, centres) -> InMemoryOmero:
    """Images 1-3: the same real 400x400 crop, each with one ROI of two Points on nuclei."""
    crop = np.ascontiguousarray(monuseg_pair[0][:400, :400])
    inside = near_origin(centres, 400, 2)
    server = InMemoryOmero()
    for iid in (1, 2, 3):
        server.add_image(iid, crop)
        server.add_rois(iid, [point_roi(*inside)])
    return server


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
    """A run on a new connection to the stand-in (or on a real BlitzGateway)."""
    reports = [] if reports is None else reports
    conn = server.connect() if isinstance(server, InMemoryOmero) else server
    job = OmeroRun(conn, segmenter, report=reports.append, run_id=kw.pop("run_id", "run-test"), **kw)
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
    tiles = server.tiles
    assert {level for _, level, *_ in tiles} == {2}
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
    read = {(z, t) for _, _, z, _, t, *_ in server.tiles}
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
    assert server.saves == [] and server.deletes == [] and server.tiles == []  # no pixels either
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
    server = three_clicked_images(monuseg_pair, centres)
    server.drop = {"save": 2}
    reconnects = []

    def reconnect():
        reconnects.append(1)
        server.drop = {}
        return server.connect()

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
    conn = server.connect()
    assert image_ids(conn, [3, 1, 3]) == [3, 1]
    assert image_ids(conn, dataset=10) == [1, 2]
    assert image_ids(conn, project=20) == [1, 2, 3]
    assert str(conn.SERVICE_OPTS.getOmeroGroup()) == "-1"  # looked up in all the user's groups
    with pytest.raises(BridgeInputError, match="dataset 99 not found"):
        image_ids(conn, dataset=99)
    with pytest.raises(BridgeInputError, match="project 98 not found"):
        image_ids(conn, project=98)


# ---------------------------------------------------------------- the stand-in fails as the gateway does


def test_stand_in_copies_groups_shared_store_and_omero_pys_delete(monuseg_pair):
    """What the connector's safety rests on, checked against the stand-in itself."""
    rgb, _ = monuseg_pair
    server = InMemoryOmero()
    server.add_image(1, np.ascontiguousarray(rgb[:300, :300]))
    server.add_image(2, np.ascontiguousarray(rgb[:300, :300]), group=OTHER_GROUP)
    server.add_rois(1, [point_roi((10.0, 10.0))])
    server.add_rois(2, [point_roi((20.0, 20.0))])
    conn = server.connect()

    # lookups respect the group context: -1 sees all of the user's groups, a group only its own
    conn.SERVICE_OPTS.setOmeroGroup(GROUP)
    assert conn.getObject("Image", 2, opts={"load_pixels": True}) is None
    assert conn.getRoiService().findByImage(2, None, conn.SERVICE_OPTS).rois == []
    conn.SERVICE_OPTS.setOmeroGroup(-1)
    assert conn.getObject("Image", 2, opts={"load_pixels": True}).getName() == "slide"
    (found,) = conn.getRoiService().findByImage(2, None, conn.SERVICE_OPTS).rois
    # writes need the image's own group
    roi = RoiI()
    roi.setImage(ImageI(1, False))
    roi.addShape(PolygonI())
    for group in (-1, OTHER_GROUP):
        conn.SERVICE_OPTS.setOmeroGroup(group)
        with pytest.raises(omero.SecurityViolation):
            conn.getUpdateService().saveAndReturnArray([roi], conn.SERVICE_OPTS)
    conn.SERVICE_OPTS.setOmeroGroup(GROUP)
    (saved,) = conn.getUpdateService().saveAndReturnArray([roi], conn.SERVICE_OPTS)

    # objects come back as copies: the caller's stay unsaved, editing a copy changes nothing stored
    assert roi.getId() is None and unwrap(saved.getId()) is not None
    found.setDescription(rstring("edited locally"))
    saved.setDescription(rstring("edited locally"))
    assert all(unwrap(r.getDescription()) is None for rois in server.rois.values() for r in rois)

    # one RawPixelsStore per connection: a second reader re-points the first; after close() it knows no pixels
    store = conn.createRawPixelsStore()
    assert conn.createRawPixelsStore() is store
    with pytest.raises(omero.SecurityViolation):
        store.setPixelsId(502, False, conn.SERVICE_OPTS)  # image 2's pixels, from image 1's group
    store.setPixelsId(501, False, conn.SERVICE_OPTS)
    store.close()
    with pytest.raises(omero.ApiUsageException):
        store.getTile(0, 0, 0, 0, 0, 8, 8)

    # deleteObjects is omero-py's: wait=True raises omero.CmdError (not an Ice error) when the server refuses
    server.delete_mode = ("refuse", "not permitted to delete ome.model.roi.Roi")
    with pytest.raises(omero.CmdError) as refused:
        conn.deleteObjects("Roi", [unwrap(saved.getId())], deleteAnns=True, deleteChildren=True, wait=True)
    assert not isinstance(refused.value, Ice.Exception)
    assert refused.value.err.message == "not permitted to delete ome.model.roi.Roi"
    assert len(server.rois[1]) == 2
    # a delete in another group's context deletes nothing (the server's filter hides the ROI)
    server.delete_mode = "now"
    conn.SERVICE_OPTS.setOmeroGroup(OTHER_GROUP)
    conn.deleteObjects("Roi", [unwrap(saved.getId())], deleteAnns=True, deleteChildren=True, wait=True)
    assert len(server.rois[1]) == 2 and server.deletes == [[]]


def test_images_of_several_groups_are_read_and_written_in_their_own_group(monuseg_pair, centres, segmenter):
    rgb, _ = monuseg_pair
    crop = np.ascontiguousarray(rgb[:400, :400])
    inside = near_origin(centres, 400, 2)
    server = InMemoryOmero()
    server.add_image(1, crop, group=OTHER_GROUP)
    server.add_image(2, crop)
    for iid in (1, 2):
        server.add_rois(iid, [point_roi(*inside)])
    summary, _ = run(server, segmenter, ids=[1, 2])
    assert summary.images_ok == 2 and summary.errors == []
    assert len(server.ours(1)) == len(server.ours(2)) == summary.written / 2 >= 1
    assert {pid for pid, *_ in server.tiles} == {501, 502}


# ---------------------------------------------------------------- every image fully written or untouched


@pytest.fixture
def replaced_server(small_server, segmenter):
    """The small image after a first run ("run-1"): one ROI of ours per nucleus found."""
    server, _ = small_server
    first, _ = run(server, segmenter, run_id="run-1")
    assert first.written >= 3 and set(map(tuple, server.runs_by_point(1).values())) == {("run-1",)}
    return server, first.written


def test_replace_saves_the_new_rois_before_deleting_the_old(replaced_server, segmenter):
    server, n = replaced_server
    before = {unwrap(r.getId()) for r in server.ours(1)}
    server.refuse = {"save": "no permission to annotate"}
    summary, reports = run(server, segmenter, run_id="run-2", replace=True)
    assert summary.images_failed == 1 and summary.written == 0 and summary.deleted == 0
    assert {unwrap(r.getId()) for r in server.ours(1)} == before and server.deletes == []  # untouched
    (error,) = summary.errors
    assert error == (
        "image 1: the server refused: SecurityViolation: no permission to annotate; none of its new ROIs were "
        f"saved, unless the server committed all of them before the error; its {n} earlier ROI(s) of ours are "
        "untouched"
    )
    assert f"error: {error}" in reports

    # the reply to a committed save is lost: the new ROIs are there, the old ones too; the next run cleans up
    server.refuse = {}
    server.lose_reply = {"save": 1}
    lost, _ = run(server, segmenter, run_id="run-3", replace=True)
    assert lost.images_failed == 1 and "connection to the server lost (ConnectionLostException)" in lost.errors[0]
    assert server.deletes == [] and set(map(tuple, server.runs_by_point(1).values())) == {("run-1", "run-3")}
    server.lose_reply = {}
    clean, reports = run(server, segmenter, run_id="run-4")
    assert clean.images_ok == 1 and clean.written == 0 and clean.already_done == n and clean.deleted == n
    assert set(map(tuple, server.runs_by_point(1).values())) == {("run-3",)}  # the newest kept, once
    assert any(f"deleted {n} leftover(s) of an interrupted earlier run" in r for r in reports)


def test_refused_delete_leaves_both_marked_and_the_next_run_cleans_up(replaced_server, segmenter):
    server, n = replaced_server
    server.delete_mode = ("refuse", "not permitted to delete ome.model.roi.Roi")
    summary, reports = run(server, segmenter, run_id="run-2", replace=True)
    assert summary.images_failed == 1 and summary.written == n and f"error: {summary.errors[0]}" in reports
    assert summary.deleted == 0 and summary.not_deleted == n
    (error,) = summary.errors
    assert error == (
        "image 1: the server refused to delete them (ome.services.graphs.GraphException: not permitted to delete "
        f"ome.model.roi.Roi); its {n} new ROI(s) are saved and its {n} earlier ROI(s) of ours may still be there: "
        "the next run deletes what is left"
    )
    assert all(h.closed for h in server.handles)
    # both are there, each marked with its run; every point still has its nucleus
    assert set(map(tuple, server.runs_by_point(1).values())) == {("run-1", "run-2")}

    server.delete_mode = "now"
    clean, _ = run(server, segmenter, run_id="run-3")
    assert clean.images_ok == 1 and clean.deleted == n and clean.written == 0 and clean.already_done == n
    assert set(map(tuple, server.runs_by_point(1).values())) == {("run-2",)}
    again, _ = run(server, segmenter, run_id="run-4")
    assert again.deleted == 0 and server.deletes[-1] != [] and len(server.deletes) == 1


def test_delete_is_waited_for_within_the_timeout_and_a_time_out_is_reported(monuseg_pair, centres, segmenter):
    rgb, _ = monuseg_pair
    crop = np.ascontiguousarray(rgb[:400, :400])
    inside = near_origin(centres, 400, 2)
    server = InMemoryOmero()
    for iid in (1, 2):
        server.add_image(iid, crop)
        server.add_rois(iid, [point_roi(*inside)])
    first, _ = run(server, segmenter, ids=[1, 2], run_id="run-1")
    n = first.written // 2
    assert n >= 1

    # the server finishes the delete after a while and says so through the callback: the run waits for it
    server.delete_mode = ("after", 0.6)
    waited, _ = run(server, segmenter, ids=[1], run_id="run-2", replace=True, delete_timeout=5)
    assert waited.images_ok == 1 and waited.deleted == n and waited.errors == []
    assert server.runs_by_point(1) and set(map(tuple, server.runs_by_point(1).values())) == {("run-2",)}

    # it never finishes: image 1 is reported after the timeout, and the run goes on to image 2
    server.delete_mode = "never"
    timed_out, _ = run(server, segmenter, ids=[1, 2], run_id="run-3", replace=True, delete_timeout=0.4)
    assert timed_out.images == 2 and timed_out.images_failed == 2 and timed_out.written == 2 * n
    assert timed_out.deleted == 0 and timed_out.not_deleted == 2 * n
    assert timed_out.errors[0].startswith("image 1: the server did not finish deleting within 0.4 s; its ")
    assert timed_out.errors[1].startswith("image 2: the server did not finish deleting within 0.4 s; its ")
    assert f"{2 * n} left to delete on the next run" in timed_out.line()
    server.delete_mode = "now"
    clean, _ = run(server, segmenter, ids=[1, 2], run_id="run-4")
    assert clean.deleted == 2 * n and set(map(tuple, server.runs_by_point(2).values())) == {("run-3",)}


def test_delete_rois_checks_what_the_server_says_it_deleted(replaced_server):
    """An OK response that does not list every ROI (here: the delete ran in another group's context,
    whose filter hides them) is not taken for a delete; the handle and the callback are closed either way."""
    server, n = replaced_server
    ids = sorted(unwrap(r.getId()) for r in server.ours(1))
    conn = server.connect()
    conn.SERVICE_OPTS.setOmeroGroup(OTHER_GROUP)
    with pytest.raises(omero_gateway.DeleteIncomplete) as err:
        omero_gateway.delete_rois(conn, ids, timeout_s=5)
    assert str(err.value) == f"the server deleted 0 of {n}; not deleted: {', '.join(map(str, ids))}"
    assert len(server.ours(1)) == n and all(h.closed for h in server.handles)
    conn.SERVICE_OPTS.setOmeroGroup(GROUP)
    omero_gateway.delete_rois(conn, ids, timeout_s=5)
    assert server.ours(1) == [] and server.deletes == [[], ids]


class _FailsOn:
    """The real watershed segmenter, failing with ``error`` on the pixels of one image."""

    def __init__(self, pixels_id: int, error: BaseException):
        self.inner = WatershedSegmenter()
        self.pixels_id = pixels_id
        self.error = error

    def segment_tiled(self, reader, clicks, **kw):
        if reader.store.pixels_id == self.pixels_id:
            raise self.error
        return self.inner.segment_tiled(reader, clicks, **kw)


def test_any_error_in_one_image_is_reported_and_the_run_goes_on(monuseg_pair, centres):
    server = three_clicked_images(monuseg_pair, centres)
    summary, reports = run(server, _FailsOn(502, MemoryError("out of memory in the model")), ids=[1, 2, 3])
    assert "error: image 2: MemoryError: out of memory in the model; nothing was written" in reports
    assert summary.images_ok == 2 and summary.images_failed == 1
    assert summary.errors == ["image 2: MemoryError: out of memory in the model; nothing was written"]
    assert server.ours(2) == [] and len(server.ours(1)) == len(server.ours(3)) >= 1
    summary, _ = run(server, _FailsOn(503, KeyError("a bug")), ids=[3], replace=True)
    assert summary.errors == ["image 3: KeyError: 'a bug'; nothing was written"] and len(server.ours(3)) >= 1


def test_command_exit_status_summary_and_sessions(small_server, monkeypatch, capsys):
    server, inside = small_server
    server.add_image(7, np.zeros((64, 64, 3), np.uint8), name="no points")
    monkeypatch.setenv("NB_OMERO_PW", "pa55word")
    monkeypatch.setenv("NB_OMERO_KEY", "0f0f-session")
    monkeypatch.setattr(omero_gateway, "connect", lambda *a, **kw: server.connect())
    argv = ["omero", "--host", "omero.lab", "--user", "alice", "--password-env", "NB_OMERO_PW", "--image"]

    # nothing could be done: no image has points; the summary is still printed, the error is one line
    assert main([*argv, "7", "--method", "watershed"]) == 2
    out, err = capsys.readouterr()
    assert json.loads(out)["images_without_points"] == 1
    assert err.strip().splitlines()[-1] == (
        "nuclick-bridge omero: error: no Point ROIs found in 1 image(s); place one Point per nucleus "
        "(OMERO.iviewer's point tool; its text is the class)"
    )

    # the server drops mid-run: the command logs in again, goes on, and closes both sessions
    server.add_image(2, server.pixels[501][(0, 0)][-1])
    server.add_rois(2, [point_roi(*inside)])
    server.connections.clear()
    server.drop = {"findByImage": 1}

    def login(*args, **kwargs):
        if server.connections:  # the second login: the server is back
            server.drop = {}
        return server.connect()

    monkeypatch.setattr(omero_gateway, "connect", login)
    assert main([*argv, "1", "2", "--method", "watershed"]) == 0  # image 1 failed, image 2 was written
    out, err = capsys.readouterr()
    assert json.loads(out)["images_failed"] == 1 and json.loads(out)["written"] >= 1
    assert "reconnected to the server" in err
    assert [c.closed for c in server.connections] == ["hard", "hard"]

    # a joined session (--session-key-env) is the user's: detached, never killed, also after a drop
    server.connections.clear()
    server.drop = {"findByImage": 1}
    key = ["omero", "--host", "omero.lab", "--session-key-env", "NB_OMERO_KEY", "--image", "1", "2", "--dry-run"]
    assert main(key) == 0
    assert "reconnected to the server" in capsys.readouterr().err
    assert [c.closed for c in server.connections] == ["soft", "soft"]

    # interrupted (Ctrl-C in the model): the summary so far is printed all the same
    monkeypatch.setattr("bridge.commands.common.make_segmenter", lambda args: _FailsOn(502, KeyboardInterrupt()))
    assert main([*argv, "1", "2", "--replace"]) == 130
    out, err = capsys.readouterr()
    summary = json.loads(out)
    assert summary["images"] == 2 and summary["images_ok"] == 1 and summary["written"] >= 1
    assert "interrupted" in err


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


def test_command_classes(small_server, monkeypatch, capsys):
    server, inside = small_server  # every point is "Tumor"
    monkeypatch.setenv("NB_OMERO_PW", "pa55word")
    monkeypatch.setattr(omero_gateway, "connect", lambda *a, **kw: server.connect())
    argv = ["omero", "--host", "h", "--user", "alice", "--password-env", "NB_OMERO_PW", "--image", "1"]
    assert main([*argv, "--method", "watershed", "--classes", "Stroma", "Immune"]) == 2
    out, err = capsys.readouterr()
    assert json.loads(out)["other_class"] == len(inside) and server.saves == []
    assert err.strip().splitlines()[-1] == (
        f"nuclick-bridge omero: error: none of the {len(inside)} point(s) found has one of the classes asked for"
    )
    assert main([*argv, "--method", "watershed", "--classes", "tumor"]) == 0
    assert json.loads(capsys.readouterr()[0])["written"] == len(server.ours(1)) >= 1


def test_command_end_to_end(small_server, monkeypatch, capsys):
    server, inside = small_server
    monkeypatch.setenv("NB_OMERO_PW", "pa55word")
    calls = []

    def fake_connect(host, user, password, port, session_key, secure):
        calls.append((host, user, port, session_key, secure))
        assert password == "pa55word"
        return server.connect()

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
    assert "polygon ROI(s) written" in err and all(c.closed == "hard" for c in server.connections)
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
    conn = omero_env.connect_real_server()
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
            omero_gateway.delete_rois(conn, [r.roi_id for r in plan.delete], timeout_s=60)
    finally:
        conn.close()
