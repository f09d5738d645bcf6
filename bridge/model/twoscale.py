"""Two (or three) views of one click: Lite0 on the whole patch and Lite0 on
its centre magnified twice (and on its centre quarter magnified four times),
their logits averaged where they overlap.

Why: the magnified network (``effunet-lite0-x2``) outlines small nuclei better
(four times the encoder cells per nucleus) but sees only half the context;
the plain one sees the whole patch.  Each is better on a different dataset;
their mean keeps the better of the two on each (docs/model-history.md).  A nucleus
more than a quarter patch from its click keeps the wide view alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bridge.model.effunet import EffUNet


class TwoScaleUNet(nn.Module):
    """5 channels in, one logit map out (NuClick's contract): ``wide`` runs on
    the patch, ``near`` (zoom 2) on its centre half, and in that centre the
    logits are the mean of the two.

    ``wide_variant`` gives the whole-patch view its own encoder (default: the
    same as the magnified views'): a larger encoder there costs little, since
    the decoder and full-resolution stage dominate each view's time."""

    def __init__(self, variant: str = "lite0", wide_variant: str | None = None) -> None:
        super().__init__()
        self.variant = variant
        self.wide_variant = wide_variant or variant
        self.wide = EffUNet(self.wide_variant)
        self.near = EffUNet(variant, zoom=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[-1]
        q = n // 4
        wide = self.wide(x)
        near = self.near(x[..., q : n - q, q : n - q])
        # pad (not index-assign) so that the graph exports to ONNX as it is
        return wide + 0.5 * F.pad(near - wide[..., q : n - q, q : n - q], (q, q, q, q))


class ThreeScaleUNet(TwoScaleUNet):
    """:class:`TwoScaleUNet` plus ``closer`` (zoom 4) on the patch's centre
    quarter, where the logits are the mean of all three views.

    Why: nuclei under 100 px are a fifth of CoNSeP's and the worst drawn
    (docs/model-history.md); at zoom 4 a 10-px nucleus spans 40 px of the encoder's
    input.  The centre quarter (32 px of a 128-px patch) holds the clicked
    nucleus itself, so the close view needs no more context than that."""

    def __init__(self, variant: str = "lite0", wide_variant: str | None = None) -> None:
        super().__init__(variant, wide_variant)
        self.closer = EffUNet(variant, zoom=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[-1]
        e = 3 * n // 8
        two = super().forward(x)
        closer = self.closer(x[..., e : n - e, e : n - e])
        # in the centre quarter `two` is the mean of two views: fold the third in
        return two + F.pad((closer - two[..., e : n - e, e : n - e]) / 3, (e, e, e, e))
