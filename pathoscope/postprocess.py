"""Post-processing, in one place: patch scores -> anomaly_map -> image score -> decision at tau.

s (B, 1, h, w) --bilinear upsample to (H, W), Gaussian blur--> anomaly_map (B, 1, H, W)
score (B,) = max of anomaly_map inside the foreground (the whole map where it is empty)
tau = a quantile of the validation normals' scores (`ImageThreshold`, the model's post-processor)
decision: pathological where score >= tau, and pred_mask = anomaly_map >= tau (`pathological`,
the only comparison with tau in the project; metrics, panels, predict, montage and export use it)
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


class GaussianBlur(nn.Module):
    """Separable Gaussian blur of (B, 1, H, W) maps, radius 4 sigma, reflect padding."""

    def __init__(self, sigma: float) -> None:
        super().__init__()
        self.sigma = sigma
        radius = max(1, math.ceil(4.0 * sigma)) if sigma > 0 else 0
        x = torch.arange(-radius, radius + 1, dtype=torch.float32)
        kernel = torch.exp(-0.5 * (x / sigma) ** 2) if sigma > 0 else torch.ones(1)
        self.register_buffer("kernel", kernel / kernel.sum(), persistent=False)
        self.radius = radius

    def forward(self, m: Tensor) -> Tensor:
        if self.radius == 0:
            return m
        r = self.radius
        k = self.kernel.to(m.dtype)
        m = (
            F.pad(m, (r, r, 0, 0), mode="reflect")
            if m.shape[-1] > r
            else F.pad(m, (r, r, 0, 0), mode="replicate")
        )
        m = F.conv2d(m, k.view(1, 1, 1, -1))
        m = (
            F.pad(m, (0, 0, r, r), mode="reflect")
            if m.shape[-2] > r
            else F.pad(m, (0, 0, r, r), mode="replicate")
        )
        return F.conv2d(m, k.view(1, 1, -1, 1))


def anomaly_map(patch_scores: Tensor, size: tuple[int, int], blur: nn.Module) -> Tensor:
    """(B, 1, h, w) patch scores -> (B, 1, H, W) anomaly map: bilinear upsampling, then `blur`."""
    return blur(F.interpolate(patch_scores, size=size, mode="bilinear", align_corners=False))


def image_score(anomaly_map: Tensor, foreground: Tensor | None = None) -> Tensor:
    """Max of (B, 1, H, W) maps inside the foreground (B, 1, H, W; > 0 = inside); the whole map
    where the foreground is empty or not given."""
    flat = anomaly_map.flatten(1)
    if foreground is None:
        return flat.amax(1)
    fg = foreground.flatten(1) > 0
    fg = fg | ~fg.any(1, keepdim=True)
    return flat.masked_fill(~fg, float("-inf")).amax(1)


def threshold_from_normals(scores: np.ndarray, labels: np.ndarray, quantile: float) -> float | None:
    """tau: the `quantile` (linear interpolation) of the scores of normal items (label 0).

    None when there is no normal item.
    """
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"tau_quantile must be in [0, 1]; got {quantile}")
    normal = np.asarray(scores, dtype=np.float64)[np.asarray(labels) == 0]
    if normal.size == 0:
        return None
    return float(np.quantile(normal, quantile))


def pathological(values: Any, tau: float) -> Any:
    """The decision rule, defined here only: True where `values` (scores or anomaly maps: a float,
    a numpy array or a tensor) are >= tau. A score exactly at tau is pathological."""
    return values >= tau


class ImageThreshold(nn.Module):
    """The image threshold tau and the decision at it: the model's post-processor.

    Holds tau as a buffer (NaN until set, so checkpoints carry it), sets it from validation
    normals (`fit`) and turns scores or maps into decisions (`decide`, through `pathological`).
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("tau", torch.tensor(float("nan")))

    @property
    def value(self) -> float | None:
        """tau as a float (the stored float32 value); None while unset."""
        return tau_value(self.tau)

    def fit(self, scores: np.ndarray, labels: np.ndarray, quantile: float) -> float | None:
        """Set tau to the `quantile` of the normal items' scores (`threshold_from_normals`); NaN
        (unset) when there is no normal item. Returns the stored value."""
        tau = threshold_from_normals(scores, labels, quantile)
        self.tau.fill_(float("nan") if tau is None else tau)
        return self.value

    def set(self, tau: float | None) -> None:
        """Store a given tau (None: unset)."""
        self.tau.fill_(float("nan") if tau is None else tau)

    def decide(self, values: Any) -> Any:
        """`pathological(values, tau)`; None while tau is unset."""
        tau = self.value
        return None if tau is None else pathological(values, tau)


def tau_value(tau: Tensor) -> float | None:
    """A stored tau buffer as a float; None while it is unset (NaN: no validation ran)."""
    value = float(tau)
    return None if math.isnan(value) else value
