"""Make the pictures of the README and docs/ with the project's own command,
`nuclick-bridge evaluate --figures`, from the monuseg validation split.

    python scripts/doc_figures.py            # writes docs/images/*.png

* ``overlay_<image>.png``: a 256x256 crop of a validation image (cut here,
  labels and all, so the picture stays small), evaluated with simulated clicks;
* ``accuracy_by_size_monuseg_val.png``: every monuseg validation image.

Both runs use the card's protocol (``--jitter 5 --seed 0``) and the shipped weights.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "monuseg"
OUT = ROOT / "docs" / "images"
# (validation image, top row, left column) of each crop: an image near the mean AJI of the split
CROPS = [("TCGA-NH-A8F7-01A-01-TS1", 380, 360)]
SIDE = 256


def evaluate(images: Path, labels: Path, figures: Path, split: str | None = None) -> None:
    """`nuclick-bridge evaluate --figures` as a user runs it."""
    cmd = [sys.executable, "-m", "bridge.cli", "evaluate", "--images", str(images), "--labels", str(labels)]
    cmd += ["--jitter", "5", "--seed", "0", "--figures", str(figures)] + (["--split", split] if split else [])
    subprocess.run(cmd, check=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA, help="the monuseg folder (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=OUT, help="where the PNGs go (default: %(default)s)")
    ap.add_argument("--no-size-plot", action="store_true", help="only the crops (the size plot runs the whole split)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="doc-figures-") as tmp_name:
        tmp = Path(tmp_name)
        for sub in ("images", "labels"):
            (tmp / "crops" / sub).mkdir(parents=True)
        for name, top, left in CROPS:
            img = np.asarray(Image.open(args.data / "images" / f"{name}.png").convert("RGB"))
            lab = np.asarray(Image.open(args.data / "labels" / f"{name}.png"))
            window = (slice(top, top + SIDE), slice(left, left + SIDE))
            Image.fromarray(img[window]).save(tmp / "crops" / "images" / f"{name}.png")
            Image.fromarray(lab[window]).save(tmp / "crops" / "labels" / f"{name}.png")
        evaluate(tmp / "crops" / "images", tmp / "crops" / "labels", tmp / "crop_figures")
        for name, _, _ in CROPS:
            shutil.copyfile(tmp / "crop_figures" / f"{name}_overlay.png", args.out / f"overlay_{name}.png")
        if not args.no_size_plot:
            evaluate(args.data / "images", args.data / "labels", tmp / "val_figures", split="val")
            shutil.copyfile(tmp / "val_figures" / "accuracy_by_size.png", args.out / "accuracy_by_size_monuseg_val.png")
    for p in sorted(args.out.glob("*.png")):
        print(f"{p.relative_to(ROOT) if p.is_relative_to(ROOT) else p}: {p.stat().st_size / 1e3:.0f} kB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
