"""A lab's regions and outlines as training data (bridge.io.regions and the
QuPath reader of ``adapt``): polygons to labels exactly, holes, nuclei that
cross a region's edge, partial labels, detections and annotations of several
classes, resampling, and the clear errors for unusable input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import shapely
from shapely.geometry import Polygon, box, mapping

from bridge.connectors.qupath.regions import project_regions, split_objects
from bridge.errors import BridgeInputError
from bridge.evaluation.clicks import instance_slices
from bridge.io.imageio import ArrayReader
from bridge.io.regions import LabRegions, rasterise, region_samples
from support.qupath_memory import MemoryEntry, MemoryProject

CAL = {"pixelCalibration": {"pixelWidth": {"value": 0.25, "unit": "µm"}, "pixelHeight": {"value": 0.25, "unit": "µm"}}}


def pixel_outline(mask: np.ndarray, offset: tuple[int, int] = (0, 0)) -> shapely.Geometry:
    """The exact outline of a pixel mask: the union of its pixel squares
    (pixel (c, r) spans [c, c+1) x [r, r+1)), holes included."""
    rows, cols = np.nonzero(mask)
    squares = shapely.box(cols + offset[1], rows + offset[0], cols + offset[1] + 1, rows + offset[0] + 1)
    return shapely.union_all(squares)


def test_rasterise_gives_back_real_nuclei_exactly(crop_pair):
    _, labels = crop_pair
    ids = sorted(instance_slices(labels))
    outlines = []
    for i in ids:
        sl = instance_slices(labels)[i]
        outlines.append(pixel_outline(labels[sl] == i, (sl[0].start, sl[1].start)))
    got = rasterise(outlines, labels.shape)
    expected = np.zeros_like(labels)
    for k, i in enumerate(ids):
        expected[labels == i] = k + 1
    assert len(ids) > 20
    np.testing.assert_array_equal(got, expected)


def test_rasterise_pixel_centres_and_holes():
    ring = Polygon([(10.2, 5), (30.7, 5), (30.7, 15), (10.2, 15)], holes=[[(15, 8), (20, 8), (20, 12), (15, 12)]])
    got = rasterise([ring], (40, 40))
    # centres c + 0.5 in (10.2, 30.7): columns 10..30; r + 0.5 in (5, 15): rows 5..14; the hole 5 x 4 pixels
    assert got.sum() == 21 * 10 - 5 * 4
    assert got[5, 10] == 1 and got[4, 10] == 0 and got[5, 31] == 0
    assert not got[8:12, 15:20].any() and got[7, 15] == 1
    # a later outline wins where two overlap; one leaving the window is clipped
    over = rasterise([box(0, 0, 10, 10), box(5, 5, 50, 50)], (20, 20))
    assert over[2, 2] == 1 and over[7, 7] == 2 and over[19, 19] == 2


def _lab(image: np.ndarray, regions, nuclei, pixel_size: float | None = 0.25) -> LabRegions:
    return LabRegions("img", ArrayReader(image), pixel_size, list(regions), list(nuclei))


def test_region_sample_partial_labels(crop_pair):
    image, labels = crop_pair
    slices = instance_slices(labels)
    outlines = {i: pixel_outline(labels[sl] == i, (sl[0].start, sl[1].start)) for i, sl in slices.items()}
    region = box(90, 90, 150, 150)
    inside = [i for i, g in outlines.items() if g.intersects(region)]
    crossing = [i for i in inside if not region.contains(outlines[i])]
    window = box(50, 50, 190, 190)
    outside = [i for i, g in outlines.items() if not g.intersects(region) and window.intersects(g)]
    assert crossing and outside
    unlabelled = outside[0]  # a nucleus nobody outlined, outside the region but in its window
    given = [i for i in outlines if i != unlabelled]
    (sample,) = region_samples(_lab(image, [region], [outlines[i] for i in given]), 0.25, margin=40)
    # window: the region grown by the margin
    np.testing.assert_array_equal(sample.image, image[50:190, 50:190])
    truth = labels[50:190, 50:190]
    # every outline in the window is labelled, exactly; its id is its index among them
    assert (truth == unlabelled).any() and not sample.labels[truth == unlabelled].any()
    for i in given:
        if (truth == i).any():
            assert len(set(np.unique(sample.labels[truth == i]))) == 1 and (sample.labels[truth == i] > 0).all()
    # targets: the nuclei touching the region, those crossing its edge included (whole)
    target_truth = {int(np.unique(truth[sample.labels == t])[0]) for t in sample.targets}
    assert target_truth == set(inside)
    # known: the region and every outline; the unlabelled nucleus outside is unknown, not background
    assert sample.known[40:100, 40:100].all()
    assert not sample.known[truth == unlabelled].any()
    assert (sample.known == (sample.labels > 0) | rasterise([box(40, 40, 100, 100)], truth.shape).astype(bool)).all()


def test_region_sample_resamples_to_the_model_pixel_size(crop_pair):
    image, labels = crop_pair
    nucleus = pixel_outline(labels == labels[128, 128]) if labels[128, 128] else box(120, 120, 136, 136)
    (half,) = region_samples(_lab(image, [box(100, 100, 160, 160)], [nucleus], 0.5), 0.25, margin=16)
    (same,) = region_samples(_lab(image, [box(100, 100, 160, 160)], [nucleus], 0.26), 0.25, margin=16)
    # 0.5 µm pixels are twice the model's: a 16-model-pixel margin is 8 level-0 pixels, the window of
    # 76 level-0 pixels becomes 152, and a pixel-aligned outline covers exactly four times its area
    assert half.image.shape == (152, 152, 3) and same.image.shape == (92, 92, 3)
    assert (half.labels > 0).sum() == 4 * round(nucleus.area)
    # within 10% of the model's size the pixels are used as they are
    assert (same.labels > 0).sum() == round(nucleus.area)


def test_unusable_regions_are_one_clear_error(crop_pair):
    image, _ = crop_pair
    nucleus = box(100, 100, 110, 110)
    with pytest.raises(BridgeInputError, match="holds no nucleus outline"):
        region_samples(_lab(image, [box(0, 0, 50, 50)], [nucleus]), 0.25)
    with pytest.raises(BridgeInputError, match=r"no pixel size.*--pixel-size"):
        region_samples(_lab(image, [box(90, 90, 120, 120)], [nucleus], None), 0.25)


def _feature(geom, kind: str = "annotation", cls: str | None = None) -> dict:
    props: dict = {"objectType": kind}
    if cls:
        props["classification"] = {"name": cls}
    return {"type": "Feature", "geometry": mapping(geom), "properties": props}


def test_split_objects_detections_annotations_classes():
    feats = [
        _feature(box(0, 0, 100, 100), cls="NuClick training"),
        _feature(box(5, 5, 15, 15), "detection", "Tumor"),  # ours, edited or not
        _feature(box(20, 20, 30, 30), "annotation", "Immune cells"),  # drawn by hand
        _feature(box(40, 40, 50, 50), "detection"),  # unclassified
        _feature(box(-500, -500, 900, 900), "annotation", "Tissue"),  # not a nucleus: too large
        {"type": "Feature", "geometry": {"type": "MultiPoint", "coordinates": [[1, 1]]}, "properties": {}},
    ]
    regions, nuclei, too_large = split_objects(feats, "NuClick training", 32000)
    assert [r.bounds for r in regions] == [(0, 0, 100, 100)]
    assert sorted(n.bounds for n in nuclei) == [(5, 5, 15, 15), (20, 20, 30, 30), (40, 40, 50, 50)]
    assert too_large == 1
    # another region class: the first region is now a large object and no region is left
    regions, nuclei, _ = split_objects(feats, "Other", 32000)
    assert regions == [] and len(nuclei) == 4


def _png(tmp_path: Path, image: np.ndarray) -> str:
    from PIL import Image

    p = tmp_path / "slide.png"
    Image.fromarray(image).save(p)
    return p.as_uri()


def test_qupath_project_regions_and_errors(tmp_path, crop_pair):
    image, labels = crop_pair
    uri = _png(tmp_path, image)
    nuclei = [pixel_outline(labels == i) for i in list(instance_slices(labels))[:15]]
    region = shapely.union_all(nuclei).envelope
    feats = [_feature(region, cls="NuClick training")] + [_feature(n, "detection", "Tumor") for n in nuclei]
    project = MemoryProject(
        tmp_path / "p",
        [
            MemoryEntry("with", uri, annotations=[feats[0]], detections=feats[1:], metadata=CAL),
            MemoryEntry("without", uri, detections=feats[1:], metadata=CAL),
        ],
    )
    (lab,) = project_regions(project, "NuClick training")
    assert lab.name == "with" and lab.pixel_size_um == 0.25 and len(lab.nuclei) == 15
    (sample,) = region_samples(lab, 0.25)
    assert len(sample.targets) == 15
    with pytest.raises(BridgeInputError, match="no image of 2 in the project has an area annotation of class 'Lab'"):
        project_regions(project, "Lab")
    uncalibrated = MemoryProject(tmp_path / "q", [MemoryEntry("u", uri, annotations=[feats[0]], detections=feats[1:])])
    (lab,) = project_regions(uncalibrated, "NuClick training")
    with pytest.raises(BridgeInputError, match="u: the image has no pixel size"):
        region_samples(lab, 0.25)
