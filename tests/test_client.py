"""bridge.client against real servers: whole images tile by tile with the
in-process engine's exact answer, ``segment --server`` with the CLI's exact
output, streams, errors, and the tile planner's guarantees."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from bridge.cli import main
from bridge.client import NuClickClient, RemoteSegmenter, ServerError, TileJob, plan_tiles, segment
from bridge.errors import BridgeInputError
from bridge.evaluation.clicks import simulate_clicks
from bridge.io.coords import patch_origin
from bridge.io.imageio import ArrayReader
from bridge.model.network import NuClickNet
from bridge.model.weights import save_weights
from bridge.results import Click
from bridge.service.server import NuClickServer
from support.models import DiscModel, TextureModel, engine_for


@pytest.fixture(scope="module")
def texture_server():
    srv = NuClickServer(engine_for(TextureModel(), "texture"), port=0, http_port=None).start()
    yield srv
    srv.stop(grace=1)


def test_whole_image_tile_by_tile_equals_the_in_process_engine(texture_server, monuseg_pair):
    """Dense real nuclei, tiles far smaller than the image: every click gets
    the polygon the engine gives with the whole image in memory, including
    nuclei that touch and nuclei at tile borders."""
    img, lab = monuseg_pair
    img, lab = np.ascontiguousarray(img[:420, :420]), lab[:420, :420]
    xy, _ = simulate_clicks(lab, jitter=3, seed=1)
    clicks = [Click(x, y, f"k{i}", "Tumor") for i, (x, y) in enumerate(xy)]
    clicks += [Click(-4.0, 30.0, "off-image"), Click(415.0, 419.9, "corner")]
    expected = engine_for(TextureModel()).segment(ArrayReader(img), clicks).results
    with NuClickClient(f"127.0.0.1:{texture_server.grpc_port}") as cl:
        info = cl.info()
        plans = plan_tiles(clicks, 420, 420, info.patch_size, info.sigma, 512, 1000)
        assert len(plans) >= 9  # really tiled
        got = cl.segment_tiled(ArrayReader(img), clicks, max_tile=512).results
    assert [r.click for r in got] == clicks
    assert sum(r.found for r in expected) > 50
    for g, e in zip(got, expected, strict=True):
        assert (g.found, g.reason) == (e.found, e.reason), g.click.id
        if e.found:
            assert g.polygon.equals_exact(e.polygon, tolerance=1e-6), g.click.id
            assert g.score == pytest.approx(e.score, abs=1e-6)
    assert "outside" in got[-2].reason


def test_segment_with_server_writes_the_same_geojson_as_in_process(tmp_path, crop_pair, capsys):
    img, lab = crop_pair
    torch.manual_seed(1)
    weights = tmp_path / "w.pt"
    save_weights(weights, NuClickNet(0.125), {"name": "rand", "threshold": 0.45})
    Image.fromarray(img).save(tmp_path / "crop.png")
    xy, _ = simulate_clicks(lab, jitter=0, seed=0)
    picks = xy[np.argsort(xy[:, 0])][::6][:7]
    rows = ["x,y,class"] + [f"{x:.2f},{y:.2f},{'Tumor' if i % 2 else 'Stroma'}" for i, (x, y) in enumerate(picks)]
    (tmp_path / "clicks.csv").write_text("\n".join(rows) + "\n")
    common = ["segment", str(tmp_path / "crop.png"), "--points", str(tmp_path / "clicks.csv")]

    assert main([*common, "--out", str(tmp_path / "local.geojson"), "--weights", str(weights), "--device", "cpu"]) == 0
    from bridge.nuclick.engine import NuClickEngine

    srv = NuClickServer(NuClickEngine.load(weights, device="cpu"), port=0, http_port=None).start()
    try:
        rc = main([*common, "--out", str(tmp_path / "remote.geojson"), "--server", f"127.0.0.1:{srv.grpc_port}"])
        assert rc == 0
        assert srv.stats()["requests"] >= 1
    finally:
        srv.stop(grace=1)
    out = capsys.readouterr().out.strip().splitlines()
    local_summary, remote_summary = json.loads(out[-2]), json.loads(out[-1])
    assert local_summary["found"] == remote_summary["found"] and local_summary["clicks"] == len(picks) >= 5

    def features(name: str) -> list:
        doc = json.loads((tmp_path / name).read_text())
        for f in doc["features"]:
            f.pop("id")  # a fresh uuid per run
        return doc["features"]

    local, remote = features("local.geojson"), features("remote.geojson")
    assert len(local) == local_summary["found"]
    for a, b in zip(local, remote, strict=True):
        pa, pb = dict(a["properties"]), dict(b["properties"])
        assert pb.pop("measurements") == pytest.approx(pa.pop("measurements"))
        assert pa == pb
        assert np.allclose(a["geometry"]["coordinates"][0], b["geometry"]["coordinates"][0], atol=1e-9)


def test_segment_many_streams_tiles_in_order(texture_server, crop_pair):
    img, _ = crop_pair
    jobs = [
        TileJob(img[:128, :128], [Click(60.5, 60.5, "a"), Click(30.5, 90.5, "b")]),
        TileJob(lambda: img[128:, 128:], [Click(200.5, 190.5, "c")], origin=(128, 128)),  # read when sent
        TileJob(img[:128, :128], [Click(70.5, 70.5, "d")], context=[Click(80.5, 72.5, "ctx")]),
    ]
    with NuClickClient(f"127.0.0.1:{texture_server.grpc_port}") as cl:
        out = list(cl.segment_many(jobs))
        singles = [  # each tile alone, as a unary call
            cl.segment(img[:128, :128], jobs[0].clicks),
            cl.segment(img[128:, 128:], jobs[1].clicks, origin=(128, 128)),
            cl.segment(img[:128, :128], jobs[2].clicks, context=jobs[2].context),
        ]
    assert [[r.click.id for r in rs] for rs in out] == [["a", "b"], ["c"], ["d"]]
    for streamed, single in zip(out, singles, strict=True):
        for s, u in zip(streamed, single, strict=True):
            assert s.found and u.found, (s.click.id, s.reason, u.reason)  # clicks on real nuclei: all found
            # the same network on the same pixels; batch mates may move a probability by ~1e-7 (README)
            assert s.polygon.equals_exact(u.polygon, tolerance=1e-6), s.click.id
            assert s.score == pytest.approx(u.score, abs=1e-6)
    assert out[1][0].polygon.bounds[0] >= 128  # the second tile's origin is applied


def test_client_errors_are_one_readable_line(texture_server, crop_pair, tmp_path, capsys, monkeypatch):
    img, _ = crop_pair
    target = f"127.0.0.1:{texture_server.grpc_port}"
    with NuClickClient(target) as cl:
        with pytest.raises(ServerError) as info:
            cl.segment(img[:64, :64], [Click(100.0, 5.0, "far")])
        assert info.value.code == "INVALID_ARGUMENT" and "outside the tile" in str(info.value)
        assert target in str(info.value)
        with pytest.raises(ServerError) as info:
            cl.segment(img[:64, :64], [Click(5.0, 5.0, "x"), Click(6.0, 6.0, "x")])
        assert "twice" in str(info.value)

    class BrokenReader(ArrayReader):
        def read_region(self, x0, y0, w, h):
            raise BridgeInputError("slide.tif is truncated near x=0")

    with NuClickClient(target) as cl, pytest.raises(BridgeInputError) as info:
        cl.segment_tiled(BrokenReader(img), [Click(10.5, 10.5, "a")])
    assert not isinstance(info.value, ServerError) and "truncated" in str(info.value)  # the real reason
    with NuClickClient("127.0.0.1:1", retries=1, backoff=0.01, timeout=5) as cl:  # nothing listens there
        with pytest.raises(ServerError) as info:
            cl.info()
        assert info.value.code == "UNAVAILABLE" and "cannot reach" in str(info.value)
        assert cl.retry_count == 1

    Image.fromarray(img).save(tmp_path / "i.png")
    (tmp_path / "c.csv").write_text("x,y\n10,10\n")
    base = ["segment", str(tmp_path / "i.png"), "--points", str(tmp_path / "c.csv"), "--out", str(tmp_path / "o.json")]
    for extra, words in (
        (["--method", "watershed"], "runs only locally"),
        (["--weights", "w.pt"], "set on the server"),
        (["--server", "nohost"], "HOST:PORT"),
    ):
        server = [] if "--server" in extra else ["--server", target]
        assert main([*base, *server, *extra]) == 2
        assert words in capsys.readouterr().err
    quick = classmethod(lambda cls, target, **kw: cls(target, retries=1, backoff=0.01))
    monkeypatch.setattr(NuClickClient, "from_env", quick)
    assert main([*base, "--server", "127.0.0.1:1"]) == 2
    assert "cannot reach the NuClick server" in capsys.readouterr().err


def test_module_level_segment_takes_the_token_from_the_environment(monkeypatch, crop_pair):
    img, _ = crop_pair
    srv = NuClickServer(engine_for(DiscModel(), "disc"), port=0, http_port=None, token="env-token").start()
    try:
        target = f"127.0.0.1:{srv.grpc_port}"
        with pytest.raises(ServerError, match="missing bearer token"):
            segment(img[:96, :96], [Click(40.5, 40.5, "a")], server=target)
        monkeypatch.setenv("NUCLICK_BRIDGE_TOKEN", "env-token")
        results = segment(img[:96, :96], [Click(40.5, 40.5, "a")], server=target, origin=(10, 20))
        assert results[0].found and results[0].polygon.bounds[0] >= 10
        remote = RemoteSegmenter(NuClickClient.from_env(target))
        seg = remote.segment_tiled(ArrayReader(img), [Click(40.5, 40.5, "a")], max_tile=256, progress=False)
        assert seg.results[0].found and seg.masks == [None]
        remote.close()
    finally:
        srv.stop(grace=1)


def test_plan_tiles_covers_every_click_once_with_everything_its_answer_depends_on():
    rng = np.random.default_rng(0)
    w, h, size, sigma, max_tile = 3000, 2000, 128, 2.0, 600
    xy = np.concatenate([rng.uniform(-50, [w + 50, h + 50], (600, 2)), rng.normal(1500, 60, (150, 2))])
    clicks = [Click(float(x), float(y), str(i)) for i, (x, y) in enumerate(xy)]
    plans = plan_tiles(clicks, w, h, size, sigma, max_tile, max_clicks=165)  # dense enough that some groups are split
    assert len(plans) > len(plan_tiles(clicks, w, h, size, sigma, max_tile, max_clicks=10_000))
    inside = [(0 <= x < w and 0 <= y < h) for x, y in xy]
    members = sorted(k for p in plans for k in p.members)
    assert members == [k for k in range(len(xy)) if inside[k]]  # each on-image click exactly once
    reach = size / 2 + 4 * sigma + 1
    for p in plans:
        assert 0 < p.width <= max_tile and 0 < p.height <= max_tile
        assert p.x0 >= 0 and p.y0 >= 0 and p.x0 + p.width <= w and p.y0 + p.height <= h
        assert len(p.members) + len(p.context) <= 165
        sent = set(p.members) | set(p.context)
        assert not set(p.members) & set(p.context)
        cheb = np.abs(xy[:, None, :] - xy[None, p.members, :]).max(axis=2).min(axis=1)
        overlapping = set(np.nonzero(cheb < size)[0].tolist())
        assert overlapping <= sent
        for k in overlapping:
            if inside[k]:  # its patch is in the tile, up to the image border
                ox, oy = patch_origin(xy[k, 0], xy[k, 1], size)
                assert p.x0 <= max(ox, 0) and min(ox + size, w) <= p.x0 + p.width
                assert p.y0 <= max(oy, 0) and min(oy + size, h) <= p.y0 + p.height
        near = np.abs(xy[:, None, :] - xy[None, sorted(overlapping), :]).max(axis=2).min(axis=1)
        assert set(np.nonzero(near < reach)[0].tolist()) <= sent
