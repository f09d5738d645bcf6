"""Between the wire (``nuclick.v1`` messages) and the project's plain types.

Torch-free: the client and the connectors import this.  Tiles are encoded
here (client side) and decoded and checked here (server side), so both ends
agree on the format by construction.
"""

from __future__ import annotations

import io

import numpy as np
from shapely.geometry import Polygon

from bridge.errors import BridgeInputError
from bridge.results import Click, NucleusResult
from bridge.service.gen import nuclick_pb2 as pb

ENCODINGS = {"raw": pb.Tile.RAW_RGB8, "png": pb.Tile.PNG, "jpeg": pb.Tile.JPEG}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"


class ServiceError(Exception):
    """A request the server refuses: a gRPC status code name and one line.

    ``http_status`` overrides the default HTTP mapping (e.g. 413 for a body
    that is too large, where gRPC says RESOURCE_EXHAUSTED).  ``retry_after``
    (seconds) is set when the refusal is "busy now": a client should wait that
    long before it asks again; gRPC sends it as the trailing metadata
    ``retry-after-ms`` (whole milliseconds), HTTP as ``Retry-After`` (whole
    seconds, rounded up).
    """

    def __init__(
        self, code: str, message: str, http_status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(" ".join(str(message).split()))
        self.code = code
        self.message = str(self)
        self.http_status = http_status
        self.retry_after = retry_after


def invalid(message: str) -> ServiceError:
    return ServiceError("INVALID_ARGUMENT", message)


def too_big(message: str) -> ServiceError:
    return ServiceError("RESOURCE_EXHAUSTED", message, http_status=413)


# gRPC status name -> HTTP status, as in Google's API design guide.
HTTP_STATUS = {
    "OK": 200,
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "OUT_OF_RANGE": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "ABORTED": 409,
    "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499,
    "UNIMPLEMENTED": 501,
    "INTERNAL": 500,
    "UNKNOWN": 500,
    "DATA_LOSS": 500,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}


# ------------------------------------------------------------------ clicks


def click_to_pb(click: Click, context_only: bool = False) -> pb.Click:
    return pb.Click(
        x=float(click.x),
        y=float(click.y),
        id=str(click.id),
        class_name=click.class_name or "",
        context_only=context_only,
    )


def click_from_pb(msg: pb.Click) -> Click:
    return Click(x=msg.x, y=msg.y, id=msg.id, class_name=msg.class_name or None)


# ---------------------------------------------------------------- polygons


def _ring_to_pb(coords) -> pb.Ring:
    pts = list(coords)
    if len(pts) > 1 and pts[0] == pts[-1]:
        pts = pts[:-1]
    return pb.Ring(points=[pb.Point(x=float(x), y=float(y)) for x, y in pts])


def polygon_to_pb(poly: Polygon) -> pb.Polygon:
    return pb.Polygon(
        exterior=_ring_to_pb(poly.exterior.coords),
        holes=[_ring_to_pb(r.coords) for r in poly.interiors],
    )


def polygon_from_pb(msg: pb.Polygon) -> Polygon:
    shell = [(p.x, p.y) for p in msg.exterior.points]
    holes = [[(p.x, p.y) for p in r.points] for r in msg.holes]
    return Polygon(shell, holes)


# ----------------------------------------------------------------- results


def result_to_pb(r: NucleusResult, click_id: str, class_name: str | None) -> pb.NucleusResult:
    msg = pb.NucleusResult(click_id=click_id, class_name=class_name or "", found=r.found, reason=r.reason)
    if r.found and r.polygon is not None:
        msg.polygon.CopyFrom(polygon_to_pb(r.polygon))
        msg.area_px = float(r.polygon.area)
        msg.score = float(r.score)
    return msg


def result_from_pb(msg: pb.NucleusResult, click: Click) -> NucleusResult:
    if not msg.found:
        return NucleusResult(click=click, found=False, reason=msg.reason)
    poly = polygon_from_pb(msg.polygon)
    return NucleusResult(click=click, found=True, polygon=poly, area_px=msg.area_px, score=msg.score)


# ------------------------------------------------------------------- tiles


def encode_tile(array: np.ndarray, encoding: str = "raw", jpeg_quality: int = 95) -> tuple[int, bytes]:
    """(Tile.Encoding, data) for an (H, W, 3) uint8 array."""
    array = np.asarray(array)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise BridgeInputError(f"tile is {array.dtype} with shape {array.shape}; NuClick needs (H, W, 3) uint8 RGB")
    if encoding not in ENCODINGS:
        raise BridgeInputError(f"unknown tile encoding {encoding!r}; use one of {', '.join(ENCODINGS)}")
    if encoding == "raw":
        return pb.Tile.RAW_RGB8, np.ascontiguousarray(array).tobytes()
    from PIL import Image

    buf = io.BytesIO()
    if encoding == "png":
        Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    else:
        Image.fromarray(array).save(buf, format="JPEG", quality=jpeg_quality)
    return ENCODINGS[encoding], buf.getvalue()


def tile_to_pb(
    array: np.ndarray,
    origin: tuple[float, float] = (0.0, 0.0),
    downsample: float = 1.0,
    pixel_size_um: float | None = None,
    encoding: str = "raw",
) -> pb.Tile:
    kind, data = encode_tile(array, encoding)
    return pb.Tile(
        encoding=kind,
        data=data,
        width=int(array.shape[1]),
        height=int(array.shape[0]),
        origin_x=float(origin[0]),
        origin_y=float(origin[1]),
        downsample=float(downsample),
        pixel_size_um=float(pixel_size_um or 0.0),
    )


def _sniff(data: bytes, width: int, height: int) -> int:
    if data.startswith(PNG_MAGIC):
        return pb.Tile.PNG
    if data.startswith(JPEG_MAGIC):
        return pb.Tile.JPEG
    if len(data) == width * height * 3:
        return pb.Tile.RAW_RGB8
    raise invalid(
        f"tile encoding not given and the {len(data)} bytes are neither PNG, JPEG nor raw RGB8 "
        f"({width} x {height} x 3 = {width * height * 3} bytes)"
    )


def decode_tile(tile: pb.Tile, max_side: int) -> np.ndarray:
    """The tile's pixels as (height, width, 3) uint8, or a ServiceError that
    says what is wrong.  The declared size is checked against ``max_side``
    and against the image header before anything is decompressed."""
    w, h = int(tile.width), int(tile.height)
    if w == 0 or h == 0:
        raise invalid(f"tile is empty ({w} x {h} pixels); give its width and height")
    if w > max_side or h > max_side:
        raise too_big(f"tile is {w} x {h} pixels; the limit is {max_side} per side: send smaller tiles")
    data = tile.data
    if not data:
        raise invalid("tile has no pixel data")
    kind = tile.encoding if tile.encoding != pb.Tile.ENCODING_UNSPECIFIED else _sniff(data, w, h)
    if kind == pb.Tile.RAW_RGB8:
        if len(data) != w * h * 3:
            raise invalid(
                f"raw RGB8 tile has {len(data)} bytes but {w} x {h} x 3 = {w * h * 3} were declared; "
                "check width/height (or the data is truncated)"
            )
        return np.frombuffer(data, dtype=np.uint8).reshape(h, w, 3)
    if kind in (pb.Tile.PNG, pb.Tile.JPEG):
        return _decode_image(data, w, h, "PNG" if kind == pb.Tile.PNG else "JPEG")
    raise invalid(f"unknown tile encoding {kind}")


def _decode_image(data: bytes, w: int, h: int, fmt: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data), formats=[fmt]) as im:
            if im.size != (w, h):
                raise invalid(f"the {fmt} is {im.size[0]} x {im.size[1]} pixels but the tile says {w} x {h}")
            if im.mode != "RGB":
                raise invalid(f"the {fmt} tile is in mode {im.mode}; NuClick needs 8-bit RGB")
            im.load()
            array = np.asarray(im)
    except ServiceError:
        raise
    except UnidentifiedImageError:
        raise invalid(f"the tile is not a readable {fmt} (unrecognised data)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise invalid(f"the tile is not a readable {fmt} ({exc})") from None
    except Image.DecompressionBombError as exc:  # pragma: no cover - our size check comes first
        raise too_big(f"the {fmt} tile is too large ({exc})") from exc
    if array.shape != (h, w, 3) or array.dtype != np.uint8:
        raise invalid(f"the {fmt} tile decoded to {array.dtype} {array.shape}; NuClick needs 8-bit RGB")
    return array
