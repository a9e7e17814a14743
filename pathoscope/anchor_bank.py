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
# On the CPU, a search of at most this many queries runs as one matrix product and a top-k in torch
# even with the FAISS backend: FAISS's blocked search costs as much for 256 queries as for about
# 600, and the product with its top-k took 7 against 12 ms for 256 queries of 4,096 x 384 anchors
# (two threads; BENCHMARKS.md, run K). The same answers up to float ties.
MATMUL_MAX_QUERIES = 512


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
        self.matmul_max_queries = MATMUL_MAX_QUERIES  # FAISS backend: see MATMUL_MAX_QUERIES
        self._centred_cache: tuple[Any, Tensor, Tensor, Tensor] | None = None

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
        """k nearest anchors of x (M, C), no gradient: (squared distances (M, k), indices (M, k)).

        The FAISS backend answers through its index, except a CPU search of at most
        `matmul_max_queries` queries, which runs as the torch backend does (faster there)."""
        if not self.built:
            raise RuntimeError("AnchorBank: the bank is empty; build it first")
        k = min(k, len(self))
        q = x.detach().float()
        most = getattr(self, "matmul_max_queries", MATMUL_MAX_QUERIES)
        small = q.device.type == "cpu" and q.shape[0] <= most
        if self.backend == "faiss" and not small:
            sq, idx = self._faiss_index().search(np.ascontiguousarray(q.cpu().numpy()), k)
            return torch.from_numpy(sq).to(x.device), torch.from_numpy(idx).to(x.device)
        mean, centred, centred_sq = self._centred(q.device)
        out_d, out_i = [], []
        for part in (q - mean).split(chunk):  # chunked to bound memory at (chunk, A)
            # |a|^2 - 2 x.a orders the anchors as |x - a|^2 does, in one pass over (chunk, A);
            # |x|^2 is added to the k kept values only. Both are centred on the anchors' mean:
            # the expansion then rounds at the scale of the anchors' spread, not of their norms.
            d, i = torch.addmm(centred_sq, part, centred.T, alpha=-2.0).topk(
                k, dim=1, largest=False
            )
            out_d.append(d.add_((part * part).sum(1, keepdim=True)).clamp_min_(0.0))
            out_i.append(i)
        return torch.cat(out_d), torch.cat(out_i)

    def _centred(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """(mean (C,), anchors - mean (A, C), their squared norms (A,)) on `device`, cached until
        the anchors change."""
        a = self.anchors
        key = (a.data_ptr(), a._version, tuple(a.shape), a.device, device)
        cache = getattr(self, "_centred_cache", None)  # None also in banks pickled before it
        if cache is None or cache[0] != key:
            anchors = a.detach().to(device).float()
            mean = anchors.mean(0)
            centred = (anchors - mean).contiguous()
            cache = (key, mean, centred, (centred * centred).sum(1))
            self._centred_cache = cache
        return cache[1], cache[2], cache[3]

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
        state["_centred_cache"] = None
        return state

    def _apply(self, fn: Any, recurse: bool = True) -> AnchorBank:
        self._index = None  # device/dtype moves invalidate the index
        self._centred_cache = None
        return super()._apply(fn, recurse)
