"""Pictures of an ``evaluate`` run (``evaluate --figures DIR``): per image, the
truth, the prediction and the clicks over the pixels; and one plot of accuracy
by nucleus size over every image.

matplotlib is imported here only, with its non-interactive Agg canvas (no
pyplot, no display needed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from skimage.segmentation import find_boundaries

from bridge.errors import BridgeInputError
from bridge.evaluation.metrics import SizeBin
from bridge.results import Click

TRUTH_RGB = (0, 230, 0)  # green
PRED_RGB = (255, 215, 0)  # yellow
CLICK_COLOUR = "#00e5ff"  # cyan
SIZE_PLOT_NAME = "accuracy_by_size.png"


def require_matplotlib():
    """The Figure and Agg canvas classes, or one readable error."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ModuleNotFoundError as exc:
        raise BridgeInputError(
            "--figures needs matplotlib, which the engine extra installs: pip install 'nuclick-bridge[engine]'"
        ) from exc
    return Figure, FigureCanvasAgg


def outline_rgb(image: np.ndarray, truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """``image`` with the inner outlines of the truth (green) and of the
    prediction (yellow, drawn last) painted in, one pixel wide."""
    out = np.array(image[..., :3], dtype=np.uint8, copy=True)
    out[find_boundaries(truth, mode="inner") & (truth > 0)] = TRUTH_RGB
    out[find_boundaries(pred, mode="inner") & (pred > 0)] = PRED_RGB
    return out


def overlay_figure(
    path: Path,
    image: np.ndarray,
    truth: np.ndarray,
    pred: np.ndarray,
    clicks: Sequence[Click],
    title: str = "",
) -> Path:
    """Write one PNG: the outlines of :func:`outline_rgb` and a cross at each
    click.  Images under 600 px a side are enlarged twice (pixels kept
    square), so that a crop stays readable."""
    Figure, Canvas = require_matplotlib()
    h, w = truth.shape
    zoom = 2 if max(h, w) < 600 else 1
    dpi = 100
    header = 40  # px: a line of title, a line of legend
    total = h * zoom + header
    fig = Figure(figsize=(w * zoom / dpi, total / dpi), dpi=dpi)
    Canvas(fig)
    ax = fig.add_axes((0, 0, 1, h * zoom / total))
    ax.imshow(outline_rgb(image, truth, pred), interpolation="nearest")
    if clicks:
        xs, ys = [c.x - 0.5 for c in clicks], [c.y - 0.5 for c in clicks]  # pixel centres are integers here
        ax.scatter(xs, ys, marker="+", s=30, linewidths=1.2, c=CLICK_COLOUR)
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.set_axis_off()
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], color=np.array(TRUTH_RGB) / 255, lw=2, label="truth"),
        Line2D([], [], color=np.array(PRED_RGB) / 255, lw=2, label="prediction"),
        Line2D([], [], color=CLICK_COLOUR, marker="+", ls="", markersize=8, label="click"),
    ]
    fig.text(4 / (w * zoom), 1 - 3 / total, title, ha="left", va="top", fontsize=8)
    fig.legend(
        handles=handles, loc="lower left", bbox_to_anchor=(0, h * zoom / total), ncol=3, fontsize=8, frameon=False
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, facecolor="white")
    return path


def size_figure(path: Path, bins: Sequence[SizeBin], title: str = "") -> Path:
    """Write one PNG: mean best IoU (bars) and the share missed (IoU <= 0.5,
    line) per nucleus-area bin, with the number of nuclei under each bar."""
    Figure, Canvas = require_matplotlib()
    shown = [b for b in bins if b.count]
    if not shown:
        raise BridgeInputError("no annotated nuclei to plot by size")
    labels = [f"{b.lo:.0f}-{'' if math.isinf(b.hi) else f'{b.hi:.0f}'}" for b in shown]
    x = np.arange(len(shown))
    fig = Figure(figsize=(6.4, 3.6), dpi=100)
    Canvas(fig)
    ax = fig.add_subplot()
    bars = ax.bar(x, [b.mean_iou for b in shown], color="#4c72b0", label="mean IoU (best match)")
    for bar, b in zip(bars, shown, strict=True):
        top = b.mean_iou - 0.02  # inside the bar's top, clear of the missed line near the bottom
        ax.annotate(
            f"n={b.count}", (bar.get_x() + bar.get_width() / 2, top), ha="center", va="top", fontsize=7, color="white"
        )
    ax.plot(x, [b.missed for b in shown], "o-", color="#dd4444", label="missed (IoU ≤ 0.5)")
    ax.set_xticks(x, labels)
    ax.set_xlabel("annotated nucleus area (px)")
    ax.set_ylim(0, 1.15)  # room for the legend above 1
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel("IoU / share of nuclei")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper center", ncol=2, fontsize=8, frameon=False)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, facecolor="white")
    return path
