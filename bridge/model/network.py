"""The NuClick network (Koohbanani et al., 2020): a U-Net-like encoder-decoder
built from residual blocks and multi-scale (parallel dilated) blocks.

``width=1.0`` gives the published widths (64-channel stem, 1024-channel
bottleneck, about 67M parameters); smaller widths give lighter variants with
the same topology, which is what we ship (see the model card).
"""

from __future__ import annotations

import torch
from torch import nn

IN_CHANNELS = 5  # R, G, B, inclusion map, exclusion map
BASE_WIDTHS = (64, 128, 256, 512, 1024)


def _ch(base: int, width: float) -> int:
    """Scale a published channel count, keeping it a multiple of 4 (the
    multi-scale block splits channels in four) and at least 8."""
    return max(8, round(base * width / 4.0) * 4)


class ConvBnRelu(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int = 3, dilation: int = 1) -> None:
        pad = dilation * (k // 2)
        super().__init__(
            nn.Conv2d(cin, cout, k, padding=pad, dilation=dilation, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with an identity (or 1x1 projection) shortcut."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.skip = (
            nn.Identity() if cin == cout else nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
        )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.skip(x))


class MultiScaleBlock(nn.Module):
    """Four parallel convolutions with different kernel sizes and dilation
    rates, concatenated, so that one level sees nuclei of many sizes."""

    def __init__(
        self,
        channels: int,
        kernels: tuple[int, ...] = (3, 3, 5, 5),
        dilations: tuple[int, ...] = (1, 3, 3, 6),
    ) -> None:
        super().__init__()
        branch = channels // len(kernels)
        self.branches = nn.ModuleList(
            ConvBnRelu(channels, branch, k, d) for k, d in zip(kernels, dilations, strict=True)
        )
        self.fuse = ConvBnRelu(branch * len(kernels), channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fuse(torch.cat([b(x) for b in self.branches], dim=1))


class NuClickNet(nn.Module):
    """5 channels in (RGB in [0, 1], inclusion, exclusion), one logit map out.

    ``forward`` returns logits; apply ``torch.sigmoid`` for probabilities
    (kept separate so the training loss can use the numerically stable
    ``BCEWithLogits``).
    """

    def __init__(self, width: float = 1.0) -> None:
        super().__init__()
        self.width = float(width)
        c1, c2, c3, c4, c5 = (_ch(b, width) for b in BASE_WIDTHS)
        half = _ch(32, width)
        self.stem = nn.Sequential(ConvBnRelu(IN_CHANNELS, c1, 7), ConvBnRelu(c1, half, 5), ConvBnRelu(half, half, 3))
        self.enc1 = nn.Sequential(ResidualBlock(half, c1), ResidualBlock(c1, c1))
        self.enc2 = nn.Sequential(ResidualBlock(c1, c2), MultiScaleBlock(c2))
        self.enc3 = nn.Sequential(
            ResidualBlock(c2, c3), ResidualBlock(c3, c3), MultiScaleBlock(c3, dilations=(1, 3, 2, 3))
        )
        self.enc4 = nn.Sequential(
            ResidualBlock(c3, c4), ResidualBlock(c4, c4), MultiScaleBlock(c4, dilations=(1, 2, 2, 3))
        )
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = nn.Sequential(ConvBnRelu(c4, c5), ConvBnRelu(c5, c5), ConvBnRelu(c5, c5))
        self.up4 = nn.ConvTranspose2d(c5, c4, 2, stride=2)
        self.dec4 = nn.Sequential(
            ResidualBlock(2 * c4, c4), ResidualBlock(c4, c4), MultiScaleBlock(c4, dilations=(1, 2, 2, 3))
        )
        self.up3 = nn.ConvTranspose2d(c4, c3, 2, stride=2)
        self.dec3 = nn.Sequential(ResidualBlock(2 * c3, c3), MultiScaleBlock(c3, dilations=(1, 3, 2, 3)))
        self.up2 = nn.ConvTranspose2d(c3, c2, 2, stride=2)
        self.dec2 = nn.Sequential(ResidualBlock(2 * c2, c2), MultiScaleBlock(c2))
        self.up1 = nn.ConvTranspose2d(c2, c1, 2, stride=2)
        self.dec1 = nn.Sequential(ResidualBlock(2 * c1, c1), ConvBnRelu(c1, half, 3))
        self.head = nn.Conv2d(half, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s1 = self.enc1(self.stem(x))
        s2 = self.enc2(self.pool(s1))
        s3 = self.enc3(self.pool(s2))
        s4 = self.enc4(self.pool(s3))
        b = self.bottleneck(self.pool(s4))
        d4 = self.dec4(torch.cat([self.up4(b), s4], 1))
        d3 = self.dec3(torch.cat([self.up3(d4), s3], 1))
        d2 = self.dec2(torch.cat([self.up2(d3), s2], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), s1], 1))
        return self.head(d1)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
