"""Real networks with known behaviour, for the service's tests.

They are genuine ``torch.nn.Module``s run by the real engine, batcher and
server; only their weights are not learned, so that tests can check
geometry (a disc of known radius around each click) instead of accuracy.
They live under tests/ because they are test doubles, not product code.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import torch

from bridge.model.weights import ModelInfo
from bridge.nuclick.engine import NuClickEngine


class Gate:
    """A forward pass that waits until the test opens it: the test, not the
    clock, decides what is queued while the device is busy.  Shared (not
    copied) when the engine copies the model to fold its BatchNorm."""

    def __init__(self) -> None:
        self.opened = threading.Event()
        self.entered = threading.Event()  # a forward pass is waiting at the gate

    def wait(self) -> None:
        self.entered.set()
        if not self.opened.wait(60):
            raise TimeoutError("the test never opened the gate")

    def __deepcopy__(self, memo: dict) -> Gate:
        return self


class DiscModel(torch.nn.Module):
    """Logits positive within ~``radius`` model pixels of the inclusion peak."""

    def __init__(self, radius: float = 5.0, sigma: float = 2.0, delay_s: float = 0.0, gate: Gate | None = None) -> None:
        super().__init__()
        self.level = float(np.exp(-(radius**2) / (2 * sigma**2)))
        self.delay_s = delay_s
        self.gate = gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is not None:
            self.gate.wait()
        if self.delay_s:
            time.sleep(self.delay_s)  # a slow device, for cancellation and shutdown tests
        return 50.0 * (x[:, 3:4] - self.level)


class TextureModel(torch.nn.Module):
    """A disc that the image and the neighbours' exclusion maps bend: nuclei
    touch and overlap, and every probability depends on the pixels, as with
    a trained network (a fixed random convolution, seeded)."""

    def __init__(self, radius: float = 9.0, sigma: float = 2.0, seed: int = 0) -> None:
        super().__init__()
        self.level = float(np.exp(-(radius**2) / (2 * sigma**2)))
        gen = torch.Generator().manual_seed(seed)
        self.conv = torch.nn.Conv2d(3, 1, 5, padding=2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=gen) * 0.3)
            self.conv.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        incl = torch.nn.functional.avg_pool2d(x[:, 3:4], 9, stride=1, padding=4) * 20
        return 30.0 * (x[:, 3:4] - self.level) + incl - 20.0 * x[:, 4:5] + self.conv(x[:, :3])


def engine_for(model: torch.nn.Module, name: str = "test", pixel_size_um: float = 0.25, **kw) -> NuClickEngine:
    info = ModelInfo(name, "test", "", 0.0, pixel_size_um=pixel_size_um)
    return NuClickEngine(model, info, device="cpu", **kw)
