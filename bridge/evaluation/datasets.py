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
    """An image and its instance labels.  A lab's partial labels add
    ``known`` (False where no one said what a pixel is: training gives it no
    weight) and ``targets`` (the ids training may centre a patch on)."""

    name: str
    image: np.ndarray  # (H, W, 3) uint8
    labels: np.ndarray  # (H, W) int32
    known: np.ndarray | None = None  # (H, W) bool; None: every pixel is known
    targets: frozenset[int] | None = None  # None: every labelled nucleus


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
    """A uint16 instance map (0 = background).  8-bit files are refused: they
    are usually masks or previews saved by mistake, and cap an image at 255
    nuclei."""
    try:
        arr = np.asarray(Image.open(path))
    except Exception as exc:
        raise BridgeInputError(f"{path.name}: not a readable PNG ({exc})") from exc
    if arr.ndim != 2:
        raise BridgeInputError(f"{path.name}: a label map must be single-channel, got shape {arr.shape}")
    if arr.dtype != np.uint16:
        raise BridgeInputError(
            f"{path.name}: a label map must be a uint16 instance map (0 = background, 1..N = nuclei), got {arr.dtype}"
        )
    return arr.astype(np.int32)


def check_names_match(image_dir: Path, label_dir: Path) -> None:
    """Every image has a label map and every label map an image."""
    images = {p.stem for p in image_dir.glob("*.png")}
    labels = {p.stem for p in label_dir.glob("*.png")}
    for missing, have, where in ((images - labels, "image", label_dir), (labels - images, "label map", image_dir)):
        if missing:
            names = ", ".join(sorted(missing)[:3]) + (" ..." if len(missing) > 3 else "")
            raise BridgeInputError(f"{len(missing)} {have}(s) without a partner in {where}: {names}")


def check_trainable(root: Path, items: list[LabelledImage]) -> list[str]:
    """Refuse a dataset whose label maps hold no nuclei at all, before any
    compute is spent.  Single empty maps are legitimate (CoNSeP has
    background-only tiles); their names are returned so the caller can say so."""
    empty = [it.name for it in items if not it.labels.any()]
    if items and len(empty) == len(items):
        raise BridgeInputError(f"no label map under {root / 'labels'} has any nuclei (all zero)")
    return empty


def load_pairs(image_dir: Path, label_dir: Path, names: list[str] | None = None) -> list[LabelledImage]:
    """Load image/label pairs with the same file names."""
    from bridge.io.imageio import load_rgb

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
    if (root / "labels").is_dir() and (root / "images").is_dir():
        check_names_match(root / "images", root / "labels")
    return load_pairs(root / "images", root / "labels", split_names(root, split))
