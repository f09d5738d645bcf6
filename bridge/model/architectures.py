"""The networks a weights file can name, as data: an architecture is a name
plus the keyword arguments that rebuild it.

Why: the weights file, ``train --arch`` and the server's ``GetModelInfo`` all
speak of the same thing, so a new network is one entry here, never a new code
path in the engine.  Every network takes NuClick's five channels and returns
one logit map of the same size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from bridge.model.effunet import EffUNet
from bridge.model.network import NuClickNet
from bridge.model.twoscale import ThreeScaleUNet, TwoScaleUNet


@dataclass(frozen=True)
class ArchSpec:
    """What rebuilds a network: ``ARCHITECTURES[name](**kwargs)``."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kwargs": dict(self.kwargs)}

    @property
    def width(self) -> float:
        """The channel width multiplier (1.0 for networks that have none)."""
        return float(self.kwargs.get("width", 1.0))

    @property
    def label(self) -> str:
        """Short human name, e.g. ``nuclick-w0.25`` or ``effunet-lite0``."""
        if self.name == "nuclick":
            return f"nuclick-w{self.width:g}"
        return self.name


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "nuclick": NuClickNet,
    "effunet-lite0": lambda: EffUNet("lite0"),
    "effunet-lite1": lambda: EffUNet("lite1"),
    "effunet-lite2": lambda: EffUNet("lite2"),
    # Lite0 plus a 16-channel full-resolution refinement for outlines (EdgeRefinement)
    "effunet-lite0-edge": lambda: EffUNet("lite0", refine=16),
    # Lite0 on the patch magnified twice: small nuclei cover four times the
    # encoder's cells; same GFLOP as Lite0 at twice the patch size
    "effunet-lite0-x2": lambda: EffUNet("lite0", zoom=2),
    # the mean of Lite0 on the patch and Lite0-x2 on its centre (scripts/combine_scales.py
    # joins two trained files); twice Lite0's cost
    "effunet-lite0-2scale": lambda: TwoScaleUNet("lite0"),
    # Lite0 on the patch magnified four times (train it on a quarter of the patch)
    "effunet-lite0-x4": lambda: EffUNet("lite0", zoom=4),
    # the two-scale network plus Lite0-x4 on the centre quarter; three Lite0s' cost
    "effunet-lite0-3scale": lambda: ThreeScaleUNet("lite0"),
    # the same three views with a Lite2 encoder in the whole-patch view (Lite2 alone
    # outlines consep better than Lite0 alone, at about the same cost per patch; in
    # three views it measured level with the shipped file, so it is not shipped)
    "effunet-lite2wide-3scale": lambda: ThreeScaleUNet("lite0", wide_variant="lite2"),
}


# A network that extends another: `train --init` may start it from that one's
# trained weights, every shared layer copied and the new parts (the parameters
# under the given prefix; "" when there are none) at their identity start
# (EdgeRefinement's last BatchNorm is zero), so the edge network begins with
# their outputs; the magnified one begins with their weights on a larger view.
GROWS_FROM: dict[str, tuple[str, str]] = {
    "effunet-lite0-edge": ("effunet-lite0", "refine."),
    "effunet-lite0-x2": ("effunet-lite0", ""),  # the same parameters, seeing a magnified patch
    "effunet-lite0-x4": ("effunet-lite0-x2", ""),  # magnified twice more
}


@dataclass(frozen=True)
class JoinedFrom:
    """How a joined network is made: ``parts`` (architecture, patch size) are
    trained alone, then ``script`` joins their files; only then may the joined
    file be fine-tuned as a whole (``train --init``)."""

    script: str
    parts: tuple[tuple[str, int], ...]

    def recipe(self) -> str:
        """The commands, for an error message."""
        trains = " and ".join(f"--arch {a} --patch-size {p}" for a, p in self.parts)
        return f"train {trains}, then join them with {self.script}"


# Networks made by joining trained files.
JOINED_FROM: dict[str, JoinedFrom] = {
    "effunet-lite0-2scale": JoinedFrom("scripts/combine_scales.py", (("effunet-lite0", 128), ("effunet-lite0-x2", 64))),
    "effunet-lite0-3scale": JoinedFrom(
        "scripts/combine_scales.py", (("effunet-lite0", 128), ("effunet-lite0-x2", 64), ("effunet-lite0-x4", 32))
    ),
    "effunet-lite2wide-3scale": JoinedFrom(
        "scripts/combine_scales.py", (("effunet-lite2", 128), ("effunet-lite0-x2", 64), ("effunet-lite0-x4", 32))
    ),
}


def parse_arch(name: str, width: float | None = None) -> ArchSpec:
    """The spec for a command-line ``--arch`` (``--width`` applies to nuclick only)."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}")
    if name == "nuclick":
        return ArchSpec(name, {"width": float(1.0 if width is None else width)})
    return ArchSpec(name)


def from_label(label: str) -> ArchSpec:
    """Inverse of :attr:`ArchSpec.label` (``nuclick-w0.25`` -> nuclick at width 0.25)."""
    if label.startswith("nuclick-w"):
        return parse_arch("nuclick", float(label.removeprefix("nuclick-w")))
    return parse_arch(label)


def build(spec: ArchSpec) -> nn.Module:
    """A fresh (randomly initialised) network of ``spec``; ``ValueError`` for an unknown one."""
    if spec.name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {spec.name!r}; this version knows {', '.join(ARCHITECTURES)}")
    model = ARCHITECTURES[spec.name](**spec.kwargs)
    model.arch = spec
    return model


def spec_of(model: nn.Module) -> ArchSpec:
    """The spec a network was built from (``build`` records it; a bare
    ``NuClickNet`` is recognised by its width)."""
    spec = getattr(model, "arch", None)
    if isinstance(spec, ArchSpec):
        return spec
    if isinstance(model, NuClickNet):
        return ArchSpec("nuclick", {"width": model.width})
    if isinstance(model, TwoScaleUNet):  # ThreeScaleUNet included
        encoders = model.variant if model.wide_variant == model.variant else f"{model.wide_variant}wide"
        views = 3 if isinstance(model, ThreeScaleUNet) else 2
        return ArchSpec(f"effunet-{encoders}-{views}scale")
    if isinstance(model, EffUNet):
        edge = "-edge" if model.refine is not None else ""
        zoom = f"-x{model.zoom}" if model.zoom > 1 else ""
        return ArchSpec(f"effunet-{model.variant}{edge}{zoom}")
    raise ValueError(f"{type(model).__name__} is not a registered architecture")
