"""The NuClick inference engine: one 128x128 patch per click, batched through
the network, post-processed per patch, overlaps resolved, polygons out.

The engine reads pixels through a ``RegionReader`` (only around the clicks)
and knows nothing about QuPath, OMERO or the network protocol.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import partial
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from bridge.errors import BridgeInputError
from bridge.io.coords import to_local
from bridge.io.imageio import RegionReader
from bridge.model.fusion import fold_batchnorm
from bridge.model.onnxrt import OnnxNetwork, load_network, one_torch_thread, resolve_backend
from bridge.model.precision import as_input, autocast, prepare, resolve_precision
from bridge.model.weights import ModelInfo, load_model, resolve_device
from bridge.nuclick.guidance import guidance_pair
from bridge.nuclick.postprocess import MIN_OBJECT_PX, PatchMask, clean_patch
from bridge.nuclick.segmentation import ClickPatch, PatchSegmenter
from bridge.results import Click

# Test-time augmentation: the square's eight symmetries as (flipped dims,
# then transposed?); the guidance maps turn with the image, so every view is a
# valid NuClick input.  The first 1, 2 or 4 are what --tta 1/2/4 use.
_SYMMETRIES: list[tuple[tuple[int, ...], bool]] = [
    ((), False),
    ((3,), False),
    ((2,), False),
    ((2, 3), False),
    ((), True),
    ((3,), True),
    ((2,), True),
    ((2, 3), True),
]


def _view(t: torch.Tensor, flips: tuple[int, ...], swap: bool) -> torch.Tensor:
    t = torch.flip(t, flips) if flips else t
    return t.transpose(2, 3) if swap else t


def _undo(t: torch.Tensor, flips: tuple[int, ...], swap: bool) -> torch.Tensor:
    t = t.transpose(2, 3) if swap else t
    return torch.flip(t, flips) if flips else t


_VIEWS = [(partial(_view, flips=f, swap=s), partial(_undo, flips=f, swap=s)) for f, s in _SYMMETRIES]
TTA_VIEWS = {n: _VIEWS[:n] for n in (1, 2, 4, 8)}


def build_inputs(patches: Sequence[ClickPatch], size: int, sigma: float) -> np.ndarray:
    """(B, 5, size, size) float32 network inputs: RGB in [0, 1] (zero outside
    the image), inclusion map of the click, exclusion map of its neighbours."""
    batch = np.zeros((len(patches), 5, size, size), dtype=np.float32)
    for b, cp in enumerate(patches):
        batch[b, :3] = cp.rgb.transpose(2, 0, 1).astype(np.float32) / 255.0
        batch[b, 3:] = guidance_pair(to_local(cp.xy, cp.origin), to_local(cp.neighbours, cp.origin), size, sigma)
    return batch


class NuClickEngine(PatchSegmenter):
    """Batched NuClick inference on CPU or CUDA, in half precision where the
    hardware has it (see :mod:`bridge.model.precision`), or through ONNX
    Runtime in fp32 on the CPU when asked (see :mod:`bridge.model.onnxrt`).

    Build it with :meth:`load` (shipped or given weights) or directly from a
    network (tests use a randomly initialised one).
    """

    def __init__(
        self,
        model: nn.Module,
        info: ModelInfo,
        device: str | torch.device = "auto",
        batch_size: int = 32,
        threshold: float | None = None,
        min_size: int = MIN_OBJECT_PX,
        simplify_tolerance: float = 0.5,
        precision: str = "auto",
        tta: int = 1,
        backend: str = "torch",
        threads: int = 0,
        network: OnnxNetwork | None = None,
    ) -> None:
        if batch_size < 1:
            raise BridgeInputError("batch size must be at least 1")
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        if tta not in TTA_VIEWS:
            raise BridgeInputError(f"test-time augmentation takes 1, 2, 4 or 8 views, not {tta}")
        self.tta = tta
        self.precision = resolve_precision(precision, self.device)
        self.backend = resolve_backend(backend, self.device, self.precision)
        if network is not None:  # the network load() built (bridge.model.onnxrt.load_network, maybe cached)
            if self.backend != "onnxruntime":
                raise BridgeInputError(f"a prebuilt ONNX Runtime network cannot run on the {self.backend} backend")
            self.model = network
        elif self.backend == "onnxruntime":
            # BatchNorm folded into the convolutions (same outputs, less work), exported;
            # threads: ONNX Runtime's CPU threads (0: as many as torch uses)
            self.model = OnnxNetwork(fold_batchnorm(model), info.patch_size, threads or None)
        else:
            self.model = prepare(fold_batchnorm(model), self.device)
        self.info = info
        self.batch_size = batch_size
        self.threshold = info.threshold if threshold is None else threshold
        self.min_size = min_size
        self.tolerance = simplify_tolerance
        self.patch_size = info.patch_size
        self.guidance_sigma = info.sigma

    @classmethod
    def load(
        cls, weights: str | Path | None = None, device: str = "auto", model: str = "accurate", **kwargs
    ) -> NuClickEngine:
        """The engine for a weights file (default: the shipped one); ``model``
        is ``--model``: accurate (the whole file) or fast (see load_model).

        Where the network will run on ONNX Runtime (fp32 on the CPU), it comes
        from :func:`bridge.model.onnxrt.load_network`: from the on-disk cache of
        exported networks when that holds these weights, without loading them
        into torch."""
        try:
            dev = resolve_device(device)
            backend = resolve_backend(
                kwargs.get("backend", "torch"), dev, resolve_precision(kwargs.get("precision", "auto"), dev)
            )
        except BridgeInputError:  # the constructor says why, after the weights file was checked (as before)
            dev, backend = device, None
        if backend == "onnxruntime":
            network, info = load_network(weights, model, kwargs.get("threads", 0) or None)
            return cls(None, info, device=dev, network=network, **kwargs)
        with one_torch_thread():  # loading, folding, channels-last copies: see one_torch_thread
            net, info = load_model(weights, model)
            return cls(net, info, device=dev, **kwargs)

    @torch.inference_mode()
    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities (B, size, size) for network inputs (B, 5, size, size)."""
        x = as_input(torch.from_numpy(batch), self.device)
        prob = torch.zeros(x.shape[0], x.shape[2], x.shape[3], device=self.device)
        for view, undo in TTA_VIEWS[self.tta]:
            with autocast(self.device, self.precision):
                logits = self.model(view(x))
            prob += undo(torch.sigmoid(logits.float()))[:, 0]
        return (prob / self.tta).cpu().numpy()

    def iter_patches(
        self, reader: RegionReader, clicks: Sequence[Click], indices: Sequence[int], progress: bool = False
    ) -> Iterator[tuple[int, PatchMask]]:
        """(click index, cleaned patch mask) for ``indices``, batch by batch;
        every click in ``clicks`` contributes to the exclusion maps."""
        patches = self.click_patches(reader, clicks, indices)
        bar = tqdm(total=len(indices), desc="nuclei", unit="nuc", disable=not progress, leave=False)
        while chunk := list(islice(patches, self.batch_size)):
            probs = self.predict(build_inputs(chunk, self.patch_size, self.guidance_sigma))
            for cp, prob in zip(chunk, probs, strict=True):
                mask = clean_patch(prob, cp.seed, self.threshold, self.min_size, cp.valid)
                yield cp.index, PatchMask(cp.origin, mask, prob.astype(np.float32), cp.seed)
            bar.update(len(chunk))
        bar.close()
