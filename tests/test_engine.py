"""The engine's plumbing: guidance maps, patches at borders, post-processing,
overlap resolution, polygons in image coordinates, batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi
from shapely.geometry import Point
from skimage import morphology

from bridge.errors import BridgeInputError
from bridge.evaluation.clicks import simulate_clicks
from bridge.io.coords import patch_origin
from bridge.io.imageio import ArrayReader
from bridge.model.fusion import fold_batchnorm
from bridge.model.network import NuClickNet, count_parameters
from bridge.model.weights import ModelInfo, load_model, save_weights
from bridge.nuclick.engine import NuClickEngine
from bridge.nuclick.guidance import gaussian_map, guidance_pair
from bridge.nuclick.polygons import mask_to_polygon
from bridge.nuclick.postprocess import MIN_OBJECT_PX, PatchMask, clean_patch, component_at, resolve_overlaps
from bridge.results import Click


class DiscModel(torch.nn.Module):
    """A real network whose output is known: logits positive within ~radius px
    of the inclusion peak.  Lets the tests check geometry exactly."""

    def __init__(self, radius: float = 5.0, sigma: float = 2.0) -> None:
        super().__init__()
        self.level = float(np.exp(-(radius**2) / (2 * sigma**2)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 50.0 * (x[:, 3:4] - self.level)


def disc_engine(**kw) -> NuClickEngine:
    return NuClickEngine(DiscModel(), ModelInfo("disc", "test", "", 0.0), device="cpu", **kw)


def test_published_width_has_about_67m_parameters():
    n = count_parameters(NuClickNet(1.0))
    assert 60e6 < n < 70e6
    assert count_parameters(NuClickNet(0.25)) < n / 10


def test_network_shapes():
    net = NuClickNet(0.125).eval()
    with torch.no_grad():
        y = net(torch.zeros(2, 5, 128, 128))
    assert y.shape == (2, 1, 128, 128)


def test_batchnorm_folding_keeps_the_outputs_and_leaves_the_callers_model_alone():
    torch.manual_seed(0)
    net = NuClickNet(0.125)
    n_bn = 0
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # non-trivial statistics, as after training
            n_bn += 1
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    net.train()
    folded = fold_batchnorm(net)
    assert net.training and sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) == n_bn
    assert not folded.training and not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = torch.rand(2, 5, 128, 128)
    net.eval()
    with torch.no_grad():
        want, got = net(x), folded(x)
    assert torch.allclose(got, want, atol=1e-4 * float(want.abs().max()))


def test_gaussian_peak_is_at_the_click_pixel():
    g = gaussian_map(np.array([[10.5, 20.5]]), 64, sigma=2.0)
    assert np.unravel_index(g.argmax(), g.shape) == (20, 10)
    assert g.max() == pytest.approx(1.0)
    assert gaussian_map(np.zeros((0, 2)), 64).sum() == 0


def test_exclusion_map_is_zero_without_neighbours_and_far_points_are_ignored():
    pair = guidance_pair(np.array([64.5, 64.5]), np.array([[500.0, 500.0]]), 128)
    assert pair.shape == (2, 128, 128)
    assert pair[1].sum() == 0
    assert pair[0].max() == pytest.approx(1.0)


def test_clean_patch_keeps_only_the_clicked_component_and_fills_holes():
    prob = np.zeros((32, 32), np.float32)
    prob[5:15, 5:15] = 0.9
    prob[9:11, 9:11] = 0.1  # a hole
    prob[20:30, 20:30] = 0.8  # another nucleus
    prob[2, 28] = 0.9  # a speck
    mask = clean_patch(prob, (6, 6), threshold=0.4, min_size=10)
    assert mask[5:15, 5:15].all() and mask.sum() == 100


def test_clean_patch_fills_holes_as_a_whole_patch_fill_would():
    """Holes are filled inside the clicked component's bounding box only; on
    blobby random shapes with holes that must equal filling the whole patch."""
    rng = np.random.default_rng(0)
    filled_any = 0
    for _ in range(40):
        prob = ndi.gaussian_filter(rng.random((96, 96)), 2.5)
        prob = (prob - prob.min()) / (prob.max() - prob.min())
        seed = tuple(int(v) for v in np.unravel_index(prob.argmax(), prob.shape))
        threshold = float(np.quantile(prob, 0.45))
        component = component_at(morphology.remove_small_objects(prob > threshold, max_size=MIN_OBJECT_PX - 1), seed)
        want = ndi.binary_fill_holes(component)
        got = clean_patch(prob, seed, threshold=threshold)
        assert np.array_equal(got, want)
        filled_any += int(want.sum() > component.sum())
    assert filled_any >= 5  # the shapes really had holes


def test_clean_patch_at_threshold_and_small_object():
    prob = np.zeros((32, 32), np.float32)
    prob[10:13, 10:13] = 0.95  # 9 px: under 10 px, removed
    assert not clean_patch(prob, (11, 11)).any()
    prob[10:20, 10:20] = 0.4  # exactly at threshold: not foreground
    assert not clean_patch(prob, (15, 15)).any()


def test_resolve_overlaps_gives_pixels_to_higher_probability_in_any_order():
    size = 16
    a_prob = np.zeros((size, size), np.float32)
    a_prob[:, 0:10] = 0.9  # image columns 0..9
    a_prob[:, 8:10] = 0.55
    b_prob = np.zeros((size, size), np.float32)  # b's origin is 4 px right: local c = image c - 4
    b_prob[:, 2:16] = 0.6  # image columns 6..19
    b_prob[:, 2:4] = 0.5  # image columns 6, 7: a (0.9) beats b (0.5); columns 8, 9: b (0.6) beats a (0.55)
    a = PatchMask((0, 0), a_prob > 0.4, a_prob, (8, 1))
    b = PatchMask((4, 0), b_prob > 0.4, b_prob, (8, 12))
    out1 = resolve_overlaps([a, b], min_size=1)
    out2 = resolve_overlaps([b, a], min_size=1)[::-1]
    for x, y in zip(out1, out2, strict=True):
        assert np.array_equal(x.mask, y.mask)
    a_cols = set(np.nonzero(out1[0].mask.any(0))[0].tolist())
    b_cols = {c + 4 for c in np.nonzero(out1[1].mask.any(0))[0].tolist()}
    assert a_cols == set(range(0, 8))
    assert b_cols == set(range(8, 20))


def test_mask_to_polygon_is_exact_in_image_coordinates():
    mask = np.zeros((10, 10), bool)
    mask[2:5, 3:7] = True
    mask[5, 3] = True
    poly = mask_to_polygon(mask, origin=(100, 200), tolerance=0.0)
    assert poly.is_valid and poly.area == mask.sum()
    assert poly.bounds == (103.0, 202.0, 107.0, 206.0)
    assert mask_to_polygon(np.zeros((4, 4), bool)) is None


def test_engine_polygons_sit_on_their_clicks_also_at_borders():
    img = np.full((300, 200, 3), 200, np.uint8)
    clicks = [Click(0.5, 0.5, "corner"), Click(100.2, 150.7, "mid"), Click(199.9, 299.9, "far corner")]
    seg = disc_engine().segment(ArrayReader(img), clicks)
    assert [r.click.id for r in seg.results] == ["corner", "mid", "far corner"]
    for r in seg.results:
        assert r.found, r.reason
        assert r.polygon.is_valid
        assert r.polygon.distance(Point(r.click.x, r.click.y)) == 0
        minx, miny, maxx, maxy = r.polygon.bounds
        assert minx >= 0 and miny >= 0 and maxx <= 200 and maxy <= 300  # never in the padding
    mid = seg.results[1].polygon
    assert mid.centroid.distance(Point(100.5, 150.5)) < 0.5
    assert 60 < mid.area < 100  # a disc of radius ~5 px
    corner = seg.results[0].polygon
    assert corner.area < mid.area / 2  # clipped by the image border


def test_click_outside_and_nan_click():
    img = np.zeros((64, 64, 3), np.uint8)
    seg = disc_engine().segment(ArrayReader(img), [Click(-3, 5, "out"), Click(10.5, 10.5, "in")])
    assert not seg.results[0].found and "outside" in seg.results[0].reason
    assert seg.results[1].found
    with pytest.raises(BridgeInputError, match="non-finite"):
        disc_engine().segment(ArrayReader(img), [Click(float("nan"), 3.0)])


def test_instance_map_has_one_id_per_click_and_no_overlap(crop_pair):
    img, lab = crop_pair
    xy, _ = simulate_clicks(lab, jitter=0, seed=0)
    clicks = [Click(x, y, str(i)) for i, (x, y) in enumerate(xy)]
    seg = disc_engine().segment(ArrayReader(img), clicks)
    inst = seg.instance_map(*lab.shape)
    found = [k for k, r in enumerate(seg.results) if r.found]
    assert set(np.unique(inst)) - {0} == {k + 1 for k in found}
    for k in found:
        c = clicks[k]
        assert inst[int(c.y), int(c.x)] == k + 1 or seg.results[k].polygon.distance(Point(c.x, c.y)) < 3
        assert (inst == k + 1).sum() == pytest.approx(seg.results[k].polygon.area, rel=0.15)


def test_batch_size_does_not_change_results(crop_pair):
    img, lab = crop_pair
    xy, _ = simulate_clicks(lab, jitter=2, seed=1)
    clicks = [Click(x, y) for x, y in xy[:12]]
    torch.manual_seed(0)
    net = NuClickNet(0.125)
    info = ModelInfo("rand", "test", "", 0.125, threshold=0.5)
    a = NuClickEngine(net, info, device="cpu", batch_size=1).segment(ArrayReader(img), clicks)
    b = NuClickEngine(net, info, device="cpu", batch_size=7).segment(ArrayReader(img), clicks)
    assert len(a.results) == len(b.results) == 12
    for ra, rb in zip(a.results, b.results, strict=True):
        assert ra.found == rb.found
        if ra.found:
            assert ra.polygon.equals(rb.polygon)


def test_patch_origin_centres_the_click():
    assert patch_origin(64.2, 64.9, 128) == (0, 0)
    assert patch_origin(0.5, 0.5, 128) == (-64, -64)


def test_weights_round_trip_and_clear_errors(tmp_path):
    torch.manual_seed(0)
    net = NuClickNet(0.125)
    path = tmp_path / "w.pt"
    save_weights(path, net, {"name": "tiny", "sigma": 2.0})
    model, info = load_model(path)
    assert info.name == "tiny" and info.width == 0.125 and len(info.sha256) == 64
    for k, v in net.state_dict().items():
        if v.is_floating_point():
            assert torch.allclose(model.state_dict()[k], v.half().float())
    with pytest.raises(BridgeInputError, match="not found"):
        load_model(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(BridgeInputError, match="not a nuclick-bridge weights file"):
        load_model(tmp_path / "junk.pt")
