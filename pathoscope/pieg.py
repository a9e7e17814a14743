"""Pathology-informed Embedding Generation (PiEG, paper Eq. 3) and the search it needs."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
from torch import Tensor

from pathoscope.anchor_bank import AnchorBank, one_cpu_thread
from pathoscope.hparams import PiEGParams

PROJECTIONS = ("none", "hypersphere", "manifold")


class CandidateSearch:
    """Exact nearest-anchor search for queries that move in small steps (PiEG's ascent).

    Each position (row) keeps a reference point r, its k nearest anchors c_j, D_j = r - c_j,
    |D_j|^2, and a lower bound L on its distance to every other anchor (the (k+1)-th nearest).
    A query x = r + delta is answered among the candidates, with one batched product per query:
    |x - c_j|^2 = |D_j|^2 + 2 D_j.delta + |delta|^2. It is certified when the best candidate is
    closer than L - |delta|: by the triangle inequality no other anchor can be nearer. A row that
    is not certified is re-referenced: one k-nearest search from x answers x (its first result)
    and makes x the row's new reference. So the answers stay exact however far the queries move,
    and a row costs a k-search only when it has moved about half its candidates' spread.

    Rows are set up lazily, by a k-search from their first query, so positions that are never
    asked about (Eq. 4 outside the foreground) cost nothing. Rounding: the certificate keeps a
    margin for the float error of the search's squared distances and of the expansion above, so
    an answer differs from the full search's only where two anchors tie within that error.
    """

    def __init__(self, bank: AnchorBank, reference: Tensor, k: int = 8) -> None:
        self.bank = bank
        self.reference = reference.detach()  # (M, C): rows; nearest_to_reference() answers it
        self.k = min(k, len(bank))
        self.fallbacks = 0  # queries that were not certified (re-referenced), for logs and tests
        self.searches = 0  # rows k-searched: lazy set-ups + re-references
        m, c = self.reference.shape
        dev = self.reference.device
        anchors = bank.anchors.detach().to(dev).float()
        self._anchors = anchors  # (A, C)
        self._anchor_sq_max = float((anchors * anchors).sum(1).max()) if len(bank) else 0.0
        self._slot = torch.full((m,), -1, dtype=torch.long, device=dev)  # row -> storage slot
        self._ref = torch.empty(0, c, device=dev)  # (S, C) per slot: the reference r
        self._cand = torch.empty(0, self.k, dtype=torch.long, device=dev)  # (S, k)
        # (S, C, k): D = r - anchors[cand], channels first so that the per-query product is one
        # bmm of (S, 1, C) by (S, C, k) (5x faster on CPU than (S, k, C) by (S, C, 1)).
        self._diff = torch.empty(0, c, self.k, device=dev)
        self._diff_sq = torch.empty(0, self.k, device=dev)  # (S, k): |D|^2
        self._bound = torch.empty(0, device=dev)  # (S,): L, lower bound to non-candidates
        eps_in = _matmul_input_eps(dev)
        # Relative error of a float32 dot product of length C (worst case; inputs rounded by
        # eps_in where matmuls run in TF32 / bf16), for sums of squared distances.
        self._rtol = (c + 4) * torch.finfo(torch.float32).eps + 4.0 * eps_in

    def nearest_to_reference(self) -> Tensor:
        """Index (M,) of each reference's nearest anchor."""
        return self.nearest(self.reference)[1]

    def nearest(self, x: Tensor, rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Like AnchorBank.nearest: (dist (R,), differentiable w.r.t. x, idx (R,)).

        x (R, C) are the queries of rows `rows` (R,) (indices into the M references); without
        `rows`, x holds all M rows in order.
        """
        xd = x.detach().float()
        m = self._slot.shape[0]
        if rows is None:
            if xd.shape[0] != m:
                raise ValueError(
                    f"CandidateSearch: expected ({m}, C) queries, got {tuple(x.shape)}"
                )
            rows = torch.arange(m, device=xd.device)
        dev = xd.device
        with one_cpu_thread(dev):  # small operations: see one_cpu_thread
            slots = self._slot[rows]
            new = slots < 0
            if bool(new.any()):
                slots = self._allocate(rows, new)
            if bool(new.all()):
                idx, unsure = torch.empty_like(slots), new
            elif bool(new.any()):
                idx, unsure = torch.empty_like(slots), new.clone()
                idx[~new], unsure[~new] = self._certify(slots[~new], xd[~new])
            else:
                idx, unsure = self._certify(slots, xd)
        if bool(unsure.any()):
            u = unsure.nonzero()[:, 0]
            # A k-search is a matrix product against every anchor: from 64 rows on, two threads
            # ran it in 60 % of one thread's time (4,096 x 384 anchors, idle machine; run K).
            threads = contextlib.nullcontext() if len(u) >= 64 else one_cpu_thread(dev)
            with threads:
                idx[u] = self._set_reference(slots[u], xd[u])
        anchor = self._anchors[idx].to(x.device, x.dtype)
        return torch.linalg.vector_norm(x - anchor, dim=-1), idx

    def _certify(self, slots: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """Best candidate of x (S, C) at these slots: (idx (S,), not certified (S,) bool)."""
        if _is_range(slots, self._ref.shape[0]):
            sl: Tensor | slice = slice(None)  # the usual case: the set-up's rows, no gathers
        else:
            sl = slots
        delta = x - self._ref[sl]  # (S, C)
        d_sq = (delta * delta).sum(1)  # (S,)
        diff_sq = self._diff_sq[sl]  # (S, k)
        sq = torch.bmm(delta[:, None, :], self._diff[sl])[:, 0]  # (S, k): D.delta
        sq = sq.mul_(2.0).add_(diff_sq).add_(d_sq[:, None])  # |x - c|^2 = |D + delta|^2
        best, pos = sq.min(1)  # (S,)
        # Certified: sqrt(best + err) < L - |delta|, err bounding the expansion's rounding.
        err = self._rtol * 2.0 * (diff_sq.gather(1, pos[:, None])[:, 0] + d_sq)
        margin = self._bound[sl] - d_sq.sqrt() * (1.0 + self._rtol)
        unsure = (margin <= 0) | (best.clamp_min(0.0) + err >= margin * margin)
        self.fallbacks += int(unsure.sum())
        return self._cand[sl].gather(1, pos[:, None])[:, 0], unsure

    def _allocate(self, rows: Tensor, new: Tensor) -> Tensor:
        """Give the new rows (rows[new], in order) storage slots; returns the slots of `rows`."""
        fresh = rows[new]
        if fresh.unique().numel() != fresh.numel():
            raise ValueError("CandidateSearch: rows must not repeat")
        start, n = self._ref.shape[0], fresh.numel()
        self._slot[fresh] = torch.arange(start, start + n, device=self._slot.device)
        c = self._ref.shape[1]
        self._ref = torch.cat([self._ref, self._ref.new_empty(n, c)])
        self._cand = torch.cat([self._cand, self._cand.new_empty(n, self.k)])
        self._diff = torch.cat([self._diff, self._diff.new_empty(n, c, self.k)])
        self._diff_sq = torch.cat([self._diff_sq, self._diff_sq.new_empty(n, self.k)])
        self._bound = torch.cat([self._bound, self._bound.new_empty(n)])
        return self._slot[rows]

    def _set_reference(self, slots: Tensor, x: Tensor) -> Tensor:
        """k-search from x (U, C): x becomes these slots' reference; returns x's nearest (U,)."""
        self.searches += int(x.shape[0])
        every = self.k >= len(self.bank)  # every anchor is a candidate: always certified
        sq, cand = self.bank.search(x, self.k if every else self.k + 1)  # ascending
        cand = cand[:, : self.k].to(x.device)  # (U, k); the (k+1)-th only bounds the others
        diff = self._anchors.index_select(0, cand.reshape(-1)).view(*cand.shape, -1)  # (U, k, C)
        torch.sub(x[:, None, :], diff, out=diff)  # D = x - c, in place
        diff_sq = torch.linalg.vector_norm(diff, dim=-1).square_()  # (U, k), one pass
        diff = diff.transpose(1, 2)  # (U, C, k), the layout of the stored D
        if every:
            bound = torch.full((x.shape[0],), math.inf, device=x.device)
        else:
            # Every other anchor is at least as far as the (k+1)-th, up to the search's rounding
            # of squared distances, ~ rtol (|x|^2 + |a|^2).
            tol = self._rtol * ((x * x).sum(1) + self._anchor_sq_max)
            bound = (sq[:, self.k].to(x.device) - tol).clamp_min(0.0).sqrt()
        if _is_range(slots, self._ref.shape[0]):  # every row at once (the set-up): no copies
            self._ref, self._cand, self._diff = x.clone(), cand, diff.contiguous()
            self._diff_sq, self._bound = diff_sq, bound
        else:
            self._ref.index_copy_(0, slots, x)
            self._cand.index_copy_(0, slots, cand)
            self._diff.index_copy_(0, slots, diff.contiguous())
            self._diff_sq.index_copy_(0, slots, diff_sq)
            self._bound.index_copy_(0, slots, bound)
        return cand[:, 0]


def _is_range(slots: Tensor, n: int) -> bool:
    """slots == [0, 1, ..., n-1]: the stored rows in storage order."""
    if slots.numel() != n:
        return False
    return bool((slots == torch.arange(n, device=slots.device)).all())


def _matmul_input_eps(device: torch.device) -> float:
    """Rounding of float32 matmul inputs: 0 in full float32, the unit roundoff of TF32 / bf16 where
    torch may use them (float32_matmul_precision "high" / "medium": CUDA, and oneDNN on CPU)."""
    precision = torch.get_float32_matmul_precision()
    if precision == "medium":
        return 2.0**-8
    if precision == "high" or (device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32):
        return 2.0**-11
    return 0.0


def feature_unit(params: PiEGParams, distance_scale: float) -> float:
    """The feature-space length of one unit of eta and of the Gaussian start (`PiEGParams.units`):
    1 ("absolute") or the bank's `distance_scale` ("distance_scale")."""
    return distance_scale if params.units == "distance_scale" else 1.0


def pieg(
    v_n: Tensor,
    global_terms: Callable[[Tensor], Tensor],
    params: PiEGParams = PiEGParams(),
    *,
    distance_scale: float = 1.0,
    nearest: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None,
    anchors: Tensor | None = None,
    generator: torch.Generator | None = None,
    score: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Eq. 3: v_s = v_n + delta, delta from `params.steps` moves of eta * g / ||g|| per position.

    v_n (B, h, w, C). `global_terms(v_s)` returns the terms of L_global that depend on v_s; `g` is
    its gradient w.r.t. v_s, normalised over channels at each position. `params.direction`:
    "descent" (the default) subtracts eta * g / ||g|| (L_global falls: D(v_s) rises and v_s leaves
    the anchors, the paper's text: larger eta, GPEs further from the normal distribution); "ascent"
    adds it (Eq. 3 as printed: L_global rises, so D(v_s) falls and v_s nears the anchors: hard
    negatives, as GLASS). delta starts as Gaussian noise N(noise_mean, noise_std^2);
    `keep_noise=False` drops that start from the result, as Eq. 3 prints it. `enabled=False` takes
    no step (v_s = v_n + the start). delta is detached: v_s carries v_n's graph only. Only
    autograd.grad is used, so no parameter's .grad is touched.

    `params.stop_at` > 0 needs `score(v)`: D's probability (...,) at each position of v (...,
    C). Before each step, a position whose score has reached stop_at (>= with "descent", <= with
    "ascent") does not move in that step.

    Units: eta, noise_std and noise_mean are multiplied by `feature_unit(params, distance_scale)`;
    min_distance by `distance_scale` (the bank's, as `PathoScopeModel` passes it; 1: as given).

    Projection of the result, with r = min_distance (GLASS's baselines use the two bounded forms):
      "none": positions with ||delta|| < r are scaled up to r (no collapse onto v_n; r=0: off);
      "hypersphere": ||delta|| is clamped to [r, 2r] per position;
      "manifold": v_s is moved along the ray from its nearest anchor so that its distance to the
        normal manifold (the anchors) lies in [r, 2r]; needs `nearest` and `anchors`.
    """
    unit = feature_unit(params, distance_scale)
    eta = params.eta * unit if params.enabled else 0.0
    steps = params.steps if params.enabled else 0
    base = v_n.detach()
    noise = (
        torch.randn(base.shape, generator=generator, device="cpu").to(base)
        * (params.noise_std * unit)
        + params.noise_mean * unit
    )
    step = eta if params.direction == "ascent" else -eta
    if params.stop_at > 0.0 and score is None:
        raise ValueError("pieg: stop_at needs `score` (D's probability at each position)")
    moved = torch.zeros_like(base)
    if eta != 0.0:
        for _ in range(steps):
            v = (base + noise + moved).requires_grad_(True)
            with torch.enable_grad():
                (g,) = torch.autograd.grad(global_terms(v), v)
            move = step * g / torch.linalg.vector_norm(g, dim=-1, keepdim=True).clamp_min(1e-12)
            if params.stop_at > 0.0:
                move = move * _still_moving(score, v.detach(), params)[..., None]
            moved = moved + move
    delta = noise + moved if params.keep_noise else moved
    radius = params.min_distance * distance_scale
    delta = project(base, delta, radius, params.projection, nearest, anchors)
    return v_n + delta.detach()


def _still_moving(score: Callable[[Tensor], Tensor], v: Tensor, params: PiEGParams) -> Tensor:
    """1.0 where D(v) has not reached `params.stop_at` in `params.direction`, else 0.0 (...,)."""
    with torch.no_grad():
        p = score(v)
    below = p < params.stop_at if params.direction == "descent" else p > params.stop_at
    return below.to(v.dtype)


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
