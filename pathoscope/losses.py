"""Losses: tritanh (Eq. 2), local / global nearest-anchor distances (Eq. 1, Eq. 4), focal, BCE."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from pathoscope.anchor_bank import AnchorBank


def tritanh(
    d_pull: Tensor,
    d_push: Tensor,
    lambda_pull: float = 1.0,
    lambda_push: float = 1.0,
    eps: float = 1e-6,
) -> Tensor:
    """Eq. 2: (e^(l0 d_pull) - e^(l1 d_push) + eps) / (e^(l0 d_pull) + e^(l1 d_push) + eps).

    Computed after dividing numerator and denominator by e^m, m = max of the two exponents, so large
    distances neither overflow nor lose the result (the naive form is inf/inf = NaN at d ~ 100).
    """
    a = lambda_pull * d_pull
    b = lambda_push * d_push
    m = torch.maximum(a, b).detach()
    ea, eb = torch.exp(a - m), torch.exp(b - m)
    e = eps * torch.exp(-m)
    return (ea - eb + e) / (ea + eb + e)


def mask_to_grid(mask: Tensor, size: tuple[int, int], min_fraction: float = 0.5) -> Tensor:
    """(B, 1, H, W) pixel mask -> (B, h, w) bool on the feature grid, by area fraction >= min_fraction.

    GLASS max-pools instead, which dilates small lesions to whole cells.
    """
    frac = F.interpolate(
        mask.float(), size=size, mode="area"
    )  # exact cell averages when H % h == 0
    return frac[:, 0] >= min_fraction - 1e-6


def local_distance(v: Tensor, lesion_mask: Tensor, bank: AnchorBank) -> Tensor:
    """Eq. 1 per image, then the batch mean; in units of `bank.distance_scale`.

    v (B, h, w, C); lesion_mask (B, h, w) bool on the feature grid. Images with an empty mask are
    left out; with no lesion at all the result is a differentiable 0.
    """
    b, h, w, c = v.shape
    flat_mask = lesion_mask.reshape(b, h * w)
    keep = flat_mask.any(1)
    if not bool(keep.any()):
        return v.sum() * 0.0
    dist, _ = bank.nearest(v.reshape(b, h * w, c)[flat_mask])  # only masked positions are searched
    image_of = torch.arange(b, device=v.device)[:, None].expand(b, h * w)[flat_mask]
    per_image = torch.zeros(b, device=v.device, dtype=dist.dtype).index_add(0, image_of, dist)
    per_image = per_image[keep] / flat_mask.sum(1)[keep]
    return per_image.mean() / bank.distance_scale


def positional_mean(dist: Tensor, region: Tensor | None) -> Tensor:
    """Per-image mean of (B, h*w) distances over `region` (B, h*w) bool (all positions if None or empty)."""
    if region is None:
        return dist.mean(1)
    region = region | ~region.any(
        1, keepdim=True
    )  # an image with an empty region uses all positions
    return (dist * region).sum(1) / region.sum(1)


def global_distance(
    v: Tensor,
    bank: AnchorBank,
    foreground: Tensor | None = None,
    search: Callable[..., tuple[Tensor, Tensor]] | None = None,
) -> Tensor:
    """Eq. 4 per image (mean over positions, inside `foreground` (B, h, w) when given), batch mean.

    v (B, h, w, C); the result is in units of `bank.distance_scale`. `search` replaces
    `bank.nearest` (PiEG passes its exact candidate search): it is called as search(x) with all
    B*h*w positions, or, with a foreground, as search(x, rows) with only the positions inside it
    (rows: their flat indices into B*h*w), since the others do not enter the mean.
    """
    b, h, w, c = v.shape
    flat = v.reshape(b * h * w, c)
    if foreground is None:
        dist, _ = (search or bank.nearest)(flat)
        return dist.reshape(b, h * w).mean(1).mean() / bank.distance_scale
    region = foreground.reshape(b, h * w)
    region = region | ~region.any(1, keepdim=True)  # an image with an empty region uses all
    rows = region.reshape(-1).nonzero()[:, 0]  # (R,) positions inside the region
    x = flat[rows]
    dist, _ = bank.nearest(x) if search is None else search(x, rows)
    image_of = rows // (h * w)
    per_image = torch.zeros(b, device=v.device, dtype=dist.dtype).index_add(0, image_of, dist)
    per_image = per_image / region.sum(1).to(dist.dtype)
    return per_image.mean() / bank.distance_scale


def focal_loss(logits: Tensor, target: Tensor, gamma: float = 2.0) -> Tensor:
    """Binary focal loss, mean over positions: -(1 - p_t)^gamma log(p_t), p_t = P(correct label)."""
    target = target.to(logits.dtype)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")  # -log p_t, stable
    p_t = torch.exp(-ce)
    return ((1.0 - p_t) ** gamma * ce).mean()


def bce(logits: Tensor, target: float) -> Tensor:
    """Mean BCE of sigmoid(logits) against a constant label, in the stable logit form."""
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))
