"""The QuPath connector's core, end to end without QuPath: a real pyramidal
tiled TIFF written by tifffile, point annotations in two classes, the real
watershed segmenter, and the stand-in project (the documented stand-in for
the paquo calls, ``support.qupath_memory``, which keeps the project on disk as
QuPath does and fails where QuPath fails)."""

from __future__ import annotations

import copy
import signal
from pathlib import Path

import numpy as np
import pytest
import tifffile
from shapely.geometry import box, shape

from bridge.connectors.qupath.images import OpenSlideReader, open_local_image
from bridge.connectors.qupath.objects import (
    AREA_UM,
    Marker,
    OurNucleus,
    detection_features,
    marker_for,
    our_nuclei,
    parse_marker,
    point_key,
)
from bridge.connectors.qupath.run import RunOptions, export_image, plan_points, run_project
from bridge.connectors.qupath.safe_save import snapshot_path
from bridge.errors import BridgeInputError
from bridge.evaluation.clicks import simulate_clicks
from bridge.evaluation.watershed import WatershedSegmenter
from bridge.io.imageio import ArrayReader
from bridge.nuclick.tiling import plan_tiles
from bridge.results import Click
from support.qupath_memory import JavaException, MemoryEntry, MemoryProject

CLASSES = ("Tumor", "Immune cells")
CALIBRATED = {
    "pixelCalibration": {"pixelWidth": {"value": 0.25, "unit": "µm"}, "pixelHeight": {"value": 0.25, "unit": "µm"}}
}


def write_pyramid(path: Path, image: np.ndarray, tile: int = 128) -> Path:
    with tifffile.TiffWriter(path) as tif:
        tif.write(image, tile=(tile, tile), photometric="rgb", compression="zlib", subifds=1)
        tif.write(image[::2, ::2], tile=(tile, tile), photometric="rgb", compression="zlib", subfiletype=1)
    return path


def point_annotations(xy: np.ndarray, classes=CLASSES) -> list[dict]:
    """One multi-point annotation per class, as QuPath's Points tool makes them."""
    out = []
    for k, cls in enumerate(classes):
        out.append(
            {
                "type": "Feature",
                "id": f"00000000-0000-4000-8000-{k:012d}",
                "geometry": {"type": "MultiPoint", "coordinates": xy[k :: len(classes)].tolist()},
                "properties": {"objectType": "annotation", "classification": {"name": cls}},
            }
        )
    return out


USER_REGION = {
    "type": "Feature",
    "id": "aaaaaaaa-0000-4000-8000-000000000001",
    "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [100, 0], [100, 100], [0, 100], [0, 0]]]},
    "properties": {"objectType": "annotation", "name": "my region", "classification": {"name": "Stroma"}},
}
USER_DETECTION = {
    "type": "Feature",
    "id": "aaaaaaaa-0000-4000-8000-000000000002",
    "geometry": {"type": "Polygon", "coordinates": [[[5, 5], [9, 5], [9, 9], [5, 9], [5, 5]]]},
    "properties": {"objectType": "detection", "name": "Nucleus", "measurements": {"Area px^2": 16.0}},
}


@pytest.fixture(scope="module")
def slide(crop_pair, tmp_path_factory):
    """A 256 x 256 pyramidal tiled TIFF of real H&E and one click per nucleus."""
    img, lab = crop_pair
    path = write_pyramid(tmp_path_factory.mktemp("slide") / "crop.ome.tif", img)
    xy, _ = simulate_clicks(lab, jitter=3, seed=4)
    return path, img, xy


def make_entry(slide, name="crop", **kw) -> MemoryEntry:
    path, img, xy = slide
    annotations = kw.pop("annotations", [*point_annotations(xy), USER_REGION])
    metadata = kw.pop("metadata", {"width": img.shape[1], "height": img.shape[0], **CALIBRATED})
    return MemoryEntry(name, kw.pop("uri", path.as_uri()), annotations, metadata=metadata, **kw)


class Factory:
    """Makes the real watershed segmenter and counts how often it was asked."""

    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return WatershedSegmenter()


def run(project, lines=None, **options):
    lines = [] if lines is None else lines
    return run_project(project, Factory(), RunOptions(**options), log=lines.append)


def test_one_detection_per_point_in_its_class_and_annotations_untouched(slide):
    path, img, xy = slide
    entry = make_entry(slide, detections=[USER_DETECTION])
    before = copy.deepcopy(entry.annotations)
    lines = []
    summary = run(MemoryProject(path.parent, [entry]), lines, run_id="run-1")

    assert entry.annotations == before  # the user's points and region are untouched
    assert entry.saves == 1  # one bulk write per image
    ours = [d for d in entry.detections if parse_marker(d["properties"].get("name"))]
    assert entry.detections[0] == USER_DETECTION  # theirs, as it was
    report = summary.images[0]
    assert report.status == "written" and report.points == len(xy) > 20
    assert report.by_class == {"Immune cells": len(xy) // 2, "Tumor": len(xy) - len(xy) // 2}
    assert len(ours) == report.detections == len(xy) - len(report.not_found)
    assert report.detections >= 0.9 * len(xy)
    classes = {point_key(x, y): CLASSES[k % 2] for k, (x, y) in enumerate(xy)}
    frame = box(0, 0, img.shape[1], img.shape[0])
    for d in ours:
        marker = parse_marker(d["properties"]["name"])
        assert marker.run_id == "run-1"
        assert d["properties"]["classification"]["name"] == classes[marker.key]
        poly = shape(d["geometry"])
        assert poly.is_valid and frame.contains(poly)
        assert d["properties"]["measurements"][AREA_UM] == pytest.approx(poly.area * 0.0625)
    assert summary.as_dict()["detections"] == len(ours) and summary.fatal_reason() is None
    assert any(line.startswith("crop: ") and "detections written" in line for line in lines)
    assert "images (0 failed)" in summary.line()


def test_second_run_adds_nothing_and_replace_swaps_only_our_detections(slide):
    path, _, xy = slide
    entry = make_entry(slide, detections=[USER_DETECTION])
    project = MemoryProject(path.parent, [entry])
    first = run(project, run_id="run-1")
    n = first.images[0].detections
    factory = Factory()
    again = run_project(project, factory, RunOptions(run_id="run-2"), log=lambda _: None)
    assert len(entry.detections) == n + 1  # no duplicates
    assert again.images[0].already == n and again.images[0].detections == 0
    assert factory.calls == (1 if again.images[0].todo else 0)  # only the not-found points are retried

    replaced = run(project, run_id="run-3", replace=True)
    assert replaced.images[0].removed == n
    assert USER_DETECTION["id"] in {d["id"] for d in entry.detections}
    ours = our_nuclei(entry.detections)
    assert len(ours) == replaced.images[0].detections and {d.marker.run_id for d in ours} == {"run-3"}

    # --class with --replace: only that class is redone
    run(project, run_id="run-4", replace=True, classes=["Tumor"])
    runs = {d.class_name: d.marker.run_id for d in our_nuclei(entry.detections)}
    assert runs == {"Tumor": "run-4", "Immune cells": "run-3"}

    # a point the user deleted: --replace removes its nucleus too
    entry.annotations[0]["geometry"]["coordinates"] = entry.annotations[0]["geometry"]["coordinates"][1:]
    gone = point_key(*xy[0])
    assert gone in {d.marker.key for d in our_nuclei(entry.detections)}
    run(project, run_id="run-5", replace=True)
    assert gone not in {d.marker.key for d in our_nuclei(entry.detections)}
    assert len({d.marker.key for d in our_nuclei(entry.detections)}) == len(our_nuclei(entry.detections))


def keys_of(features) -> dict[str, OurNucleus]:
    nuclei = our_nuclei(features)
    keys = {n.marker.key: n for n in nuclei}
    assert len(keys) == len(nuclei)  # never two nuclei of ours for one point
    return keys


def test_the_extensions_nuclei_are_ours_and_never_duplicated(slide, tmp_path):
    """Nuclei the QuPath extension made as annotations (marker name, point id in
    the metadata, as QuPath 0.6 stores them) count as done; --replace replaces
    them like our detections."""
    _, img, xy = slide
    clicks = [Click(float(x), float(y), f"{A}:{k + 1}", "Tumor") for k, (x, y) in enumerate(xy[0::2][:6])]
    made = WatershedSegmenter().segment(ArrayReader(img), clicks)
    extension = detection_features(made.results, "ext-1")
    for feature in extension:
        feature["properties"]["objectType"] = "annotation"
    assert len(extension) >= 4
    entry = make_entry(slide, annotations=[*point_annotations(xy), USER_REGION, *extension])
    project = MemoryProject(tmp_path, [entry])
    theirs = copy.deepcopy(entry.annotations)

    report = run(project, run_id="run-1").images[0]
    assert report.already == len(extension) and report.todo == len(xy) - len(extension)
    annotations, detections = reopened(project, "crop")
    assert annotations == theirs  # the extension's nuclei are kept as they are
    nuclei = keys_of([*annotations, *detections])  # and no point got a second nucleus
    assert len(nuclei) == len(extension) + report.detections
    assert {n.marker.run_id for n in nuclei.values() if n.object_type == "annotation"} == {"ext-1"}

    replaced = run(project, run_id="run-2", replace=True).images[0]
    annotations, detections = reopened(project, "crop")
    nuclei = keys_of([*annotations, *detections])
    assert replaced.removed == len(extension) + report.detections
    assert {(n.object_type, n.marker.run_id) for n in nuclei.values()} == {("detection", "run-2")}
    assert annotations == theirs[:3]  # the points and the user's region; the extension's nuclei were replaced


def delete_points(entry: MemoryEntry, keys: set[str], release: bool = False) -> None:
    """Points deleted in QuPath, then saved: with ``release`` as the extension's
    "remove the points that got a nucleus" does it (their nuclei lose
    ``nuclick_point_id``, in the same edit), else as the user does it."""
    for annotation in entry.annotations:
        if annotation["geometry"]["type"] == "MultiPoint":
            kept = [c for c in annotation["geometry"]["coordinates"] if point_key(*c) not in keys]
            annotation["geometry"]["coordinates"] = kept
    if release:
        for nucleus in [*entry.annotations, *entry.detections]:
            if (parse_marker(nucleus["properties"].get("name")) or Marker("", "")).key in keys:
                del nucleus["properties"]["metadata"]["nuclick_point_id"]
    entry.save()


def test_replace_removes_orphans_and_keeps_released_nuclei(slide, tmp_path):
    """The orphan rule, both ways: nuclei whose points the user deleted are
    removed by --replace (of the selected classes); nuclei the extension
    released, and nuclei whose points still exist but are not segmented now,
    are kept; without --replace nothing is removed, the orphans are reported."""
    _, _, xy = slide
    entry = make_entry(slide, detections=[USER_DETECTION])
    project = MemoryProject(tmp_path, [entry])
    run(project, run_id="run-1")
    first = keys_of(entry.detections)
    tumor = [point_key(*p) for p in xy[0::2] if point_key(*p) in first]
    immune = [point_key(*p) for p in xy[1::2] if point_key(*p) in first]
    released, deleted, immune_deleted = set(tumor[:3]), set(tumor[3:6]), set(immune[:2])
    delete_points(entry, released, release=True)
    delete_points(entry, deleted | immune_deleted)

    lines = []
    kept = run(project, lines, run_id="run-2").images[0]
    assert (kept.orphans, kept.removed) == (len(deleted | immune_deleted), 0)
    assert lines[0].endswith(f"; {kept.orphans} nuclei of ours lost their points (--replace removes them)")
    assert keys_of(reopened(project, "crop")[1]).keys() == first.keys()

    tumor_run = run(project, run_id="run-3", replace=True, classes=["Tumor"]).images[0]
    now = keys_of(reopened(project, "crop")[1])
    assert tumor_run.removed == len(tumor) - len(released) and tumor_run.orphans == len(deleted)
    assert deleted.isdisjoint(now)  # the user's deleted Tumor points: their nuclei are gone
    assert {now[k].marker.run_id for k in released} == {"run-1"}  # released: kept, untouched
    assert {now[k].marker.run_id for k in immune} == {"run-1"}  # Immune: not this run's class
    assert {now[k].marker.run_id for k in set(tumor) - released - deleted} == {"run-3"}

    run(project, run_id="run-4", replace=True)
    now = keys_of(reopened(project, "crop")[1])
    assert immune_deleted.isdisjoint(now) and {now[k].marker.run_id for k in released} == {"run-1"}
    assert USER_DETECTION in reopened(project, "crop")[1]


def test_an_image_whose_points_were_all_deleted(slide, tmp_path):
    """Without --replace it is reported and nothing is removed (and the run
    did nothing: non-zero exit, saying why); with --replace its orphans are
    removed, without loading a segmenter, and the released nucleus stays."""
    entry = make_entry(slide, detections=[USER_DETECTION])
    project = MemoryProject(tmp_path, [entry])
    n = run(project, run_id="run-1").images[0].detections
    keys = list(keys_of(entry.detections))
    delete_points(entry, {keys[0]}, release=True)
    delete_points(entry, set(keys))
    before = on_disk(entry)

    lines = []
    kept = run(project, lines)
    assert kept.images[0].status == "no points" and (kept.images[0].orphans, kept.images[0].removed) == (n - 1, 0)
    assert lines == [f"crop: no point annotations; {n - 1} nuclei of ours lost their points (--replace removes them)"]
    assert kept.fatal_reason().endswith(
        f"; {n - 1} nuclei of ours lost their points (run with --replace to remove them)"
    )
    plan = run(project, dry_run=True, replace=True).images[0]
    assert (plan.status, plan.removed, plan.todo) == ("would write", n - 1, 0)
    assert on_disk(entry) == before

    factory, lines = Factory(), []
    done = run_project(project, factory, RunOptions(replace=True), log=lines.append)
    assert factory.calls == 0 and done.fatal_reason() is None
    assert done.images[0].status == "written" and done.images[0].removed == n - 1
    head = "crop: no points left; 0 detections written, 0 not found, 0 already done"
    assert lines[0].startswith(f"{head}, {n - 1} earlier removed ({n - 1} orphans)")
    _, detections = reopened(project, "crop")
    assert list(keys_of(detections)) == [keys[0]] and USER_DETECTION in detections


def test_dry_run_plans_and_writes_nothing(slide):
    path, _, xy = slide
    entry = make_entry(slide)
    project = MemoryProject(path.parent, [entry])

    def no_model():
        raise AssertionError("a dry run must not load a segmenter")

    lines = []
    plan = run_project(project, no_model, RunOptions(dry_run=True), log=lines.append)
    assert entry.saves == 0 and entry.detections == []
    assert plan.images[0].status == "would write" and plan.images[0].todo == len(xy)
    assert "would segment" in lines[0] and "nothing written" in plan.line()

    done = run(project).images[0].detections
    plan = run_project(project, no_model, RunOptions(dry_run=True, replace=True), log=lambda _: None)
    assert (plan.images[0].todo, plan.images[0].removed) == (len(xy), done)
    plan = run_project(project, no_model, RunOptions(dry_run=True, classes=["Tumor"]), log=lambda _: None)
    assert plan.images[0].already + plan.images[0].todo == plan.images[0].points == len(xy[::2])
    assert entry.saves == 1


A = "00000000-0000-4000-8000-000000000000"  # the Tumor point annotation of point_annotations()
B = "00000000-0000-4000-8000-000000000001"  # the Immune cells one


def test_plan_points_rules():
    a, b = Click(1.0, 1.0, f"{A}:1", "Tumor"), Click(2.0, 2.0, f"{B}:1", "Stroma")
    c = Click(3.0, 3.0, f"{A}:2", "Tumor")
    index = {(A, "1.000,1.000"), (B, "2.000,2.000"), (A, "3.000,3.000"), (B, "5.000,5.000")}

    def ours(key_x, cls="Tumor", point_id=A, kind="detection"):
        return OurNucleus(f"n{key_x}", marker_for("r0", Click(key_x, key_x)), cls, point_id, kind)

    of_a = ours(1.0, kind="annotation")  # the extension's nucleus of a's point
    orphan = ours(9.0)  # its point was deleted after the run
    stroma_orphan = ours(8.0, "Stroma", B)
    released = ours(7.0, point_id=None)  # the extension removed its point on purpose
    kept_point = ours(5.0, "Stroma", B)  # its point exists, but is not segmented now (class filter)
    nuclei = [of_a, orphan, stroma_orphan, released, kept_point]

    skip = plan_points([a, b, c], nuclei, replace=False, points=index)
    assert (skip.todo, skip.already, skip.remove) == ([b, c], [a], [])  # nothing removed without --replace
    assert skip.orphans == [orphan, stroma_orphan]  # ...but the orphans are known, to be reported
    redo = plan_points([a, b, c], nuclei, replace=True, points=index)
    assert redo.todo == [a, b, c] and redo.remove == [of_a, orphan, stroma_orphan]
    tumor = plan_points([a, c], nuclei, replace=True, classes=["Tumor"], points=index)
    assert tumor.remove == [of_a, orphan]  # a Stroma orphan is not removed by a Tumor run
    stroma = plan_points([b], nuclei, replace=True, classes=["Stroma"], points=index)
    assert stroma.remove == [stroma_orphan]  # our Tumor nuclei are not touched by a Stroma run
    nothing_left = plan_points([], nuclei, replace=True, points=set())  # every point deleted
    assert nothing_left.remove == [of_a, orphan, stroma_orphan, kept_point]  # all but the released one


def test_tile_border_nuclei_equal_whole_image(monuseg_pair, tmp_path):
    """Through the connector, tile by tile (256 px tiles on a 512 px TIFF),
    every nucleus gets exactly the polygon of a whole-image segmentation."""
    img, lab = monuseg_pair
    img, lab = np.ascontiguousarray(img[:512, :512]), lab[:512, :512]
    path = write_pyramid(tmp_path / "slide.tif", img)
    xy, _ = simulate_clicks(lab, jitter=3, seed=2)
    entry = MemoryEntry("slide", path.as_uri(), point_annotations(xy))
    summary = run(MemoryProject(tmp_path, [entry]), max_tile=256)
    clicks = [Click(float(x), float(y), str(k), CLASSES[k % 2]) for k, (x, y) in enumerate(xy)]
    tiles = plan_tiles(clicks, 512, 512, 128, 0.0, 256)
    assert len(tiles) >= 4
    whole = WatershedSegmenter().segment(ArrayReader(img), clicks)
    expected = {point_key(r.click.x, r.click.y): r.polygon for r in whole.results if r.found}
    written = {parse_marker(d["properties"]["name"]).key: shape(d["geometry"]) for d in entry.detections}
    assert summary.images[0].detections == len(expected) == len(written)
    assert written.keys() == expected.keys()
    for key, poly in expected.items():
        assert written[key].equals(poly), key
    # nuclei that straddle a tile border were part of the comparison
    edges = {t.x0 + t.width for t in tiles if t.x0 + t.width < 512}
    assert any(any(p.bounds[0] < e < p.bounds[2] for e in edges) for p in expected.values())


def test_bad_images_are_reported_and_the_others_go_on(slide, tmp_path):
    _, _, xy = slide
    grey = tmp_path / "grey.tif"
    tifffile.imwrite(grey, np.zeros((64, 64), np.uint8))
    odd = tmp_path / "slide.xyz"
    odd.write_bytes(b"not an image")
    fake_ndpi = tmp_path / "slide.ndpi"
    fake_ndpi.write_bytes(b"not a slide either")
    far = point_annotations(xy + 5000)
    entries = [
        make_entry(slide, "missing", uri=(tmp_path / "gone.tif").as_uri()),
        make_entry(slide, "greyscale", uri=grey.as_uri(), metadata={}),
        make_entry(slide, "odd format", uri=odd.as_uri()),
        make_entry(slide, "ndpi", uri=fake_ndpi.as_uri()),
        make_entry(slide, "omero", uri="https://omero.example.org/webclient/?show=image-51"),
        make_entry(slide, "outside", annotations=far),
        make_entry(slide, "wrong size", metadata={"width": 9999, "height": 256}),
        make_entry(slide, "no points", annotations=[USER_REGION]),
        make_entry(slide, "good"),
    ]
    lines = []
    summary = run(MemoryProject(tmp_path, entries), lines)
    status = {r.name: r.status for r in summary.images}
    assert status == {
        "missing": "failed",
        "greyscale": "failed",
        "odd format": "failed",
        "ndpi": "failed",
        "omero": "failed",
        "outside": "failed",
        "wrong size": "failed",
        "no points": "no points",
        "good": "written",
    }
    errors = {r.name: r.error for r in summary.images}
    assert "not found" in errors["missing"] and "gone.tif" in errors["missing"]
    assert "8-bit RGB" in errors["greyscale"] and "greyscale" in errors["greyscale"]
    assert "unsupported image type .xyz" in errors["odd format"]
    assert "slide.ndpi" in errors["ndpi"]
    assert "not a local file" in errors["omero"]
    assert "outside the image (256 x 256 px)" in errors["outside"]
    assert "9999 x 256" in errors["wrong size"]
    assert all(e.saves == 0 and e.detections == [] for e in entries[:-1])
    assert entries[-1].saves == 1 and summary.fatal_reason() is None
    assert any(line.startswith("missing: skipped: image file not found") for line in lines)
    assert "no points: no point annotations" in lines

    only_bad = run(MemoryProject(tmp_path, entries[:3]))
    assert only_bad.fatal_reason() == "nothing could be done: all 3 images failed"
    no_points = run(MemoryProject(tmp_path, [make_entry(slide, annotations=[USER_REGION])]))
    assert "no point annotations found in 1 image" in no_points.fatal_reason()
    assert run(MemoryProject(tmp_path, [])).fatal_reason() == "the project has no images"
    other_class = []
    run(MemoryProject(tmp_path, [make_entry(slide)]), other_class, classes=["Necrosis"])
    assert other_class[0].startswith("crop: no points of the selected classes")


def test_some_points_outside_are_reported_not_found(slide, tmp_path):
    _, _, xy = slide
    entry = make_entry(slide, annotations=point_annotations(np.vstack([xy[:4], [[400.0, 10.0]]])))
    lines = []
    summary = run(MemoryProject(tmp_path, [entry]), lines)
    report = summary.images[0]
    assert report.status == "written" and report.points == 5 and report.outside == 1
    assert any("outside the image" in r.reason for r in report.not_found)
    assert any(line.startswith("  not found: point") and "(400.0, 10.0)" in line for line in lines)


def test_unknown_image_name_stops_before_anything(slide, tmp_path):
    entry = make_entry(slide)
    with pytest.raises(BridgeInputError, match=r"no image named 'nope'.*images: crop"):
        run(MemoryProject(tmp_path, [entry]), images=["nope"])
    assert entry.saves == 0
    summary = run(MemoryProject(tmp_path, [entry, make_entry(slide, "other")]), images=["other"])
    assert [r.name for r in summary.images] == ["other"] and entry.saves == 0


def on_disk(entry: MemoryEntry) -> tuple[bytes, list[str]]:
    """The image's data file, byte for byte, and the files beside it."""
    return entry.data_file().read_bytes(), sorted(p.name for p in entry.folder.iterdir())


def reopened(project: MemoryProject, name: str) -> tuple[list[dict], list[dict]]:
    """The image's objects as a fresh process opens them from disk."""
    (entry,) = [e for e in MemoryProject.reopen(project.path).images if e.name == name]
    return entry.read_objects()


def test_the_stand_in_fails_where_qupath_fails(slide, tmp_path):
    """Without the connector's guard, the stand-in leaves what QuPath leaves:
    objects inserted before an exception stay in memory; an exception inside
    the save that is not an IOException leaves a half-written data.qpdata and
    the .bkp; an IOException makes QuPath move its backup back."""
    entry = make_entry(slide, "first", detections=[USER_DETECTION])
    project = MemoryProject(tmp_path, [entry])
    before, files = on_disk(entry)
    extra = [copy.deepcopy(USER_DETECTION) for _ in range(3)]
    for k, f in enumerate(extra):
        f["id"] = f"bbbbbbbb-0000-4000-8000-00000000000{k}"
    entry.fail_after_inserting = 2
    with pytest.raises(JavaException):
        entry.insert_objects(extra)
    assert len(entry.detections) == 3  # two of three went in, and stay in memory
    entry.fail_in_save = JavaException("java.lang.OutOfMemoryError: Java heap space")
    with pytest.raises(JavaException):
        entry.save()
    half, listing = on_disk(entry)
    assert listing == ["data.qpdata", "data.qpdata.bkp", "server.json"] and half != before
    with pytest.raises(ValueError):  # QuPath cannot read the half file
        MemoryProject.reopen(tmp_path)
    (entry.folder / "data.qpdata.bkp").replace(entry.data_file())  # put it right by hand
    entry.fail_in_save = OSError("No space left on device")
    with pytest.raises(OSError):
        entry.save()
    assert on_disk(entry) == (before, files)  # QuPath restored its backup itself
    assert reopened(project, "first") == (make_entry(slide, "x").annotations, [USER_DETECTION])


@pytest.mark.parametrize(
    "failure",
    [
        {"fail_after_inserting": 5},
        {"fail_in_save": JavaException("java.lang.IllegalStateException: serializer failed")},
        {"fail_in_save": OSError("No space left on device")},
        {"fail_after_data": JavaException("java.io.UncheckedIOException: summary.json")},
    ],
    ids=["after-inserting", "inside-save", "inside-save-ioerror", "after-the-data-file"],
)
def test_a_failed_write_leaves_that_image_untouched_and_the_run_goes_on(slide, tmp_path, failure):
    """--replace on an image that already has our nuclei, failing at each place
    QuPath can fail: that image is, on disk, byte for byte what it was, its
    unsaved changes are gone from memory, the next image is written, and the
    failure is reported."""
    first = make_entry(slide, "first", detections=[USER_DETECTION])
    second = make_entry(slide, "second")
    project = MemoryProject(tmp_path, [first, second])
    run(project, run_id="run-1")
    assert first.saves == 1 and len(our_nuclei(first.detections)) > 20
    before, files = on_disk(first)
    objects = first.read_objects()
    for name, value in failure.items():
        setattr(first, name, value)
    lines = []
    summary = run(project, lines, run_id="run-2", replace=True)
    assert [r.status for r in summary.images] == ["failed", "written"]
    expected = "OSError: No space left" if isinstance(failure.get("fail_in_save"), OSError) else "JavaException: java."
    assert summary.images[0].error.startswith(expected)
    assert any(line.startswith("first: skipped: ") for line in lines)
    assert on_disk(first) == (before, files)  # untouched: no half file, no .bkp, no snapshot left
    assert reopened(project, "first") == objects
    assert first.read_objects() == objects  # nothing unsaved left in memory for a later save to write
    assert {n.marker.run_id for n in our_nuclei(second.detections)} == {"run-2"}
    assert reopened(project, "second") == second.read_objects()
    assert summary.as_dict()["failed"] == 1 and summary.fatal_reason() is None

    again = run(project, run_id="run-3", replace=True)  # the failure is gone: the image is fully written
    assert again.images[0].status == "written"
    assert {n.marker.run_id for n in our_nuclei(reopened(project, "first")[1])} == {"run-3"}
    assert USER_DETECTION in reopened(project, "first")[1]


def test_an_image_whose_save_was_killed_is_left_alone(slide, tmp_path):
    """A snapshot left by a killed run: only a person can tell which file is good."""
    first, second = make_entry(slide, "first"), make_entry(slide, "second")
    project = MemoryProject(tmp_path, [first, second])
    snapshot_path(first.data_file()).write_bytes(first.data_file().read_bytes())
    before = on_disk(first)
    summary = run(project)
    assert [r.status for r in summary.images] == ["failed", "written"]
    assert "an earlier run was stopped while saving this image" in summary.images[0].error
    assert "data.qpdata.nuclick-bridge" in summary.images[0].error
    assert on_disk(first) == before and first.saves == 0


def test_ctrl_c_during_a_write_is_held_until_the_image_is_saved(slide, tmp_path):
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the suite runs in the background
    first = make_entry(slide, "first", during_write=lambda: signal.raise_signal(signal.SIGINT))
    second = make_entry(slide, "second")
    lines = []
    with pytest.raises(KeyboardInterrupt):
        run(MemoryProject(tmp_path, [first, second]), lines)
    assert first.saves == 1 and len(first.detections) > 20  # fully written
    assert second.saves == 0 and second.detections == []  # untouched
    assert lines[-1] == "interrupted: 1 image(s) fully written (first); the others are untouched"
    assert signal.getsignal(signal.SIGINT) is before  # the caller's handler is back


def test_segmenter_is_made_once_and_only_when_needed(slide, tmp_path):
    entries = [make_entry(slide, "a"), make_entry(slide, "b")]
    factory = Factory()
    run_project(MemoryProject(tmp_path, entries), factory, RunOptions(), log=lambda _: None)
    assert factory.calls == 1
    factory = Factory()
    summary = run_project(MemoryProject(tmp_path, [make_entry(slide, annotations=[])]), factory, log=lambda _: None)
    assert factory.calls == 0 and summary.images[0].status == "no points"


def test_export_image_is_segment_format(slide, tmp_path):
    entry = make_entry(slide, detections=[USER_DETECTION])
    project = MemoryProject(tmp_path, [entry])
    with pytest.raises(BridgeInputError, match="no nuclick-bridge detections"):
        export_image(project, "crop")
    summary = run(project, run_id="run-x")
    collection = export_image(project, "crop")
    assert len(collection["features"]) == summary.images[0].detections
    feature = collection["features"][0]
    assert set(feature) == {"type", "id", "geometry", "properties"}
    assert set(feature["properties"]) == {"objectType", "name", "classification", "measurements", "nuclick"}
    assert export_image(project, "crop", "run-x") == collection
    with pytest.raises(BridgeInputError, match="from run other"):
        export_image(project, "crop", "other")


def test_openslide_reader_matches_tifffile(slide):
    pytest.importorskip("openslide", reason="OpenSlide is optional (pip install openslide-python openslide-bin)")
    path, img, _ = slide
    with OpenSlideReader(path) as reader:
        assert (reader.width, reader.height) == (img.shape[1], img.shape[0])
        for x0, y0, w, h in [(10, 20, 50, 40), (-20, -10, 60, 60), (230, 240, 64, 64), (300, 300, 5, 5)]:
            expected = ArrayReader(img).read_region(x0, y0, w, h)
            assert np.array_equal(reader.read_region(x0, y0, w, h), expected)


def test_open_local_image_errors(tmp_path):
    with pytest.raises(BridgeInputError, match="not found"):
        open_local_image(tmp_path / "nope.svs")
    with pytest.raises(BridgeInputError, match="not a file"):
        open_local_image(tmp_path)
    (tmp_path / "a.vsi").write_bytes(b"x")
    with pytest.raises(BridgeInputError, match=r"unsupported image type \.vsi"):
        open_local_image(tmp_path / "a.vsi")
