"""Local pixels for a QuPath image entry.

TIFF, OME-TIFF, SVS (and PNG/JPEG) go through :func:`bridge.io.imageio.open_image`
(tifffile, only the tiles around the clicks are decoded).  Other whole-slide
formats (Hamamatsu, MIRAX, Leica, Ventana, ...) are read with OpenSlide when it
is installed (``pip install openslide-python openslide-bin``); it is optional.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bridge.errors import BridgeInputError
from bridge.io.imageio import SUPPORTED_SUFFIXES, RegionReader, WindowedReader, open_image

OPENSLIDE_SUFFIXES = (".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".bif", ".svslide", ".czi", ".dcm", ".tiff.dcm")


def _has_suffix(path: Path, suffixes: tuple[str, ...]) -> bool:
    lower = path.name.lower()
    return any(lower.endswith(s) for s in suffixes)


class OpenSlideReader(WindowedReader):
    """Level 0 of a slide through OpenSlide, as a RegionReader (8-bit RGB,
    zero outside the image and where the slide has no data)."""

    def __init__(self, path: str | Path) -> None:
        try:
            import openslide
        except ImportError as exc:
            raise BridgeInputError(
                f"{Path(path).name}: reading this format needs OpenSlide (pip install openslide-python openslide-bin)"
            ) from exc
        self.path = Path(path)
        try:
            self._slide = openslide.OpenSlide(str(self.path))
        except Exception as exc:  # OpenSlideUnsupportedFormatError, OpenSlideError, OSError
            raise BridgeInputError(f"{self.path.name} is not a slide OpenSlide can read ({exc})") from exc
        self.width, self.height = (int(v) for v in self._slide.dimensions)

    def _read_inside(self, xa: int, ya: int, xb: int, yb: int) -> np.ndarray:
        try:
            rgba = np.asarray(self._slide.read_region((xa, ya), 0, (xb - xa, yb - ya)))
        except Exception as exc:
            raise BridgeInputError(f"cannot decode {self.path.name} near x={xa}, y={ya} ({exc})") from exc
        return np.where(rgba[..., 3:4] > 0, rgba[..., :3], 0).astype(np.uint8)

    def close(self) -> None:
        slide = getattr(self, "_slide", None)
        if slide is not None:
            slide.close()
            self._slide = None


def open_local_image(path: str | Path) -> RegionReader:
    """A RegionReader for a local image file, by suffix; one clear
    :class:`BridgeInputError` for a missing, unreadable, non-RGB or
    unsupported file."""
    path = Path(path)
    if not path.exists():
        raise BridgeInputError(f"image file not found: {path}")
    if not path.is_file():
        raise BridgeInputError(f"image path is not a file: {path}")
    if _has_suffix(path, SUPPORTED_SUFFIXES):
        return open_image(path)
    if _has_suffix(path, OPENSLIDE_SUFFIXES):
        return OpenSlideReader(path)
    raise BridgeInputError(
        f"{path.name}: unsupported image type {path.suffix or '(no suffix)'};"
        f" readable: {', '.join(SUPPORTED_SUFFIXES)}, and with OpenSlide {', '.join(OPENSLIDE_SUFFIXES)}"
    )
