"""Loading NuClick weights: the file shipped inside the package by default,
or a user's file; never a download."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bridge.errors import BridgeInputError
from bridge.model.architectures import ArchSpec, build, spec_of
from bridge.model.twoscale import TwoScaleUNet

DEFAULT_WEIGHTS_NAME = "nuclick_default.pt"


@dataclass
class ModelInfo:
    """What a weights file says about itself (reported by the server)."""

    name: str
    version: str
    sha256: str
    width: float
    patch_size: int = 128
    sigma: float = 2.0
    threshold: float = 0.4
    pixel_size_um: float = 0.25
    extra: dict[str, Any] = field(default_factory=dict)
    arch: str = "nuclick"  # the architecture's name (bridge.model.architectures)


def default_weights_path() -> Path:
    return Path(str(resources.files("bridge") / "weights" / DEFAULT_WEIGHTS_NAME))


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_weights(path: Path, model: nn.Module, meta: dict[str, Any]) -> None:
    """Store fp16 weights, the architecture that rebuilds them, and the
    settings inference needs."""
    spec = spec_of(model)
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    blob = {
        "format": "nuclick-bridge/2",
        "arch": spec.as_dict(),
        "width": spec.width,
        "state_dict": state,
        "meta": meta,
    }
    torch.save(blob, tmp)
    tmp.replace(path)


def _arch_of(blob: dict, p: Path) -> ArchSpec:
    """The file's architecture; files written before architectures were
    recorded (format 1) are NuClick networks of the stored width."""
    if "arch" not in blob:
        return ArchSpec("nuclick", {"width": float(blob["width"])})
    arch = blob["arch"]
    if not isinstance(arch, dict) or not isinstance(arch.get("name"), str):
        raise BridgeInputError(f"{p.name}: its architecture record is unreadable")
    return ArchSpec(arch["name"], dict(arch.get("kwargs") or {}))


# What a file's metadata says about the run that made it rather than about the
# network; a file made from others (an average, a joined network) records
# these per source instead.
RUN_KEYS = ("epoch", "val", "train_config", "init", "init_from", "code_commit", "averaged_from", "joined_from")


def source_record(path: str | Path, info: ModelInfo, **more: Any) -> dict[str, Any]:
    """What a file made from ``path`` (an average, a joined network, a
    fine-tune) records about it, so that the model card can trace every
    shipped weight back to the runs that made it: the file, its version and
    network, and the facts of its own making (not its validation figures)."""
    history = [k for k in RUN_KEYS if k != "val"]
    return {
        "file": str(path),
        "version": info.version,
        "arch": info.arch,
        "patch_size": info.patch_size,
        **more,
        **{k: info.extra[k] for k in history if k in info.extra},
    }


def derived_meta(base: ModelInfo, **sources: Any) -> dict[str, Any]:
    """Metadata for a weights file made from others: ``base``'s inference
    settings and other extras, without the facts of the run that made
    ``base``; then ``sources`` (e.g. which files it was made of)."""
    meta = {k: v for k, v in base.extra.items() if k not in RUN_KEYS}
    meta.update(
        name=base.name,
        patch_size=base.patch_size,
        sigma=base.sigma,
        threshold=base.threshold,
        pixel_size_um=base.pixel_size_um,
    )
    meta.update(sources)
    return meta


MODEL_CHOICES = ("accurate", "fast")


def load_model(path: str | Path | None = None, choice: str = "accurate") -> tuple[nn.Module, ModelInfo]:
    """The network (eval mode, fp32) and its info, from ``path`` or the shipped file.

    ``choice="fast"`` takes the whole-patch view of a two-scale file alone (half
    the network time, for CPUs where both views are too slow); a file that
    holds one network has no faster part and is refused."""
    if choice not in MODEL_CHOICES:
        raise BridgeInputError(f"--model must be one of {', '.join(MODEL_CHOICES)}, not {choice!r}")
    p = Path(path) if path is not None else default_weights_path()
    if not p.is_file():
        if path is None:
            raise BridgeInputError(
                "no trained NuClick weights are installed in this package yet; "
                "pass --weights FILE, or use --method watershed"
            )
        raise BridgeInputError(f"weights file not found: {p}")
    try:
        blob = torch.load(p, map_location="cpu", weights_only=True)
        spec = _arch_of(blob, p)
    except BridgeInputError:
        raise
    except Exception as exc:  # corrupt or foreign file
        raise BridgeInputError(f"{p.name} is not a nuclick-bridge weights file ({type(exc).__name__})") from exc
    try:
        model = build(spec)
    except (ValueError, TypeError) as exc:
        raise BridgeInputError(
            f"{p.name} holds a network of architecture {spec.name!r}, which this version of nuclick-bridge "
            f"cannot build ({exc}); upgrade nuclick-bridge or use other weights"
        ) from exc
    try:
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in blob["state_dict"].items()})
    except Exception as exc:
        raise BridgeInputError(
            f"{p.name}: its weights do not fit architecture {spec.label} ({type(exc).__name__})"
        ) from exc
    model.eval()
    meta = dict(blob.get("meta", {}))
    sha = file_sha256(p)
    info = ModelInfo(
        name=str(meta.pop("name", p.stem)),
        version=str(meta.pop("version", sha[:12])),
        sha256=sha,
        width=spec.width,
        patch_size=int(meta.pop("patch_size", 128)),
        sigma=float(meta.pop("sigma", 2.0)),
        threshold=float(meta.pop("threshold", 0.4)),
        pixel_size_um=float(meta.pop("pixel_size_um", 0.25)),
        extra=meta,
        arch=spec.label,
    )
    if choice == "fast":
        return fast_view(model, info, p)
    return model, info


def fast_view(model: nn.Module, info: ModelInfo, path: Path) -> tuple[nn.Module, ModelInfo]:
    """The whole-patch part of a joined (two- or three-view) network, reported as what it is."""
    if not isinstance(model, TwoScaleUNet):
        raise BridgeInputError(
            f"{path.name} holds one network ({info.arch}); --model fast takes the whole-patch view of a "
            "file of joined views (two or three) such as the shipped one"
        )
    part = model.wide
    return part, replace(info, arch=spec_of(part).label, extra={**info.extra, "model": "fast", "joined": info.arch})


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when a GPU is usable, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise BridgeInputError("--device cuda was asked for, but no CUDA GPU is available to torch")
    if name not in ("cpu", "cuda"):
        raise BridgeInputError(f"unknown device {name!r}; use auto, cpu or cuda")
    return torch.device(name)
