"""Reading back what the OMERO connector writes: only the tests need it.

The connector writes polygon ``points`` strings and packed colours; these
turn them back into shapes and RGBA, as OMERO.iviewer would read them, so
that tests can check what was written (they are not product code).
"""

from __future__ import annotations

import re

from shapely.geometry import Polygon

from bridge.io.coords import omero_to_level0

_LEGACY_POINTS_RE = re.compile(r"points\[([^\]]*)\]")


def parse_points(text: str) -> list[tuple[float, float]]:
    """Vertices of an OMERO ``points`` string, in OMERO coordinates.

    Reads the canonical ``"x,y x,y ..."`` form and the legacy
    ``"points[x,y, x,y] points1[...] ..."`` form older clients wrote.
    """
    text = (text or "").strip()
    legacy = _LEGACY_POINTS_RE.search(text)
    if legacy:
        text = legacy.group(1)
    numbers = [float(v) for v in re.split(r"[\s,]+", text.strip()) if v]
    if len(numbers) % 2:
        raise ValueError(f"odd number of coordinates in points string {text[:40]!r}")
    return list(zip(numbers[0::2], numbers[1::2], strict=True))


def points_to_polygon(text: str) -> Polygon:
    """The polygon of an OMERO ``points`` string, in our level-0 frame."""
    return Polygon([omero_to_level0(x, y) for x, y in parse_points(text)])


def unpack_rgba(value: int) -> tuple[int, int, int, int]:
    """OMERO's signed packed colour back to (r, g, b, a)."""
    value = int(value) & 0xFFFFFFFF
    return (value >> 24) & 255, (value >> 16) & 255, (value >> 8) & 255, value & 255
