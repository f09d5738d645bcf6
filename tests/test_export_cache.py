"""The on-disk cache of exported ONNX networks (bridge.model.export_cache,
bridge.model.onnxrt.load_network): reused for the same weights, rebuilt for
other weights, a corrupt file rebuilt with one warning and never used, no
cache where none can be written; and the cached network computes the freshly
exported one's probabilities on a real patch.

Every test uses the real shipped weights and its own cache folder
(``NUCLICK_BRIDGE_CACHE``); what was exported is read from the counters of
bridge.model.onnxrt and the cache files' inodes, not from timings."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from bridge.evaluation.clicks import simulate_clicks
from bridge.io.imageio import ArrayReader
from bridge.model import onnxrt
from bridge.model.export_cache import ExportCache, cache_root, unpack
from bridge.model.onnxrt import export_key, load_network, optimized_key
from bridge.model.weights import default_weights_path, derived_meta, file_sha256, load_model, save_weights
from bridge.nuclick.engine import NuClickEngine
from bridge.results import Click

CACHE_LOG = "bridge.model.export_cache"
FP32_ONNX = {"device": "cpu", "precision": "fp32", "backend": "onnxruntime"}


def entries(root: Path, weights: Path | None = None, choice: str = "accurate") -> tuple[Path, Path]:
    """The files of the export and of ONNX Runtime's optimised model for ``weights``."""
    cache = ExportCache(root / "onnx")
    key = export_key(file_sha256(weights or default_weights_path()), choice)
    return cache.path(key), cache.path(optimized_key(key))


def identity(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def counts() -> dict[str, int]:
    return dict(onnxrt.STATS)


def added(before: dict[str, int]) -> dict[str, int]:
    return {k: v - before[k] for k, v in onnxrt.STATS.items()}


@pytest.fixture(scope="module")
def warm(tmp_path_factory) -> Path:
    """A cache that holds the shipped weights' network (accurate), made by a first load."""
    root = tmp_path_factory.mktemp("warm")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NUCLICK_BRIDGE_CACHE", str(root))
        before = counts()
        load_network(None, "accurate")
        assert added(before)["exports"] == 1
    assert all(p.is_file() for p in entries(root))
    return root


@pytest.fixture
def cache(warm, tmp_path, monkeypatch) -> Path:
    """This test's own copy of the warm cache."""
    root = tmp_path / "cache"
    shutil.copytree(warm, root)
    monkeypatch.setenv("NUCLICK_BRIDGE_CACHE", str(root))
    return root


@pytest.fixture(scope="module")
def real_clicks(crop_pair) -> tuple[np.ndarray, list[Click]]:
    img, lab = crop_pair
    xy, _ = simulate_clicks(lab, jitter=5, seed=0)
    return img, [Click(float(x), float(y)) for x, y in xy[:24]]


@pytest.fixture(scope="module")
def fresh_probs(real_clicks) -> dict[int, np.ndarray]:
    """Probabilities of the network exported in memory, as before the cache (no cache involved)."""
    model, info = load_model(None, "accurate")
    engine = NuClickEngine(model, info, **FP32_ONNX)
    return probabilities(engine, *real_clicks)


def probabilities(engine: NuClickEngine, img: np.ndarray, clicks: list[Click]) -> dict[int, np.ndarray]:
    return {i: p.prob for i, p in engine.iter_patches(ArrayReader(img), clicks, range(len(clicks)))}


def assert_same_probabilities(engine: NuClickEngine, real_clicks, fresh_probs) -> None:
    probs = probabilities(engine, *real_clicks)
    assert probs.keys() == fresh_probs.keys() and len(probs) == len(real_clicks[1])
    worst = max(float(np.abs(probs[i] - fresh_probs[i]).max()) for i in probs)
    assert worst < 1e-5, worst


def test_the_same_weights_are_read_from_the_cache_without_an_export(cache, real_clicks, fresh_probs):
    exported, optimized = entries(cache)
    files = {p: identity(p) for p in (exported, optimized)}
    before = counts()
    engine = NuClickEngine.load(**FP32_ONNX)
    assert added(before) == {"exports": 0, "export_hits": 0, "optimized_hits": 1}
    assert {p: identity(p)[0] for p in files} == {p: ino for p, (ino, _) in files.items()}  # nothing written
    assert engine.backend == "onnxruntime"
    assert engine.info == load_model(None, "accurate")[1]
    assert_same_probabilities(engine, real_clicks, fresh_probs)


def test_the_export_alone_gives_the_same_network_and_the_optimised_model_is_stored_again(
    cache, real_clicks, fresh_probs
):
    optimized = entries(cache)[1]
    optimized.unlink()  # e.g. a cache made on another CPU: the export is portable, the optimised model is not
    before = counts()
    engine = NuClickEngine.load(**FP32_ONNX)
    assert added(before) == {"exports": 0, "export_hits": 1, "optimized_hits": 0}
    assert optimized.is_file()
    assert_same_probabilities(engine, real_clicks, fresh_probs)


def test_other_weights_are_exported_and_the_same_bytes_elsewhere_are_not(cache, tmp_path):
    weights = tmp_path / "w.pt"
    shutil.copyfile(default_weights_path(), weights)
    before = counts()
    _, info = load_network(weights, "accurate")  # same bytes as the shipped file: keyed by content, not path
    assert added(before)["exports"] == 0 and info.version == load_model(None)[1].version

    model, base = load_model(None, "accurate")
    save_weights(weights, model, derived_meta(base, version="test-2"))  # the same path now holds a new version
    before = counts()
    _, info = load_network(weights, "accurate")
    assert added(before)["exports"] == 1 and info.version == "test-2" and info.sha256 == file_sha256(weights)
    assert all(p.is_file() for p in entries(cache, weights))
    before = counts()
    assert load_network(weights, "accurate")[1] == info
    assert load_network(None, "accurate")[1].version == base.version  # the shipped file's entry is still there
    assert added(before) == {"exports": 0, "export_hits": 0, "optimized_hits": 2}


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _garbage(data: bytes) -> bytes:
    mid = len(data) // 2
    return data[:mid] + np.random.default_rng(0).bytes(4096) + data[mid + 4096 :]


def _one_byte(data: bytes) -> bytes:
    return data[:-100] + bytes([data[-100] ^ 1]) + data[-99:]


@pytest.mark.parametrize(
    "corrupt",
    [_truncated, _garbage, _one_byte, lambda data: b"", lambda data: os.urandom(1000)],
    ids=["truncated", "garbage bytes", "one byte changed", "empty", "random"],
)
def test_a_corrupt_optimised_model_is_built_again_with_one_warning_and_never_used(
    cache, corrupt, caplog, real_clicks, fresh_probs
):
    optimized = entries(cache)[1]
    optimized.write_bytes(corrupt(optimized.read_bytes()))
    before = counts()
    with caplog.at_level(logging.WARNING, logger=CACHE_LOG):
        engine = NuClickEngine.load(**FP32_ONNX)
    warnings = [r for r in caplog.records if r.name == CACHE_LOG]
    assert len(warnings) == 1 and str(optimized) in warnings[0].getMessage(), warnings
    assert added(before) == {"exports": 0, "export_hits": 1, "optimized_hits": 0}  # built from the export
    assert_same_probabilities(engine, real_clicks, fresh_probs)
    unpack(optimized.read_bytes(), optimized_key(export_key(file_sha256(default_weights_path()), "accurate")))


def test_both_files_corrupt_means_a_new_export_and_a_file_of_another_entry_is_not_used(
    cache, caplog, real_clicks, fresh_probs
):
    exported, optimized = entries(cache)
    optimized.write_bytes(exported.read_bytes())  # a whole, valid cache file, but of another key
    exported.write_bytes(_truncated(exported.read_bytes()))
    before = counts()
    with caplog.at_level(logging.WARNING, logger=CACHE_LOG):
        engine = NuClickEngine.load(**FP32_ONNX)
    messages = [r.getMessage() for r in caplog.records if r.name == CACHE_LOG]
    assert len(messages) == 2, messages
    assert str(optimized) in messages[0] and "another entry" in messages[0]
    assert str(exported) in messages[1] and "truncated" in messages[1]
    assert added(before) == {"exports": 1, "export_hits": 0, "optimized_hits": 0}
    assert_same_probabilities(engine, real_clicks, fresh_probs)
    before = counts()
    NuClickEngine.load(**FP32_ONNX)
    assert added(before)["optimized_hits"] == 1


def test_a_cache_that_cannot_be_written_is_no_cache_and_no_error(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would go")
    monkeypatch.setenv("NUCLICK_BRIDGE_CACHE", str(blocker))
    for _ in range(2):
        before = counts()
        with caplog.at_level(logging.WARNING):
            net, info = load_network(None, "fast")
        assert added(before) == {"exports": 1, "export_hits": 0, "optimized_hits": 0}
    assert not caplog.records
    assert info.extra["model"] == "fast" and net.run(np.zeros((2, 5, 128, 128), np.float32)).shape == (2, 1, 128, 128)


def test_the_cli_reads_the_cache(cache, tmp_path, cli, crop_pair):
    from PIL import Image

    Image.fromarray(crop_pair[0]).save(tmp_path / "c.png")
    (tmp_path / "c.csv").write_text("x,y\n100,100\n")
    before = counts()
    files = [identity(p)[0] for p in entries(cache)]
    args = ("segment", tmp_path / "c.png", "--points", tmp_path / "c.csv", "--out", tmp_path / "o.geojson")
    proc = cli(*args, "--precision", "fp32", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert added(before) == {"exports": 0, "export_hits": 0, "optimized_hits": 1}
    assert [identity(p)[0] for p in entries(cache)] == files


def test_where_the_cache_lives(monkeypatch, tmp_path):
    monkeypatch.delenv("NUCLICK_BRIDGE_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_root() == tmp_path / "home" / ".cache" / "nuclick-bridge"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert cache_root() == tmp_path / "home" / ".cache" / "nuclick-bridge"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "nuclick-bridge"
    assert ExportCache.from_env().folder == tmp_path / "xdg" / "nuclick-bridge" / "onnx"
    monkeypatch.setenv("NUCLICK_BRIDGE_CACHE", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"
    monkeypatch.setenv("NUCLICK_BRIDGE_CACHE", "off")
    assert cache_root() is None and ExportCache.from_env() is None


def test_keys_name_what_the_bytes_depend_on(monkeypatch):
    key = export_key("0" * 64, "accurate")
    assert key != export_key("0" * 64, "fast") and key != export_key("1" * 64, "accurate")
    assert {"torch", "onnx", "opset", "precision", "input", "code", "weights_sha256", "model"} <= key.keys()
    assert "onnxruntime" not in key and "cpu" not in key  # the export is portable
    opt = optimized_key(key)
    assert {"onnxruntime", "cpu", "optimization"} <= opt.keys()
    cache = ExportCache("/nowhere")
    assert len({cache.path(key), cache.path(opt), cache.path(export_key("0" * 64, "fast"))}) == 3
    monkeypatch.setattr(onnxrt, "_version", lambda dist: "99.0" if dist == "torch" else "1.0")
    assert cache.path(export_key("0" * 64, "accurate")) != cache.path(key)  # another torch: another entry


def test_the_least_recently_used_entries_go_beyond_the_size_limit(tmp_path):
    cache = ExportCache(tmp_path)
    keys = [{"n": i} for i in range(4)]
    for i, key in enumerate(keys):
        assert cache.store(key, bytes(1000), {})
        os.utime(cache.path(key), (1000 + i, 1000 + i))
    assert cache.load(keys[0]) is not None  # used now: the newest
    cache.prune(max_bytes=2 * 1200)
    assert [cache.path(k).exists() for k in keys] == [True, False, False, True]
    assert not list(tmp_path.glob(".tmp-*"))


@pytest.mark.parametrize("server_running", [False, True])
def test_start_up_work_runs_in_one_torch_thread_unless_a_server_computes(monkeypatch, server_running):
    """Reading and folding the weights in one thread (each of their small operations waits for all
    of torch's threads otherwise); not while a server's inference threads, which take torch's
    process-wide count when they first compute, are alive; the count is given back."""
    import threading

    import torch

    from bridge.nuclick import engine as engine_module

    seen = []

    def load_model_watched(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return load_model(*args, **kwargs)

    monkeypatch.setattr(engine_module, "load_model", load_model_watched)
    before = torch.get_num_threads()
    stop = threading.Event()
    inference = threading.Thread(target=stop.wait, name=onnxrt.INFERENCE_THREAD_PREFIX + "-test", daemon=True)
    try:
        torch.set_num_threads(2)
        if server_running:
            inference.start()
        NuClickEngine.load(device="cpu", precision="fp32", backend="torch")
        assert seen == [2 if server_running else 1]
        assert torch.get_num_threads() == 2
    finally:
        stop.set()
        torch.set_num_threads(before)
