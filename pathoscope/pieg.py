"""Pathology-informed Embedding Generation (PiEG, paper Eq. 3) and the search it needs."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from pathoscope.anchor_bank import AnchorBank

PROJECTIONS = ("none", "hypersphere", "manifold")


class CandidateSearch:
    """Exact nearest-anchor search for queries that stay near reference points.

    The k nearest anchors of each reference r are found once. For a query x with shift
    s = ||x - r||, every anchor outside the candidates is at least (r_k - s) away, r_k being r's
    k-th candidate distance (triangle inequality); so when the best candidate is closer than that,
    it is the true nearest anchor. The other positions fall back to a full search. PiEG moves
    v_s a short way from v_n, so one search per training step replaces one per ascent step.
    """

    def __init__(self, bank: AnchorBank, reference: Tensor, k: int = 8) -> None:
        self.bank = bank
        self.reference = reference.detach()  # (M, C)
        sq, idx = bank.search(self.reference, k)  # (M, k) sorted ascending
        self.candidates = idx
        if idx.shape[1] >= len(bank):  # every anchor is a candidate: always certified
            self.bound = torch.full((idx.shape[0],), math.inf, device=idx.device)
        else:
            self.bound = sq[:, -1].sqrt()
        self.fallbacks = 0  # positions that needed a full search (for logging and tests)

    def nearest_to_reference(self) -> Tensor:
        """Index (M,) of each reference's nearest anchor (the first candidate)."""
        return self.candidates[:, 0]

    def nearest(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Like AnchorBank.nearest for x (M, C) close to the references: (dist (M,), idx (M,))."""
        anchors = self.bank.anchors.to(x.device)
        xd = x.detach().float()
        cand = anchors[self.candidates]  # (M, k, C)
        d_cand = torch.linalg.vector_norm(xd[:, None, :] - cand, dim=-1)  # (M, k)
        best, pos = d_cand.min(1)
        idx = self.candidates.gather(1, pos[:, None])[:, 0]
        shift = torch.linalg.vector_norm(xd - self.reference, dim=-1)
        unsure = best > self.bound - shift
        if bool(unsure.any()):
            self.fallbacks += int(unsure.sum())
            _, full = self.bank.search(xd[unsure], 1)
            idx = idx.clone()
            idx[unsure] = full[:, 0]
        return torch.linalg.vector_norm(x - anchors[idx].to(x.dtype), dim=-1), idx


def pieg(
    v_n: Tensor,
    global_terms: Callable[[Tensor], Tensor],
    eta: float,
    steps: int = 20,
    noise_std: float = 0.015,
    noise_mean: float = 0.0,
    keep_noise: bool = True,
    min_distance: float = 0.0,
    projection: str = "none",
    nearest: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None,
    anchors: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Eq. 3: v_s = v_n + delta, delta from `steps` ascent moves of eta * g / ||g|| per position.

    v_n (B, h, w, C). `global_terms(v_s)` returns the terms of L_global that depend on v_s; `g` is
    its gradient w.r.t. v_s, normalised over channels at each position. delta starts as Gaussian
    noise N(noise_mean, noise_std^2); `keep_noise=False` drops that start from the result, as Eq. 3
    prints it. delta is detached: v_s carries v_n's graph only. Only autograd.grad is used, so no
    parameter's .grad is touched.

    Projection of the result, with r = `min_distance` (GLASS's baselines use the two bounded forms):
      "none": positions with ||delta|| < r are scaled up to r (no collapse onto v_n; r=0: off);
      "hypersphere": ||delta|| is clamped to [r, 2r] per position;
      "manifold": v_s is moved along the ray from its nearest anchor so that its distance to the
        normal manifold (the anchors) lies in [r, 2r]; needs `nearest` and `anchors`.
    """
    base = v_n.detach()
    noise = (
        torch.randn(base.shape, generator=generator, device="cpu").to(base) * noise_std + noise_mean
    )
    ascent = torch.zeros_like(base)
    if eta != 0.0:
        for _ in range(steps):
            v = (base + noise + ascent).requires_grad_(True)
            with torch.enable_grad():
                (g,) = torch.autograd.grad(global_terms(v), v)
            norm = torch.linalg.vector_norm(g, dim=-1, keepdim=True)
            ascent = ascent + eta * g / norm.clamp_min(1e-12)
    delta = noise + ascent if keep_noise else ascent
    delta = project(base, delta, min_distance, projection, nearest, anchors)
    return v_n + delta.detach()


def project(
    base: Tensor,
    delta: Tensor,
    radius: float,
    projection: str = "none",
    nearest: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None,
    anchors: Tensor | None = None,
) -> Tensor:
    """The projections of `pieg` (see there) applied to delta (..., C) around base (..., C)."""
    if projection not in PROJECTIONS:
        raise ValueError(f"pieg: projection must be one of {PROJECTIONS}, got {projection!r}")
    if projection == "manifold":
        if nearest is None or anchors is None:
            raise ValueError("pieg: the manifold projection needs `nearest` and `anchors`")
        shape = delta.shape
        v = (base + delta).reshape(-1, shape[-1])
        dist, idx = nearest(v)
        a = anchors[idx].to(v)
        target = dist.clamp(radius, 2.0 * radius)
        direction = (v - a) / dist.clamp_min(1e-12)[:, None]
        v = torch.where(dist[:, None] > 0, a + direction * target[:, None], v)
        return v.reshape(shape) - base
    if radius <= 0.0:
        return delta
    norm = torch.linalg.vector_norm(delta, dim=-1, keepdim=True)
    upper = 2.0 * radius if projection == "hypersphere" else math.inf
    scale = (norm.clamp(radius, upper) / norm.clamp_min(1e-12)).where(
        norm > 0, torch.ones_like(norm)
    )
    return delta * scale
