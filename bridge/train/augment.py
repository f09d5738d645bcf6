"""Augmentations that histology needs: flips, 90-degree rotations, slight
scale, colour/stain jitter and slight blur.  Geometry is applied to image and
labels together; colour only to the image."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage.color import hed2rgb, rgb2hed


@dataclass(frozen=True)
class AugmentPolicy:
    """How hard training perturbs a patch: the window is rescaled by a factor
    drawn uniformly from ``scale`` (low, high); ``hed`` scales the stain jitter,
    ``tone`` the brightness/contrast/saturation jitter; ``hed_p`` and ``blur_p``
    are the chances of a stain shift and of a slight blur."""

    scale: tuple[float, float] = (0.9, 1.1)
    hed: float = 1.0
    tone: float = 1.0
    hed_p: float = 0.5
    blur_p: float = 0.2

    def draw_scale(self, rng: np.random.Generator) -> float:
        return float(rng.uniform(*self.scale))


# "standard" is what the shipped weights were trained with; "strong" widens the
# scale range to 0.8-1.25 (scanners and labs differ in magnification) and doubles
# the stain jitter (labs differ in staining), measured in the model card.
AUGMENT_POLICIES = {
    "standard": AugmentPolicy(),
    "strong": AugmentPolicy(scale=(0.8, 1.25), hed=2.0, tone=1.5, hed_p=0.8, blur_p=0.3),
}


def crop_padded(arr: np.ndarray, x0: int, y0: int, w: int, h: int) -> np.ndarray:
    """Window of ``arr`` with zero padding outside (same rule as inference)."""
    out = np.zeros((h, w, *arr.shape[2:]), dtype=arr.dtype)
    H, W = arr.shape[:2]
    xs, ys, xe, ye = max(0, x0), max(0, y0), min(W, x0 + w), min(H, y0 + h)
    if xe > xs and ye > ys:
        out[ys - y0 : ye - y0, xs - x0 : xe - x0] = arr[ys:ye, xs:xe]
    return out


def geometric(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random flip and 90-degree rotation."""
    k = int(rng.integers(4))
    image, labels = np.rot90(image, k), np.rot90(labels, k)
    if rng.random() < 0.5:
        image, labels = image[:, ::-1], labels[:, ::-1]
    return np.ascontiguousarray(image), np.ascontiguousarray(labels)


def resize_to(image: np.ndarray, labels: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Rescale a square window to ``size`` (bilinear image, nearest labels)."""
    if image.shape[0] == size:
        return image, labels
    z = size / image.shape[0]
    img = ndi.zoom(image.astype(np.float32), (z, z, 1), order=1)[:size, :size]
    lab = ndi.zoom(labels, (z, z), order=0)[:size, :size]
    return np.clip(img, 0, 255).astype(np.uint8), lab


def colour(image: np.ndarray, rng: np.random.Generator, policy: AugmentPolicy = AugmentPolicy()) -> np.ndarray:
    """Stain jitter in HED space plus brightness/contrast/saturation, and
    occasionally a slight Gaussian blur."""
    img = image.astype(np.float32) / 255.0
    if rng.random() < policy.hed_p:
        hed = rgb2hed(img)
        alpha = 1 + rng.uniform(-0.05, 0.05, 3) * policy.hed
        beta = rng.uniform(-0.02, 0.02, 3) * policy.hed
        img = np.clip(hed2rgb(hed * alpha + beta), 0, 1).astype(np.float32)
    t = policy.tone
    img = img * (1 + rng.uniform(-0.15, 0.15) * t) + rng.uniform(-0.08, 0.08) * t
    mean = img.mean(axis=(0, 1), keepdims=True)
    img = (img - mean) * (1 + rng.uniform(-0.2, 0.2) * t) + mean
    grey = img.mean(axis=2, keepdims=True)
    img = (img - grey) * (1 + rng.uniform(-0.2, 0.2) * t) + grey
    if rng.random() < policy.blur_p:
        s = rng.uniform(0.3, 1.0)
        img = ndi.gaussian_filter(img, (s, s, 0))
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
