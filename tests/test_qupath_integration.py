"""The QuPath connector against real QuPath through paquo.

Runs only where QuPath is installed: set ``PAQUO_QUPATH_DIR`` to a QuPath 0.6
folder (the one with ``lib/app`` and ``lib/runtime``) and install
``.[qupath]``.  Everywhere else (CI included) the module is skipped, with the
reason shown by ``pytest -rs``; the same behaviour is covered without QuPath by
``test_qupath_run.py`` through the in-memory project.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import tifffile

from bridge.cli import main
from bridge.connectors.qupath.objects import our_nuclei, parse_marker, point_key
from bridge.evaluation.clicks import simulate_clicks

pytestmark = pytest.mark.qupath

if not os.environ.get("PAQUO_QUPATH_DIR"):
    pytest.skip(
        "needs QuPath: set PAQUO_QUPATH_DIR to a QuPath 0.6 installation (the folder with lib/app and lib/runtime)",
        allow_module_level=True,
    )
pytest.importorskip("paquo", reason="needs paquo: pip install '.[qupath]'")

CLASSES = ("Tumor", "Immune cells")


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def read_back(project_dir: Path):
    """(annotations GeoJSON, detections GeoJSON) of the only image, read-only."""
    from paquo.java import GsonTools
    from paquo.projects import QuPathProject

    qp = QuPathProject(project_dir, mode="r")
    (entry,) = qp.images
    hierarchy = entry.hierarchy
    annotations = hierarchy.to_geojson()
    detections = json.loads(str(GsonTools.getInstance().toJson(hierarchy.java_object.getDetectionObjects())))
    return annotations, detections


def test_qupath_project_round_trip(monuseg_pair, tmp_path, capsys):
    from paquo.classes import QuPathPathClass
    from paquo.images import QuPathImageType
    from paquo.projects import QuPathProject
    from shapely.geometry import MultiPoint, box, shape

    img, lab = monuseg_pair
    img, lab = np.ascontiguousarray(img[:512, :512]), lab[:512, :512]
    (tmp_path / "images").mkdir()
    tif = tmp_path / "images" / "slide.tif"
    tifffile.imwrite(tif, img, tile=(128, 128), photometric="rgb", compression="zlib")
    xy, _ = simulate_clicks(lab, jitter=3, seed=0)
    project_dir = tmp_path / "project"

    with QuPathProject(project_dir, mode="x") as qp:  # saved on exit
        entry = qp.add_image(tif, image_type=QuPathImageType.BRIGHTFIELD_H_E)
        for k, cls in enumerate(CLASSES):
            entry.hierarchy.add_annotation(MultiPoint(xy[k::2].tolist()), path_class=QuPathPathClass(cls))
        image_name = entry.image_name
    annotations_before, detections_before = read_back(project_dir)
    assert len(annotations_before) == 2 and detections_before == []

    # dry run: a plan, nothing written
    assert main(["qupath", str(project_dir), "--method", "watershed", "--dry-run"]) == 0
    plan = last_json(capsys)
    assert plan["dry_run"] and plan["segmented"] == len(xy)
    assert read_back(project_dir) == (annotations_before, [])

    # run it
    assert main(["qupath", str(project_dir), "--method", "watershed"]) == 0
    first = last_json(capsys)
    annotations, detections = read_back(project_dir)
    assert annotations == annotations_before  # the points are untouched
    assert len(detections) == first["detections"] >= 0.9 * len(xy)
    classes = {point_key(x, y): CLASSES[k % 2] for k, (x, y) in enumerate(xy)}
    frame = box(0, 0, 512, 512)
    for d in detections:
        props = d["properties"]
        marker = parse_marker(props["name"])
        assert marker is not None and marker.run_id == first["run_id"]
        assert props["objectType"] == "detection"
        assert props["classification"]["name"] == classes[marker.key]
        assert props["measurements"]["Area px^2"] > 10
        geometry = shape(d["geometry"])
        assert geometry.is_valid and frame.contains(geometry)
    assert {d["properties"]["classification"]["name"] for d in detections} == set(CLASSES)

    # run it again: nothing duplicated
    assert main(["qupath", str(project_dir), "--method", "watershed"]) == 0
    second = last_json(capsys)
    assert second["already_done"] == first["detections"] and second["detections"] == 0
    annotations, again = read_back(project_dir)
    assert annotations == annotations_before and len(again) == len(detections)

    # --replace: the same nuclei, from the new run only
    assert main(["qupath", str(project_dir), "--method", "watershed", "--replace"]) == 0
    third = last_json(capsys)
    annotations, replaced = read_back(project_dir)
    assert annotations == annotations_before and len(replaced) == len(detections)
    assert {d.marker.run_id for d in our_nuclei(replaced)} == {third["run_id"]}

    # export, in the format 'segment' writes
    out = tmp_path / "slide.geojson"
    assert main(["qupath-export", str(project_dir), "--image", image_name, "--out", str(out)]) == 0
    exported = json.loads(out.read_text())
    assert len(exported["features"]) == len(replaced)
    assert {"objectType", "classification", "measurements", "nuclick"} <= set(exported["features"][0]["properties"])


def test_real_qupath_keeps_our_metadata_and_the_orphan_rule_holds(monuseg_pair, tmp_path, capsys):
    """With real QuPath 0.6: the extension's annotation nuclei count as ours (no
    duplicates), QuPath keeps our metadata on detections, --replace removes the
    orphans and keeps a released nucleus, and dropping unsaved changes
    (``setHierarchy(readHierarchy())``) restores the hierarchy."""
    from paquo.classes import QuPathPathClass
    from paquo.images import QuPathImageType
    from paquo.projects import QuPathProject
    from shapely.geometry import MultiPoint

    from bridge.connectors.qupath.objects import detection_features
    from bridge.connectors.qupath.paquo import open_project
    from bridge.evaluation.watershed import WatershedSegmenter
    from bridge.io.imageio import ArrayReader
    from bridge.results import Click

    img, lab = monuseg_pair
    img, lab = np.ascontiguousarray(img[:512, :512]), lab[:512, :512]
    tif = tmp_path / "slide.tif"
    tifffile.imwrite(tif, img, tile=(128, 128), photometric="rgb", compression="zlib")
    xy, _ = simulate_clicks(lab, jitter=3, seed=0)
    project_dir = tmp_path / "project"
    with QuPathProject(project_dir, mode="x") as qp:
        entry = qp.add_image(tif, image_type=QuPathImageType.BRIGHTFIELD_H_E)
        ids = {}
        for k, cls in enumerate(CLASSES):
            ann = entry.hierarchy.add_annotation(MultiPoint(xy[k::2].tolist()), path_class=QuPathPathClass(cls))
            ids[cls] = str(ann.java_object.getID())
        tumor = [Click(float(x), float(y), f"{ids['Tumor']}:{k + 1}", "Tumor") for k, (x, y) in enumerate(xy[0::2][:5])]
        extension = detection_features(WatershedSegmenter().segment(ArrayReader(img), tumor).results, "ext-1")
        for feature in extension:
            feature["properties"]["objectType"] = "annotation"
        entry.hierarchy.load_geojson(extension, raise_on_skip=True)

    assert main(["qupath", str(project_dir), "--method", "watershed"]) == 0
    first = last_json(capsys)
    assert first["already_done"] == len(extension) > 0
    annotations, detections = read_back(project_dir)
    nuclei = our_nuclei([*annotations, *detections])
    assert len({n.marker.key for n in nuclei}) == len(nuclei) == len(extension) + first["detections"]
    assert all(n.point_id == ids[n.class_name] for n in nuclei)  # metadata kept on detections and annotations

    # drop unsaved changes: the hierarchy read back from disk replaces the changed one
    project = open_project(project_dir, readonly=False)
    (paquo_entry,) = project.entries()
    before = paquo_entry.read_objects()
    paquo_entry.remove_objects([n.id for n in nuclei[:3]])
    assert paquo_entry.read_objects() != before
    paquo_entry.discard_changes()
    assert paquo_entry.read_objects() == before

    # release one Tumor nucleus (as the extension does), then delete every point annotation
    released = next(n for n in nuclei if n.class_name == "Tumor" and n.object_type == "detection")
    with QuPathProject(project_dir, mode="r+") as qp:
        hierarchy = qp.images[0].hierarchy
        for obj in hierarchy.java_object.getAllObjects(False):
            if str(obj.getID()) == released.id:
                obj.getMetadata().remove("nuclick_point_id")
            elif str(obj.getID()) in ids.values():
                hierarchy.java_object.removeObject(obj, True)
        hierarchy.flush(invalidate_proxy_cache=True)

    assert main(["qupath", str(project_dir), "--method", "watershed"]) == 2  # reported, nothing removed
    kept = last_json(capsys)
    assert (kept["orphans"], kept["removed"]) == (len(nuclei) - 1, 0)
    assert main(["qupath", str(project_dir), "--method", "watershed", "--replace"]) == 0
    cleaned = last_json(capsys)
    assert cleaned["removed"] == len(nuclei) - 1
    annotations, detections = read_back(project_dir)
    assert [n.id for n in our_nuclei([*annotations, *detections])] == [released.id]
