"""Training samples, as in the NuClick paper: one patch centred near every
annotated nucleus; clicks jittered and guidance maps rebuilt from the
augmented ground truth at every iteration; a weight map that puts 10x on
neighbouring nuclei."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from bridge.evaluation.clicks import click_in_mask, instance_slices
from bridge.evaluation.datasets import LabelledImage
from bridge.nuclick.guidance import gaussian_map
from bridge.nuclick.postprocess import MIN_OBJECT_PX
from bridge.nuclick.segmentation import valid_window
from bridge.train.augment import AUGMENT_POLICIES, colour, crop_padded, geometric, resize_to

NEIGHBOUR_WEIGHT = 10.0


def sample_index(images: list[LabelledImage]) -> np.ndarray:
    """(K, 4) int rows (image index, instance id, centroid row, centroid col)
    for every nucleus of at least ``MIN_OBJECT_PX`` pixels (of an image's
    ``targets`` where it names them).

    Nuclei cut by the image border are targets too, as their visible part:
    users click them, and evaluation scores them (a quarter of CoNSeP's tile
    nuclei touch a tile edge).  Leaving them out taught the network nothing
    about a nucleus that runs into the zero padding, and it missed 45% of them.
    """
    rows = []
    for i, item in enumerate(images):
        for inst, (sr, sc) in instance_slices(item.labels).items():
            if item.targets is not None and inst not in item.targets:
                continue
            rr, cc = np.nonzero(item.labels[sr, sc] == inst)
            if len(rr) < MIN_OBJECT_PX:
                continue
            rows.append((i, inst, int(rr.mean()) + sr.start, int(cc.mean()) + sc.start))
    return np.asarray(rows, dtype=np.int64).reshape(-1, 4)


class NucleusPatches(Dataset):
    """Yields (inputs (5, S, S) float32, target (1, S, S), weights (1, S, S))."""

    def __init__(
        self,
        images: list[LabelledImage],
        size: int = 128,
        sigma: float = 2.0,
        jitter: float = 5.0,
        augment: bool = True,
        drop_neighbour: float = 0.1,
        seed: int = 0,
        policy: str = "standard",
    ) -> None:
        self.images = images
        self.index = sample_index(images)
        self.size, self.sigma, self.jitter = size, sigma, jitter
        self.augment, self.drop_neighbour = augment, drop_neighbour
        self.seed = seed
        self.policy = AUGMENT_POLICIES[policy]
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.index)

    def sample(self, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        img_i, inst, cr, cc = (int(v) for v in self.index[k])
        item = self.images[img_i]
        S = self.size
        scale = self.policy.draw_scale(rng) if self.augment else 1.0
        win = round(S * scale)
        shift = rng.uniform(-self.jitter, self.jitter, 2) if self.augment else np.zeros(2)
        x0 = round(cc + shift[0]) - win // 2
        y0 = round(cr + shift[1]) - win // 2
        # A fourth channel marks real pixels (inference's own rule), so that the padding
        # outside the image stays exactly zero through resizing and colour jitter.
        # A fifth marks the pixels whose truth is known (a lab's partial labels).
        H, W = item.labels.shape
        inside = valid_window((x0, y0), win, W, H).astype(np.uint8) * 255
        known = inside if item.known is None else crop_padded(item.known.astype(np.uint8) * 255, x0, y0, win, win)
        image = np.dstack([crop_padded(item.image, x0, y0, win, win), inside, known])
        labels = crop_padded(item.labels, x0, y0, win, win)
        image, labels = resize_to(image, labels, S)
        if self.augment:
            image, labels = geometric(image, labels, rng)
        valid = image[..., 3] >= 128
        known = valid if item.known is None else image[..., 4] >= 128
        image = colour(image[..., :3], rng, self.policy) if self.augment else image[..., :3]
        image = np.where(valid[..., None], image, 0)
        labels = np.where(valid, labels, 0)
        target = labels == inst
        if not target.any():  # scaled away entirely: fall back to the plain crop
            return self.sample_plain(k, rng)
        slices = instance_slices(labels)
        click = None
        neighbours = []
        for j, (sr, sc) in slices.items():
            m = labels[sr, sc] == j
            pt = click_in_mask(m, (sr.start, sc.start), self.jitter, rng)
            if j == inst:
                click = pt
            elif rng.random() >= self.drop_neighbour:
                neighbours.append(pt)
        x = np.empty((5, S, S), dtype=np.float32)
        x[:3] = image.transpose(2, 0, 1) / 255.0
        x[3] = gaussian_map(np.asarray(click), S, self.sigma)
        x[4] = gaussian_map(np.asarray(neighbours).reshape(-1, 2), S, self.sigma)
        weights = np.where((labels > 0) & ~target, NEIGHBOUR_WEIGHT, 1.0).astype(np.float32)
        if item.known is not None:  # unknown pixels teach nothing (the padding stays as before)
            weights[~known & valid] = 0.0
        return x, target[None].astype(np.float32), weights[None]

    def sample_plain(self, k: int, rng: np.random.Generator):
        aug = self.augment
        self.augment = False
        try:
            return self.sample(k, rng)
        finally:
            self.augment = aug

    def __getitem__(self, k: int):
        rng = np.random.default_rng((self.seed, self.epoch, int(k)))
        x, y, w = self.sample(k, rng)
        return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(w)
