"""The NuClick inference engine: one 128x128 patch per click, batched through
the network, post-processed per patch, overlaps resolved, polygons out.

The engine reads pixels through a ``RegionReader`` (only around the clicks)
and knows nothing about QuPath, OMERO or the network protocol.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from scipy.spatial import cKDTree
from tqdm import tqdm

from bridge.coords import patch_origin, pixel_of, to_local
from bridge.errors import BridgeInputError
from bridge.guidance import guidance_pair
from bridge.imageio import RegionReader
from bridge.model.network import NuClickNet
from bridge.model.weights import ModelInfo, load_model, resolve_device
from bridge.postprocess import PatchMask, clean_patch
from bridge.results import Click
from bridge.segmentation import PatchSegmenter, valid_window


def build_inputs(
    reader: RegionReader,
    xy: np.ndarray,
    tree: cKDTree,
    all_xy: np.ndarray,
    indices: Sequence[int],
    size: int,
    sigma: float,
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """(B, 5, size, size) float32 network inputs for the clicks ``indices``:
    RGB in [0, 1] (zero outside the image), inclusion map, exclusion map of
    every other click that falls in the patch."""
    batch = np.zeros((len(indices), 5, size, size), dtype=np.float32)
    origins = []
    reach = size / 2 + 4 * sigma + 1
    for b, k in enumerate(indices):
        ox, oy = patch_origin(xy[k, 0], xy[k, 1], size)
        origins.append((ox, oy))
        rgb = reader.read_region(ox, oy, size, size)
        batch[b, :3] = rgb.transpose(2, 0, 1).astype(np.float32) / 255.0
        near = [j for j in tree.query_ball_point(xy[k], r=reach, p=np.inf) if j != k]
        local = to_local(all_xy[near], (ox, oy)) if near else np.zeros((0, 2))
        batch[b, 3:] = guidance_pair(to_local(xy[k], (ox, oy)), local, size, sigma)
    return batch, origins


class NuClickEngine(PatchSegmenter):
    """Batched NuClick inference on CPU or CUDA.

    Build it with :meth:`load` (shipped or given weights) or directly from a
    network (tests use a randomly initialised one).
    """

    def __init__(
        self,
        model: NuClickNet,
        info: ModelInfo,
        device: str | torch.device = "auto",
        batch_size: int = 32,
        threshold: float | None = None,
        min_size: int = 10,
        simplify_tolerance: float = 0.5,
    ) -> None:
        if batch_size < 1:
            raise BridgeInputError("batch size must be at least 1")
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.model = model.to(self.device).eval()
        self.info = info
        self.batch_size = batch_size
        self.threshold = info.threshold if threshold is None else threshold
        self.min_size = min_size
        self.tolerance = simplify_tolerance
        self.patch_size = info.patch_size
        self.sigma = self.guidance_sigma = info.sigma

    @classmethod
    def load(cls, weights: str | Path | None = None, device: str = "auto", **kwargs) -> NuClickEngine:
        model, info = load_model(weights)
        return cls(model, info, device=device, **kwargs)

    @torch.inference_mode()
    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities (B, size, size) for network inputs (B, 5, size, size)."""
        x = torch.from_numpy(batch).to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.float16):
                logits = self.model(x)
        else:
            logits = self.model(x)
        return torch.sigmoid(logits.float())[:, 0].cpu().numpy()

    def iter_patches(
        self, reader: RegionReader, clicks: Sequence[Click], indices: Sequence[int], progress: bool = False
    ) -> Iterator[tuple[int, PatchMask]]:
        """(click index, cleaned patch mask) for ``indices``, batch by batch;
        every click in ``clicks`` contributes to the exclusion maps."""
        size = self.patch_size
        xy = np.array([[c.x, c.y] for c in clicks], dtype=np.float64).reshape(-1, 2)
        tree = cKDTree(xy) if len(xy) else None
        bar = tqdm(total=len(indices), desc="nuclei", unit="nuc", disable=not progress, leave=False)
        for start in range(0, len(indices), self.batch_size):
            chunk = list(indices[start : start + self.batch_size])
            batch, origins = build_inputs(reader, xy, tree, xy, chunk, size, self.sigma)
            probs = self.predict(batch)
            for k, origin, prob in zip(chunk, origins, probs, strict=True):
                col, row = pixel_of(xy[k, 0], xy[k, 1])
                seed = (row - origin[1], col - origin[0])
                valid = valid_window(origin, size, reader.width, reader.height)
                mask = clean_patch(prob, seed, self.threshold, self.min_size, valid)
                yield k, PatchMask(origin, mask, prob.astype(np.float32), seed)
            bar.update(len(chunk))
        bar.close()
