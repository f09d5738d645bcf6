"""ONNX Runtime as the fp32 CPU backend (``--backend auto``, the commands'
default, picks it there; ``--backend onnxruntime`` asks for it).

Most lab computers have no bfloat16 instructions, so they run the network in
fp32, where ONNX Runtime's kernels beat torch's: a user measured 1.2x for
an earlier network on an AVX2-only EPYC, and on our AVX-512 test CPU every
speed measurement since weights version 9c6fc831a321 (2026-11-29) has it ahead end to
end (1.1x to 1.4x; see docs/model-history.md).  In bf16 and on a GPU
torch runs the network.  Same probabilities as torch to within 1e-4.

The network is exported from the loaded (BatchNorm-folded) model in memory
when the engine starts (about a second), so any weights file works, the
shipped one or one the lab trained; nothing is written to disk and nothing is
downloaded.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from torch import nn

from bridge.errors import BridgeInputError

BACKENDS = ("auto", "torch", "onnxruntime")
_INSTALL = "the onnxruntime backend needs onnxruntime and onnx: pip install 'nuclick-bridge[engine]'"


def onnxruntime_available() -> bool:
    """Both halves importable: onnx to export, onnxruntime to run."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


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


class OnnxNetwork:
    """The network as an ONNX Runtime session, called like the torch module:
    an NCHW float32 batch in, logits out (any batch size)."""

    def __init__(self, model: nn.Module, patch_size: int, threads: int | None = None) -> None:
        import onnxruntime as ort

        buf = io.BytesIO()
        example = torch.zeros(1, 5, patch_size, patch_size)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer notes about the export itself, not about the user's run
            torch.onnx.export(
                model.float().eval(),
                (example,),
                buf,
                input_names=["x"],
                output_names=["logits"],
                dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
                dynamo=False,
            )
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3  # errors only: ORT's notes would break the JSON log
        self.session = ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        batch = np.ascontiguousarray(x.detach().float().cpu().numpy())
        return torch.from_numpy(self.session.run(None, {"x": batch})[0])
