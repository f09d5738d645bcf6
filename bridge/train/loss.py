"""NuClick's hybrid loss: soft Dice + weighted binary cross-entropy, and an
optional Lovász hinge that targets each nucleus's IoU directly."""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("nuclick", "nuclick+lovasz")


def nuclick_loss(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor, eps: float = 1.0):
    """Mean over the batch of (1 - soft Dice) plus pixel-weighted BCE.

    ``weights`` is 10 on neighbouring nuclei and 1 elsewhere, which punishes
    leaking into the next nucleus far more than missing background; 0 marks
    a pixel whose truth is unknown (a lab's partial labels), which neither
    term counts.
    """
    prob = torch.sigmoid(logits) * (weights > 0)
    dims = (1, 2, 3)
    inter = (prob * target).sum(dims)
    dice = (2 * inter + eps) / (prob.sum(dims) + target.sum(dims) + eps)
    bce = F.binary_cross_entropy_with_logits(logits, target, weight=weights, reduction="none")
    bce = bce.sum(dims) / weights.sum(dims)
    return (1 - dice).mean() + bce.mean()


def _jaccard_steps(gt_sorted: torch.Tensor) -> torch.Tensor:
    """Per row, how much 1 - IoU grows as each pixel (in the sorted order) is
    counted wrong: the Lovász extension's weights (Berman et al., CVPR 2018)."""
    positives = gt_sorted.sum(1, keepdim=True)
    inter = positives - gt_sorted.cumsum(1)
    union = positives + (1 - gt_sorted).cumsum(1)
    loss = 1 - inter / union
    return torch.cat([loss[:, :1], loss[:, 1:] - loss[:, :-1]], dim=1)


def lovasz_hinge(logits: torch.Tensor, target: torch.Tensor, known: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the batch of the Lovász hinge of each patch: a convex surrogate
    of 1 - IoU of the thresholded mask, the quantity AJI and PQ score for every
    nucleus, where Dice and BCE only approximate it.  With hinge errors of 0 or
    1 it equals 1 - IoU exactly.  Pixels where ``known`` is False sort last
    with no error, so they change neither the sum nor any known pixel's step."""
    flat = logits.reshape(logits.shape[0], -1)
    gt = target.reshape(target.shape[0], -1).to(flat.dtype)
    errors = 1 - flat * (2 * gt - 1)
    if known is not None:
        errors = torch.where(known.reshape(errors.shape), errors, torch.full_like(errors, -1e4))
    errors_sorted, order = torch.sort(errors, dim=1, descending=True)
    steps = _jaccard_steps(torch.gather(gt, 1, order))
    return (F.relu(errors_sorted) * steps).sum(1).mean()


def training_loss(name: str, logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The loss ``train --loss`` names (one of ``LOSSES``)."""
    loss = nuclick_loss(logits, target, weights)
    if name == "nuclick+lovasz":
        loss = loss + lovasz_hinge(logits, target, weights > 0)
    elif name != "nuclick":
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    return loss
