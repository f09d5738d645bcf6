"""Reading image pixels only where they are needed.

Why: a whole-slide image is tens of gigapixels, but NuClick only looks at a
small patch around each click.  Readers therefore expose one operation,
``read_region``, over level-0 pixels; tiled (pyramidal) TIFFs are read through
tifffile's Zarr store so that only the tiles intersecting a window are decoded.
Small formats (PNG, JPEG, BMP) are simply loaded into memory.

Every reader returns 8-bit RGB.  Anything else (greyscale, RGBA, 16-bit,
float) is refused with a :class:`~bridge.errors.BridgeInputError` rather than
converted silently, because the model was trained on 8-bit RGB H&E only.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, runtime_checkable

import numpy as np

from bridge.errors import BridgeInputError

TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".ome.tif", ".ome.tiff")
PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
SUPPORTED_SUFFIXES = TIFF_SUFFIXES + PIL_SUFFIXES

_NEEDS = "NuClick needs 8-bit RGB"


@runtime_checkable
class RegionReader(Protocol):
    """Random access to level-0 RGB pixels of one image."""

    width: int
    height: int

    def read_region(self, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        """(h, w, 3) uint8 pixels of the window at level-0 origin (x0, y0).

        Any part of the window outside the image is zero-filled: the engine
        pads border patches instead of dropping them.
        """
        ...

    def close(self) -> None: ...

    def __enter__(self) -> RegionReader: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


def _clip_window(x0: int, y0: int, w: int, h: int, width: int, height: int) -> tuple[int, int, int, int] | None:
    """Intersection of a window with the image as (x0, y0, x1, y1), or None."""
    if w < 0 or h < 0:
        raise ValueError(f"negative window size {w}x{h}")
    x_lo, y_lo = max(x0, 0), max(y0, 0)
    x_hi, y_hi = min(x0 + w, width), min(y0 + h, height)
    if x_lo >= x_hi or y_lo >= y_hi:
        return None
    return x_lo, y_lo, x_hi, y_hi


class WindowedReader:
    """Zero-filled windowing shared by every reader; subclasses only read boxes
    that lie inside the image (``_read_inside``)."""

    width: int
    height: int

    def _read_inside(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        raise NotImplementedError

    def read_region(self, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        x0, y0, w, h = int(x0), int(y0), int(w), int(h)
        out = np.zeros((h, w, 3), dtype=np.uint8)
        box = _clip_window(x0, y0, w, h, self.width, self.height)
        if box is not None:
            xa, ya, xb, yb = box
            out[ya - y0 : yb - y0, xa - x0 : xb - x0] = self._read_inside(xa, ya, xb, yb)
        return out

    def close(self) -> None:
        pass

    def __enter__(self) -> WindowedReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class ArrayReader(WindowedReader):
    """A RegionReader over an in-memory (H, W, 3) uint8 array (no copy)."""

    def __init__(self, array: np.ndarray) -> None:
        array = np.asarray(array)
        if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
            raise BridgeInputError(f"image array is {array.dtype} with shape {array.shape}; {_NEEDS} (H, W, 3) uint8")
        self.array = array
        self.height, self.width = int(array.shape[0]), int(array.shape[1])

    def _read_inside(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        return self.array[y0:y1, x0:x1]


def _describe_bits(dtype: np.dtype) -> str:
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return f"floating-point ({dtype.name})"
    if dtype.kind == "b":
        return "1-bit (boolean)"
    return f"{dtype.itemsize * 8}-bit ({dtype.name})"


def _describe_channels(n: int) -> str:
    names = {1: "greyscale", 2: "greyscale+alpha", 3: "RGB", 4: "RGBA"}
    return f"{names.get(n, 'multichannel')} ({n} channel{'s' if n != 1 else ''})"


class TiffReader(WindowedReader):
    """Level 0 of a TIFF / OME-TIFF / tiled pyramidal TIFF (e.g. SVS), read lazily.

    Only the IFDs are parsed on open; ``read_region`` goes through
    ``tifffile``'s Zarr store (``series[0].levels[0].aszarr()``), so a window
    decodes just the tiles (or strips) that intersect it, never the whole plane.
    Both chunky (Y, X, S) and planar (S, Y, X) / OME (C, Y, X) layouts work;
    singleton axes such as T or Z are dropped.
    """

    def __init__(self, path: str | Path) -> None:
        import tifffile

        self.path = Path(path)
        name = self.path.name
        if not self.path.is_file():
            raise BridgeInputError(f"image file not found: {self.path}")
        try:
            self._tif = tifffile.TiffFile(self.path)
        except Exception as exc:
            raise BridgeInputError(f"{name} is not a readable TIFF file ({exc})") from exc
        try:
            self._setup(name)
        except BaseException:
            self._tif.close()
            raise

    def _setup(self, name: str) -> None:
        import zarr
        from tifffile import TIFF

        if not self._tif.series:
            raise BridgeInputError(f"{name} contains no image")
        level = self._tif.series[0].levels[0]
        axes, shape, dtype = level.axes, tuple(level.shape), np.dtype(level.dtype)
        keyframe = level.keyframe

        # Which axis holds the colour samples; every other non-spatial axis must be 1.
        chan_axis = next((axes.index(a) for a in "SC" if a in axes and shape[axes.index(a)] > 1), None)
        n_chan = shape[chan_axis] if chan_axis is not None else 1
        if "Y" not in axes or "X" not in axes:
            raise BridgeInputError(f"{name} has axes {axes!r} with no Y/X plane")
        extra = [a for i, a in enumerate(axes) if a not in "YX" and i != chan_axis and shape[i] > 1]
        if extra:
            dims = ", ".join(f"{a}={shape[axes.index(a)]}" for a in extra)
            raise BridgeInputError(f"{name} is a multi-dimensional stack ({dims}); {_NEEDS} single plane")
        if n_chan != 3 or dtype != np.uint8:
            found = f"{_describe_bits(dtype)} {_describe_channels(n_chan)}"
            raise BridgeInputError(f"{name} is {found}; {_NEEDS}")

        # Fail now, with a fix, rather than at the first patch read.
        for table, what, key in (
            (TIFF.DECOMPRESSORS, "compression", keyframe.compression),
            (TIFF.UNPREDICTORS, "predictor", keyframe.predictor),
        ):
            if key == 1:
                continue
            try:
                table[key]
            except KeyError as exc:
                label = getattr(key, "name", str(key))
                raise BridgeInputError(
                    f"{name} uses {label} {what}, which needs the 'imagecodecs' package (pip install imagecodecs)"
                ) from exc

        # A truncated download opens fine (tifffile writes IFDs first) but lacks tiles.
        size = self._tif.filehandle.size
        for page in level.pages:
            if page is None:
                continue
            ends = [o + c for o, c in zip(page.dataoffsets, page.databytecounts, strict=False) if o and c]
            if ends and max(ends) > size:
                raise BridgeInputError(
                    f"{name} is truncated or corrupt: image data ends at byte {max(ends)} but the file has {size} bytes"
                )

        self._store = level.aszarr(multiscales=False)
        arr: Any = zarr.open(self._store, mode="r")
        if not hasattr(arr, "shape"):  # a multiscales group: level 0 is "0"
            arr = arr["0"]
        self._array = arr
        # Index template (singleton axes -> 0) and the permutation to (Y, X, C).
        self._index: list[slice | int] = [
            slice(None) if (a in "YX" or i == chan_axis) else 0 for i, a in enumerate(axes)
        ]
        self._y_axis, self._x_axis = axes.index("Y"), axes.index("X")
        kept = [i for i, a in enumerate(axes) if a in "YX" or i == chan_axis]
        self._perm = [kept.index(self._y_axis), kept.index(self._x_axis), kept.index(chan_axis)]
        self.height = int(shape[axes.index("Y")])
        self.width = int(shape[axes.index("X")])

    def _read_inside(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        index = list(self._index)
        index[self._y_axis] = slice(y0, y1)
        index[self._x_axis] = slice(x0, x1)
        try:
            block = np.asarray(self._array[tuple(index)])
        except (ValueError, OSError, RuntimeError, zlib.error) as exc:
            raise BridgeInputError(f"cannot decode {self.path.name} near x={x0}, y={y0} ({exc})") from exc
        return np.transpose(block, self._perm)

    def close(self) -> None:
        tif = getattr(self, "_tif", None)
        if tif is not None:
            tif.close()
            self._tif = None


def _has_suffix(path: Path, suffixes: tuple[str, ...]) -> bool:
    lower = path.name.lower()
    return any(lower.endswith(s) for s in suffixes)


def _png_header(path: Path) -> tuple[int, int] | None:
    """(bit depth, colour type) from a PNG's IHDR, or None if it isn't a PNG.

    Why: Pillow silently reduces 16-bit RGB PNGs to 8 bits, so the depth has to
    be read from the file itself.
    """
    with path.open("rb") as fh:
        head = fh.read(33)
    if len(head) < 33 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    depth, ctype = struct.unpack(">BB", head[24:26])
    return depth, ctype


_PNG_CTYPES = {
    0: "greyscale (1 channel)",
    2: "RGB (3 channels)",
    3: "palette",
    4: "greyscale+alpha (2 channels)",
    6: "RGBA (4 channels)",
}

_PIL_MODES = {
    "1": "1-bit black and white",
    "L": "8-bit greyscale (1 channel)",
    "LA": "8-bit greyscale+alpha (2 channels)",
    "La": "8-bit greyscale+alpha (2 channels)",
    "P": "palette",
    "PA": "palette+alpha",
    "RGBA": "RGBA (4 channels)",
    "RGBa": "RGBA (4 channels)",
    "RGBX": "RGBX (4 channels)",
    "CMYK": "CMYK (4 channels)",
    "YCbCr": "YCbCr",
    "LAB": "CIELAB",
    "HSV": "HSV",
    "I": "32-bit integer greyscale (1 channel)",
    "I;16": "16-bit greyscale (1 channel)",
    "I;16B": "16-bit greyscale (1 channel)",
    "I;16L": "16-bit greyscale (1 channel)",
    "F": "32-bit floating-point greyscale (1 channel)",
}


def _load_pil(path: Path) -> np.ndarray:
    """Whole image via Pillow, refusing anything that is not 8-bit RGB."""
    from PIL import Image, UnidentifiedImageError

    name = path.name
    png = _png_header(path)
    if png is not None:
        depth, ctype = png
        if depth != 8 or ctype != 2:
            if ctype == 3:  # palette PNGs are 8-bit colour, but not what we accept
                found = f"{depth}-bit palette"
            else:
                found = f"{depth}-bit {_PNG_CTYPES.get(ctype, f'colour type {ctype}')}"
            raise BridgeInputError(f"{name} is {found}; {_NEEDS}")
    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode != "RGB":
                raise BridgeInputError(f"{name} is {_PIL_MODES.get(mode, mode)}; {_NEEDS}")
            im.load()
            array = np.asarray(im)
    except BridgeInputError:
        raise
    except Image.DecompressionBombError as exc:
        raise BridgeInputError(f"{name} is too large to load whole ({exc}); convert it to a tiled TIFF") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise BridgeInputError(f"{name} is unreadable or corrupt ({exc})") from exc
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:  # pragma: no cover
        raise BridgeInputError(f"{name} decoded to {array.dtype} {array.shape}; {_NEEDS}")
    return array


def open_image(path: str | Path) -> RegionReader:
    """Open an image for region reads, dispatching on the file suffix.

    ``.tif/.tiff/.svs/.ome.tif`` -> :class:`TiffReader` (lazy, tiled);
    ``.png/.jpg/.jpeg/.bmp`` -> loaded whole into an :class:`ArrayReader`.
    """
    path = Path(path)
    if not path.exists():
        raise BridgeInputError(f"image file not found: {path}")
    if not path.is_file():
        raise BridgeInputError(f"image path is not a file: {path}")
    if _has_suffix(path, TIFF_SUFFIXES):
        return TiffReader(path)
    if _has_suffix(path, PIL_SUFFIXES):
        return ArrayReader(_load_pil(path))
    raise BridgeInputError(
        f"{path.name}: unsupported image type {path.suffix or '(no suffix)'};"
        f" use one of {', '.join(SUPPORTED_SUFFIXES)}"
    )


def load_rgb(path: str | Path) -> np.ndarray:
    """The whole image as an (H, W, 3) uint8 array; for small images only."""
    with open_image(path) as reader:
        if isinstance(reader, ArrayReader):
            return reader.array
        return reader.read_region(0, 0, reader.width, reader.height)
