"""Whole-slide test images built from real MoNuSeg crops, cheaply, at any size.

Why: memory and speed at slide scale (100,000 x 100,000 px, tens of
thousands of clicks) must be measured on a real tiled, compressed, pyramidal
TIFF, but encoding ten gigapixels takes far longer than the run it serves.
The slide is a mosaic of 512 px blocks, each a real MoNuSeg crop, so level 0
(256 px JPEG tiles, four per block) and level 1 (one tile per block) hold only
a few distinct tiles: each is JPEG-encoded once by tifffile and its bytes are
written again wherever it repeats.  Lower levels are small and encoded
normally.  Clicks are placed inside the real nuclei of the chosen blocks
(``bridge.evaluation.clicks.simulate_clicks``), so NuClick sees real work.

Used by ``benchmarks/slide_memory.py`` and ``tests/test_memory_bound.py``.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

BLOCK = 512
TILE = 256


@dataclass(frozen=True)
class Source:
    """One real crop: pixels, instance labels and clicks inside its nuclei."""

    rgb: np.ndarray  # (BLOCK, BLOCK, 3) uint8
    labels: np.ndarray  # (BLOCK, BLOCK) instance ids
    clicks: np.ndarray  # (N, 2) x, y within the crop


def load_sources(monuseg: Path, n_images: int = 4, seed: int = 0) -> list[Source]:
    """Four 512 px corner crops of each of the first ``n_images`` MoNuSeg
    training images, with clicks inside every nucleus of each crop."""
    from bridge.evaluation.clicks import simulate_clicks
    from bridge.evaluation.datasets import load_split

    out = []
    for item in load_split(Path(monuseg), "train")[:n_images]:
        h, w = item.image.shape[:2]
        for y0 in (0, h - BLOCK):
            for x0 in (0, w - BLOCK):
                rgb = np.ascontiguousarray(item.image[y0 : y0 + BLOCK, x0 : x0 + BLOCK])
                lab = np.ascontiguousarray(item.labels[y0 : y0 + BLOCK, x0 : x0 + BLOCK])
                xy, _ = simulate_clicks(lab, jitter=0.0, seed=seed)
                out.append(Source(rgb, lab, xy))
    return out


def block_source(bx: np.ndarray | int, by: np.ndarray | int, n: int) -> np.ndarray | int:
    """Which source fills block (bx, by): a fixed scramble, so neighbours differ."""
    return (np.asarray(bx) * 7919 + np.asarray(by) * 104729) % n


def _encode_tiles(tiles: list[np.ndarray]) -> tuple[list[bytes], dict]:
    """Each tile as tifffile writes it (JPEG), and the tags to write them with."""
    buf = io.BytesIO()
    kw = {"tile": (TILE, TILE), "photometric": "rgb", "compression": "jpeg", "compressionargs": {"level": 90}}
    with tifffile.TiffWriter(buf) as tif:
        for t in tiles:
            tif.write(t, **kw)
    out = []
    with tifffile.TiffFile(io.BytesIO(buf.getvalue())) as tif:
        raw = buf.getvalue()
        for page in tif.pages:
            (off,), (count,) = page.dataoffsets, page.databytecounts
            out.append(raw[off : off + count])
        page = tif.pages[0]
        tags = {"photometric": page.photometric, "compression": page.compression, "jpegtables": page.jpegtables}
        if page.subsampling:
            tags["subsampling"] = page.subsampling
    return out, tags


def _level_array(sources: list[Source], d: int) -> np.ndarray:
    """Every source downsampled by ``d`` (area mean): (n, BLOCK/d, BLOCK/d, 3)."""
    b = BLOCK // d
    stack = np.stack([s.rgb for s in sources]).astype(np.float32)
    return stack.reshape(len(sources), b, d, b, d, 3).mean(axis=(2, 4)).round().astype(np.uint8)


def _computed_tiles(level: np.ndarray, width: int, height: int) -> Iterator[np.ndarray]:
    """Tiles of a reduced level (row by row), assembled from its blocks."""
    n, b = level.shape[0], level.shape[1]
    for ty in range(0, height, TILE):
        ys = ty + np.arange(TILE)
        for tx in range(0, width, TILE):
            xs = tx + np.arange(TILE)
            src = block_source(xs[None, :] // b, ys[:, None] // b, n)
            yield level[src, (ys % b)[:, None], (xs % b)[None, :]]


def write_slide(path: str | Path, size: int, sources: list[Source], description: str = "") -> list[int]:
    """A ``size`` x ``size`` pyramidal RGB TIFF (JPEG tiles of 256 px, levels
    down to about 512 px in SubIFDs); returns the downsample of each level."""
    n = len(sources)
    quads = [s.rgb[y : y + TILE, x : x + TILE] for s in sources for y in (0, TILE) for x in (0, TILE)]
    level0, tags = _encode_tiles(quads)
    level1, _ = _encode_tiles(list(_level_array(sources, 2)))
    downsamples = [1, 2]
    while size // (downsamples[-1] * 2) >= BLOCK and BLOCK // (downsamples[-1] * 2) >= 1:
        downsamples.append(downsamples[-1] * 2)
    tiles_x = -(-size // TILE)

    def tiles0() -> Iterator[bytes]:
        for ty in range(tiles_x):
            for tx in range(tiles_x):
                s = int(block_source(tx // 2, ty // 2, n))
                yield level0[s * 4 + (ty % 2) * 2 + (tx % 2)]

    def tiles1(side: int) -> Iterator[bytes]:
        for ty in range(-(-side // TILE)):
            for tx in range(-(-side // TILE)):
                yield level1[int(block_source(tx, ty, n))]

    common = {"tile": (TILE, TILE), "dtype": np.uint8, **tags}
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(
            tiles0(), shape=(size, size, 3), subifds=len(downsamples) - 1, description=description or None, **common
        )
        for d in downsamples[1:]:
            side = size // d
            if d == 2:
                tif.write(tiles1(side), shape=(side, side, 3), subfiletype=1, **common)
            else:
                level = _level_array(sources, d)
                tif.write(
                    _computed_tiles(level, side, side),
                    shape=(side, side, 3),
                    dtype=np.uint8,
                    subfiletype=1,
                    tile=(TILE, TILE),
                    photometric="rgb",
                    compression="jpeg",
                    compressionargs={"level": 90},
                )
    return downsamples


def slide_clicks(size: int, sources: list[Source], n_clicks: int, seed: int = 0) -> np.ndarray:
    """``n_clicks`` level-0 clicks: every nucleus of randomly chosen whole
    blocks (as a pathologist clicks every nucleus of a region), blocks spread
    over the slide; (n_clicks, 2) x, y."""
    rng = np.random.default_rng(seed)
    per_side = size // BLOCK  # whole blocks only
    order = rng.permutation(per_side * per_side)
    out: list[np.ndarray] = []
    total = 0
    for cell in order:
        if total >= n_clicks:
            break
        by, bx = divmod(int(cell), per_side)
        xy = sources[int(block_source(bx, by, len(sources)))].clicks + np.array([bx * BLOCK, by * BLOCK])
        out.append(xy)
        total += len(xy)
    if total < n_clicks:
        raise ValueError(f"a {size} px slide holds only {total} clicks")
    return np.concatenate(out)[:n_clicks]


def write_clicks_csv(path: str | Path, xy: np.ndarray) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("x,y\n")
        for x, y in xy:
            fh.write(f"{x:.2f},{y:.2f}\n")


def describe(path: str | Path) -> str:
    """Levels of a slide, for logs."""
    with tifffile.TiffFile(path) as tif:
        levels = [lvl.shape for lvl in tif.series[0].levels]
    return json.dumps({"levels": levels})
