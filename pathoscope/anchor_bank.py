"""Prototypical anchor bank Phi_A (paper Section 2.2): greedy coreset + nearest-anchor search."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import faiss
import numpy as np
import torch
from torch import Tensor, nn

BACKENDS = ("faiss", "torch")


def _sq_dists(x: Tensor, y: Tensor) -> Tensor:
    """Squared Euclidean distances (N, M) via ||x||^2 - 2 x.y + ||y||^2, clamped at 0."""
    d = (x * x).sum(1, keepdim=True) - 2.0 * x @ y.T + (y * y).sum(1)[None]
    return d.clamp_min_(0.0)


def greedy_coreset(
    features: Tensor,
    n: int,
    projection_dim: int | None = 128,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Greedy k-centre selection (Sener & Savarese; PatchCore's coreset) of `n` rows of (N, C).

    The selection runs on a random Gaussian projection to `projection_dim` dimensions (distances are
    approximately preserved, and it is much cheaper), starting from a random point.
    Returns the selected row indices (n,), in selection order.
    """
    num = features.shape[0]
    if n >= num:
        return torch.arange(num)
    feats = features.detach().float()
    if projection_dim is not None and feats.shape[1] > projection_dim:
        proj = torch.randn(feats.shape[1], projection_dim, generator=generator) / math.sqrt(
            projection_dim
        )
        feats = feats @ proj.to(feats.device)
    start = int(torch.randint(num, (1,), generator=generator))
    return _k_centre(feats, n, start)


def _k_centre(feats: Tensor, n: int, start: int, refresh: int = 8) -> Tensor:
    """Exact greedy k-centre on (N, P) from `start`, with triangle-inequality pruning.

    Each point remembers its closest centre; a new centre c can only get closer to a point x of
    centre c' when d(c, c') < 2 d(x, c'), so whole groups whose radius is below d(c, c') / 2 are
    skipped. The selection is identical to the plain O(N) update per step, much cheaper late on.
    Group radii are upper bounds, recomputed exactly every `refresh` steps: a group only loses
    points, so a stale radius prunes less but never wrongly.
    """
    num = feats.shape[0]
    sq = (feats * feats).sum(1)  # (N,)
    selected = torch.empty(n, dtype=torch.long)
    selected[0] = start
    centres = feats.new_empty(n, feats.shape[1])  # selected rows in order: no gather per step
    centres[0] = feats[start]
    centre_sq = sq.new_empty(n)
    centre_sq[0] = sq[start]
    min_d = (sq - 2.0 * feats @ feats[start] + sq[start]).clamp_min_(0.0)  # squared, (N,)
    min_d[start] = 0.0
    assign = torch.zeros(num, dtype=torch.long, device=feats.device)  # each point's centre
    radius = torch.zeros(n, device=feats.device)  # per centre: max distance (not squared)
    radius[0] = min_d.max().sqrt()
    with one_cpu_thread(feats.device):
        for i in range(1, n):
            nxt = int(torch.argmax(min_d))
            selected[i] = nxt
            c = feats[nxt]
            centres[i] = c
            centre_sq[i] = sq[nxt]
            d_centres = (centre_sq[:i] - 2.0 * centres[:i] @ c + sq[nxt]).clamp_min_(0.0).sqrt()
            groups = d_centres < 2.0 * radius[:i]  # only these groups can gain a closer centre
            pts = groups[assign].nonzero().squeeze(1)
            if pts.numel() > num // 2:  # gathering most rows costs more than one pass over all
                d = (sq - 2.0 * feats @ c + sq[nxt]).clamp_min_(0.0)
                closer = d < min_d
                moved = closer.nonzero().squeeze(1)
                min_d = torch.minimum(min_d, d)
            else:
                d = (sq[pts] - 2.0 * feats[pts] @ c + sq[nxt]).clamp_min_(0.0)
                closer = d < min_d[pts]
                moved = pts[closer]
                min_d[moved] = d[closer]
            assign[moved] = i
            min_d[nxt] = 0.0
            assign[nxt] = i
            if i % refresh == 0:
                radius[: i + 1] = (
                    torch.zeros(i + 1, device=feats.device)
                    .scatter_reduce_(0, assign, min_d, "amax")
                    .sqrt()
                )
            elif moved.numel():
                radius[i] = min_d[moved].max().sqrt()  # the new group's exact radius
    return selected


@contextmanager
def one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run a block on one CPU intra-op thread (no-op off the CPU). For loops of small operations
    (O(N) vectors, a few MB): intra-op threads then cost more in synchronisation than they save,
    most of all on a loaded machine (the greedy k-centre loop ran 8x slower with 2 threads on a
    loaded 2-core machine; see BENCHMARKS.md)."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class AnchorBank(nn.Module):
    """Anchors (A, C) in a registered buffer plus a search index rebuilt from it (never pickled).

    `nearest(x)` returns the Euclidean distance to the nearest anchor with a gradient w.r.t. x
    (the search itself runs on a detached copy). `distance_scale` is the median nearest-anchor
    distance of held-out features, the unit in which contrastive losses read distances.
    """

    def __init__(self, dim: int, backend: str = "faiss") -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"AnchorBank: backend must be one of {BACKENDS}, got {backend!r}")
        self.dim = dim
        self.backend = backend
        self.register_buffer("anchors", torch.empty(0, dim))
        self.register_buffer("distance_scale", torch.tensor(1.0))
        self._index: faiss.Index | None = None

    # -- construction -------------------------------------------------------------------------
    @property
    def built(self) -> bool:
        return self.anchors.shape[0] > 0

    def __len__(self) -> int:
        return int(self.anchors.shape[0])

    def build(
        self,
        features: Tensor,
        coreset_ratio: float = 1.0,
        max_anchors: int = 4096,
        generator: torch.Generator | None = None,
        heldout: Tensor | None = None,
    ) -> AnchorBank:
        """Select anchors from features (N, C); set `distance_scale` from `heldout` (M, C) if given.

        The bank keeps ceil(coreset_ratio * N) anchors, at most `max_anchors`. Without held-out
        features the scale stays 1 (a bank's own points are at distance 0 and say nothing).
        """
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(
                f"AnchorBank.build: expected features (N, {self.dim}), got {tuple(features.shape)}"
            )
        if not 0.0 < coreset_ratio <= 1.0:
            raise ValueError(
                f"AnchorBank.build: coreset_ratio must be in (0, 1], got {coreset_ratio}"
            )
        n = min(max_anchors, math.ceil(coreset_ratio * features.shape[0]))
        idx = greedy_coreset(features, n, generator=generator)
        self.anchors = (
            features.detach()[idx.to(features.device)].float().contiguous().to(self.anchors.device)
        )
        self._index = None
        if heldout is not None and heldout.shape[0] > 0:
            dist, _ = self.nearest(heldout.detach().float().to(self.anchors.device))
            self.distance_scale = dist.median().clamp_min(1e-6).to(self.distance_scale)
        else:
            self.distance_scale = torch.ones_like(self.distance_scale)
        return self

    @classmethod
    def from_features(
        cls,
        features: Tensor,
        coreset_ratio: float = 1.0,
        max_anchors: int = 4096,
        backend: str = "faiss",
        generator: torch.Generator | None = None,
        heldout: Tensor | None = None,
    ) -> AnchorBank:
        bank = cls(features.shape[1], backend=backend)
        return bank.build(
            features, coreset_ratio, max_anchors, generator=generator, heldout=heldout
        )

    # -- search ---------------------------------------------------------------------------------
    def _faiss_index(self) -> faiss.Index:
        if self._index is None or self._index.ntotal != len(self):
            index = faiss.IndexFlatL2(self.dim)
            index.add(np.ascontiguousarray(self.anchors.detach().cpu().numpy(), dtype=np.float32))
            self._index = index
        return self._index

    def search(self, x: Tensor, k: int = 1, chunk: int = 8192) -> tuple[Tensor, Tensor]:
        """k nearest anchors of x (M, C), no gradient: (squared distances (M, k), indices (M, k))."""
        if not self.built:
            raise RuntimeError("AnchorBank: the bank is empty; build it first")
        k = min(k, len(self))
        q = x.detach().float()
        if self.backend == "faiss":
            sq, idx = self._faiss_index().search(np.ascontiguousarray(q.cpu().numpy()), k)
            return torch.from_numpy(sq).to(x.device), torch.from_numpy(idx).to(x.device)
        anchors = self.anchors.to(q.device)
        out_d, out_i = [], []
        for part in q.split(chunk):  # chunked to bound memory at (chunk, A)
            d, i = torch.topk(_sq_dists(part, anchors), k, dim=1, largest=False)
            out_d.append(d)
            out_i.append(i)
        return torch.cat(out_d), torch.cat(out_i)

    def nearest(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Distance to the nearest anchor (M,), differentiable w.r.t. x (M, C), and its index (M,)."""
        _, idx = self.search(x, 1)
        idx = idx[:, 0]
        anchor = self.anchors.to(x.device)[idx]
        # vector_norm of the difference: exact, and its gradient at distance 0 is 0, not NaN.
        return torch.linalg.vector_norm(x - anchor.to(x.dtype), dim=-1), idx

    # -- checkpoints ----------------------------------------------------------------------------
    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        key = prefix + "anchors"
        if key in state_dict:  # the bank's size is only known from the checkpoint
            self.anchors = torch.empty_like(state_dict[key], device=self.anchors.device)
            self._index = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state["_index"] = None  # rebuilt from the buffer on first use
        return state

    def _apply(self, fn: Any, recurse: bool = True) -> AnchorBank:
        self._index = None  # device/dtype moves invalidate the index
        return super()._apply(fn, recurse)
