"""ONNX Runtime as the fp32 CPU backend (``--backend auto``, the commands'
default, picks it there; ``--backend onnxruntime`` asks for it).

Most lab computers have no bfloat16 instructions, so they run the network in
fp32, where ONNX Runtime's kernels beat torch's: a user measured 1.2x for
an earlier network on an AVX2-only EPYC, and on our AVX-512 test CPU every
speed measurement since weights version 9c6fc831a321 (2026-11-29) has it ahead end to
end (1.1x to 1.4x; see docs/model-history.md).  In bf16 and on a GPU
torch runs the network.  Same probabilities as torch to within 1e-4.

The network is exported from the loaded (BatchNorm-folded) model, so any
weights file works, the shipped one or one the lab trained; nothing is
downloaded.  The export (one to two seconds) and ONNX Runtime's optimisation
of it (a few tenths) are kept in the on-disk cache of
:mod:`bridge.model.export_cache`, keyed by the weights file's SHA-256 and
everything else the bytes depend on (:func:`export_key`, :func:`optimized_key`):
:func:`load_network` then reads the optimised network instead of loading the
weights into torch, folding and exporting them.  The optimised network holds
kernels chosen for this CPU (ONNX Runtime's NCHWc layout), so its key names
the CPU and the ONNX Runtime version; the export itself is portable (a cache
shared by machines with other CPUs still saves the export).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import logging
import platform
import warnings
from collections.abc import Iterator
from importlib import metadata, util
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bridge import __version__
from bridge.errors import BridgeInputError
from bridge.model.export_cache import ExportCache

if TYPE_CHECKING:
    import torch
    from torch import nn

    from bridge.model.weights import ModelInfo

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnxruntime")
_INSTALL = "the onnxruntime backend needs onnxruntime and onnx: pip install 'nuclick-bridge[engine]'"

# What the export is made of (the cache keys hold these and a hash of this package's model code, so that
# a change to any of them, or to how a weights file is read, makes new entries).
OPSET: int | None = None  # None: torch.onnx.export's default, fixed by the torch version (in the key)
INPUT, OUTPUT = "x", "logits"
DYNAMIC_AXES = {INPUT: {0: "batch"}, OUTPUT: {0: "batch"}}  # any batch size; height, width = the patch size
OPTIMIZATION = "ORT_ENABLE_ALL"

# How often this process exported a network and took one from the cache (tests read these).
STATS = {"exports": 0, "export_hits": 0, "optimized_hits": 0}


def onnxruntime_available() -> bool:
    """Both halves installed: onnx to export, onnxruntime to run.  onnx is
    looked up, not imported: its import alone takes more than half a second
    and a network read from the cache does not need it."""
    try:
        import onnxruntime  # noqa: F401

        return util.find_spec("onnx") is not None
    except (ImportError, ValueError):
        return False


def resolve_backend(backend: str, device: torch.device, precision: str) -> str:
    """The backend asked for (``auto``: ONNX Runtime for fp32 on the CPU when
    it is installed, torch otherwise), or one line on why it cannot run here."""
    if backend not in BACKENDS:
        raise BridgeInputError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if backend == "auto":
        fp32_cpu = device.type == "cpu" and precision == "fp32"
        return "onnxruntime" if fp32_cpu and onnxruntime_available() else "torch"
    if backend == "torch":
        return backend
    if device.type != "cpu":
        raise BridgeInputError("the onnxruntime backend runs on the CPU: use --device cpu, or --backend torch on a GPU")
    if precision != "fp32":
        raise BridgeInputError(
            f"the onnxruntime backend computes in fp32, but the precision is {precision}: use --precision fp32"
        )
    if not onnxruntime_available():
        raise BridgeInputError(_INSTALL)
    return backend


def export_onnx(model: nn.Module, patch_size: int) -> bytes:
    """The fp32 network as ONNX bytes: input ``x`` (batch, 5, patch, patch), output ``logits``."""
    import torch

    buf = io.BytesIO()
    example = torch.zeros(1, 5, patch_size, patch_size)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer notes about the export itself, not about the user's run
        torch.onnx.export(
            model.float().eval(),
            (example,),
            buf,
            input_names=[INPUT],
            output_names=[OUTPUT],
            dynamic_axes=DYNAMIC_AXES,
            opset_version=OPSET,
            dynamo=False,
        )
    STATS["exports"] += 1
    return buf.getvalue()


def _default_threads() -> int:
    import torch

    return torch.get_num_threads()


# The server's inference threads (bridge.service.batching): see one_torch_thread.
INFERENCE_THREAD_PREFIX = "nuclick-batcher"


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Torch's start-up work in one CPU thread: reading the weights, folding, the
    channels-last copies, the export.  These are thousands of small operations, and
    every one that torch splits over its threads waits until all of them have run:
    on 2 cores that other work keeps busy, the shipped network's load_model took
    1.5 s instead of 0.35 s, fold_batchnorm 1.9 s instead of 0.1 s.  The calling
    thread gets its count back afterwards.

    Torch's count is per thread, but a thread takes the process-wide default, which
    set_num_threads also sets, when it first computes: a server's inference thread
    that had not computed yet would keep 1 for good.  So while one is alive (a
    reload of ``serve``'s models) this does nothing."""
    import threading

    import torch

    n = torch.get_num_threads()
    alone = n > 1 and not any(t.name.startswith(INFERENCE_THREAD_PREFIX) for t in threading.enumerate())
    if alone:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if alone:
            torch.set_num_threads(n)


def _session(model: bytes, threads: int | None, optimized: bool = False, save_to: Path | None = None):
    """An ONNX Runtime CPU session for ONNX bytes; ``optimized``: bytes ONNX Runtime
    optimised already (not optimised again); ``save_to``: where it writes its optimised model."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or _default_threads()
    opts.inter_op_num_threads = 1
    level = "ORT_DISABLE_ALL" if optimized else OPTIMIZATION
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    opts.log_severity_level = 3  # errors only: ORT's notes would break the JSON log
    if save_to is not None:
        opts.optimized_model_filepath = str(save_to)
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


class OnnxNetwork:
    """The network as an ONNX Runtime session, called like the torch module:
    an NCHW float32 batch in, logits out (any batch size).

    ``model`` is a torch module (exported here) or ONNX bytes; ``optimized``
    says the bytes are ONNX Runtime's own optimised model (read from the cache);
    ``save_optimized`` asks ONNX Runtime to write that model to a file."""

    def __init__(
        self,
        model: nn.Module | bytes,
        patch_size: int = 128,
        threads: int | None = None,
        *,
        optimized: bool = False,
        save_optimized: Path | None = None,
    ) -> None:
        data = model if isinstance(model, bytes) else export_onnx(model, patch_size)
        self.session = _session(data, threads, optimized, save_optimized)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Logits for a float32 NCHW array."""
        return self.session.run(None, {INPUT: np.ascontiguousarray(batch, dtype=np.float32)})[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        return torch.from_numpy(self.run(x.detach().float().cpu().numpy()))


# ------------------------------------------------------------------ the cache


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "absent"


@functools.cache
def code_hash() -> str:
    """SHA-256 of the source of bridge.model (the networks, reading weights files, folding,
    this export): what turns a weights file into the cached bytes and model info."""
    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        h.update(path.name.encode() + b"\0")
        with contextlib.suppress(OSError):
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def export_key(weights_sha256: str, choice: str) -> dict[str, Any]:
    """Everything the exported bytes (and the model info stored with them) depend on."""
    from bridge.model.weights import ModelInfo

    return {
        "entry": "onnx export",
        "code": code_hash(),
        "weights_sha256": weights_sha256,
        "model": choice,
        "precision": "fp32",
        "batchnorm": "folded",
        "opset": OPSET or "torch default",
        "input": f"{INPUT} float32 (batch, 5, patch, patch), batch dynamic",
        "torch": _version("torch"),
        "onnx": _version("onnx"),
        "nuclick_bridge": __version__,
        "model_info": [f.name for f in dataclasses.fields(ModelInfo)],
    }


@functools.cache
def cpu_identity() -> str:
    """The CPU as ONNX Runtime's kernel choice sees it: vendor, model and
    instruction-set flags of the first processor (Linux), else what platform says."""
    fields: list[str] = [platform.machine()]
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor is enough
                name, _, value = line.partition(":")
                if name.strip() in ("vendor_id", "cpu family", "model", "model name", "flags", "Features", "CPU part"):
                    fields.append(f"{name.strip()}={value.strip()}")
    except OSError:
        fields.append(platform.processor())  # (not on Linux: there it starts a process)
    return hashlib.sha256("\n".join(fields).encode()).hexdigest()[:16]


def optimized_key(export: dict[str, Any]) -> dict[str, Any]:
    """The key of ONNX Runtime's optimised model of the export under ``export``."""
    return {
        **export,
        "entry": "onnxruntime optimized",
        "onnxruntime": _version("onnxruntime"),
        "optimization": OPTIMIZATION,
        "provider": "CPUExecutionProvider",
        "cpu": cpu_identity(),
    }


def _meta(info: ModelInfo) -> dict[str, Any] | None:
    """What the cache stores with a network: its model info, when JSON gives it back
    unchanged (otherwise the network is not cached)."""
    try:
        d = dataclasses.asdict(info)
        return {"info": d} if json.loads(json.dumps(d)) == d else None
    except (TypeError, ValueError):
        return None


def _info(meta: dict[str, Any]) -> ModelInfo | None:
    from bridge.model.weights import ModelInfo

    try:
        return ModelInfo(**meta["info"])
    except (KeyError, TypeError):
        return None


def _optimize_and_store(
    data: bytes, threads: int | None, cache: ExportCache, key: dict[str, Any], meta: dict[str, Any]
) -> OnnxNetwork:
    """A session for exported bytes, storing ONNX Runtime's optimised model on the way."""
    tmp = cache.temp_path(".onnx")
    if tmp is None:
        return OnnxNetwork(data, threads=threads)
    try:
        net = OnnxNetwork(data, threads=threads, save_optimized=tmp)
        optimized = tmp.read_bytes()
    except Exception as exc:  # ONNX Runtime could not write it: run without
        log.debug("cache: ONNX Runtime's optimised model was not stored: %s", exc)
        return OnnxNetwork(data, threads=threads)
    finally:
        cache.discard(tmp)
    if optimized:
        cache.store(key, optimized, meta)
    return net


def load_network(
    weights: str | Path | None = None, choice: str = "accurate", threads: int | None = None
) -> tuple[OnnxNetwork, ModelInfo]:
    """The network of a weights file (default: the shipped one) as an ONNX
    Runtime session, and its model info, as ``load_model`` then folding and
    exporting would give them, read from the cache when it holds them."""
    from bridge.model.fusion import fold_batchnorm
    from bridge.model.weights import default_weights_path, file_sha256, load_model

    path = Path(weights) if weights is not None else default_weights_path()
    threads = threads or _default_threads()  # before one_torch_thread(), which would make it 1
    cache = ExportCache.from_env()
    if cache is not None and path.is_file():
        try:
            sha = file_sha256(path)
        except OSError:
            sha = None
        if sha is not None:
            exported = export_key(sha, choice)
            optimized = optimized_key(exported)
            hit = cache.load(optimized)
            info = _info(hit[0]) if hit else None
            if info is not None:
                try:
                    net = OnnxNetwork(hit[1], threads=threads, optimized=True)
                except Exception as exc:  # ONNX Runtime refuses it after all: build it again
                    cache.reject(optimized, f"ONNX Runtime cannot load it ({exc})")
                else:
                    STATS["optimized_hits"] += 1
                    return net, info
            hit = cache.load(exported)
            info = _info(hit[0]) if hit else None
            if info is not None:
                try:
                    net = _optimize_and_store(hit[1], threads, cache, optimized, hit[0])
                except Exception as exc:
                    cache.reject(exported, f"ONNX Runtime cannot load it ({exc})")
                else:
                    STATS["export_hits"] += 1
                    return net, info
    with one_torch_thread():
        model, info = load_model(weights, choice)
        data = export_onnx(fold_batchnorm(model), info.patch_size)
    meta = _meta(info)
    if cache is None or meta is None:
        return OnnxNetwork(data, threads=threads), info
    exported = export_key(info.sha256, choice)  # the bytes torch read, whatever the file holds now
    cache.store(exported, data, meta)
    return _optimize_and_store(data, threads, cache, optimized_key(exported), meta), info
