"""Datasets laid out like ``../shared/data``: ``images/NAME.png`` (RGB),
``labels/NAME.png`` (uint16 instance map), optional ``split.json``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from bridge.errors import BridgeInputError


@dataclass
class LabelledImage:
    name: str
    image: np.ndarray  # (H, W, 3) uint8
    labels: np.ndarray  # (H, W) int32


def split_names(root: Path, split: str | None) -> list[str]:
    """Image stems of ``split`` (from split.json; ``a+b`` joins splits), or all images."""
    images = sorted(p.stem for p in (root / "images").glob("*.png"))
    if not images:
        raise BridgeInputError(f"no PNG images under {root / 'images'}")
    if split is None:
        return images
    sj = root / "split.json"
    if not sj.is_file():
        raise BridgeInputError(f"{root} has no split.json, so split {split!r} cannot be chosen")
    table = json.loads(sj.read_text())
    names: list[str] = []
    for part in split.split("+"):
        if part not in table:
            raise BridgeInputError(f"split {part!r} is not in {sj} (has: {', '.join(map(str, table))})")
        names += list(table[part])
    return names


def read_label_png(path: Path) -> np.ndarray:
    arr = np.asarray(Image.open(path))
    if arr.ndim != 2:
        raise BridgeInputError(f"{path.name}: a label map must be single-channel, got shape {arr.shape}")
    return arr.astype(np.int32)


def load_pairs(image_dir: Path, label_dir: Path, names: list[str] | None = None) -> list[LabelledImage]:
    """Load image/label pairs with the same file names."""
    from bridge.imageio import load_rgb

    if not image_dir.is_dir():
        raise BridgeInputError(f"image folder not found: {image_dir}")
    if not label_dir.is_dir():
        raise BridgeInputError(f"label folder not found: {label_dir}")
    stems = names if names is not None else sorted(p.stem for p in image_dir.glob("*.png"))
    if not stems:
        raise BridgeInputError(f"no PNG images in {image_dir}")
    out = []
    for stem in stems:
        lp = label_dir / f"{stem}.png"
        if not lp.is_file():
            raise BridgeInputError(f"no label map {lp.name} in {label_dir} for image {stem}.png")
        img = load_rgb(image_dir / f"{stem}.png")
        lab = read_label_png(lp)
        if lab.shape != img.shape[:2]:
            raise BridgeInputError(f"{stem}: image is {img.shape[:2]} but labels are {lab.shape}")
        out.append(LabelledImage(stem, img, lab))
    return out


def load_split(root: Path, split: str | None) -> list[LabelledImage]:
    return load_pairs(root / "images", root / "labels", split_names(root, split))
