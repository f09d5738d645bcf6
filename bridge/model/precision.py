"""Numeric precision of the network, chosen in one place for inference and
training.

Half precision is where the speed is: on a CPU with bfloat16 instructions
(AVX512-BF16 or AMX) bf16 autocast with channels-last memory runs the shipped
network about 4.5x faster than fp32, and on a CUDA GPU fp16 autocast uses the
tensor cores.  On a CPU without bf16 instructions autocast would be slower,
so ``auto`` falls back to fp32 there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from bridge.errors import BridgeInputError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def cpu_has_bf16() -> bool:
    """True when oneDNN runs bf16 convolutions natively on this CPU."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device, training: bool = False) -> str:
    """``auto`` -> fp16 on CUDA (bf16 when training, which needs no loss
    scaling), bf16 on a CPU that has it, else fp32."""
    if precision not in PRECISIONS:
        raise BridgeInputError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if training else "fp16"
        return "bf16" if cpu_has_bf16() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise BridgeInputError("fp16 needs a CUDA GPU; on a CPU use bf16 or fp32")
    if precision == "fp16" and training:
        raise BridgeInputError("train with bf16 or fp32; fp16 training would need loss scaling")
    return precision


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """Autocast for a resolved precision (a no-op for fp32)."""
    if precision == "fp32":
        yield
        return
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    with torch.autocast(device.type, dtype=dtype):
        yield


def prepare(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Move ``model`` to ``device`` in the memory layout that is fastest there
    (channels-last: faster on CPU in every precision we measured, and what
    CUDA tensor cores want)."""
    return model.to(device=device, memory_format=torch.channels_last)


def as_input(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """An NCHW batch on ``device`` in the same channels-last layout."""
    return x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
