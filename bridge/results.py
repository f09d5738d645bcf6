"""Plain data types shared by the engine, the service and the connectors."""

from __future__ import annotations

from dataclasses import dataclass, field

from shapely.geometry import Polygon


@dataclass(frozen=True)
class Click:
    """One click in continuous level-0 image coordinates (see ``bridge.io.coords``)."""

    x: float
    y: float
    id: str = ""
    class_name: str | None = None


@dataclass
class NucleusResult:
    """The engine's answer for one click: a polygon, or an explicit reason why not."""

    click: Click
    found: bool
    polygon: Polygon | None = None
    area_px: float = 0.0
    score: float = 0.0
    reason: str = ""
    extra: dict = field(default_factory=dict)
