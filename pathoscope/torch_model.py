"""The whole detector as a plain nn.Module: frozen E, adapter f, discriminator D, anchor bank, blur.

`forward(x, foreground)` returns the image score and the anomaly map; `training_losses(batch,
step)` returns the loss terms of one training step (Eq. 5 + Eq. 6). The maths lives in
backbone.py, anchor_bank.py, heads.py, losses.py, pieg.py and postprocess.py; this module wires
them as docs/design.md describes. No Lightning here: the LightningModule (lightning_model.py) adds
the optimisers, logging and hooks, and predict / export use this module alone.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from pathoscope.anchor_bank import AnchorBank
from pathoscope.backbone import Backbone
from pathoscope.batches import TrainBatch
from pathoscope.feature_grid import FEATURE_DIM
from pathoscope.folded import inference_backbone
from pathoscope.heads import Adapter, Discriminator, hidden_stats
from pathoscope.hparams import (
    BankParams,
    LossParams,
    ModelParams,
    NetworkParams,
    PiEGParams,
    ScoringParams,
)
from pathoscope.losses import (
    bce,
    focal_loss,
    global_distance,
    local_distance,
    mask_to_grid,
    tritanh,
)
from pathoscope.pieg import CandidateSearch, feature_unit, pieg
from pathoscope.postprocess import GaussianBlur, ImageThreshold, anomaly_map, image_score


class InferenceOutput(NamedTuple):
    score: Tensor  # (B,)
    anomaly_map: Tensor  # (B, 1, H, W)


class Synthesis(NamedTuple):
    """What `PathoScopeModel.synthesize` returns."""

    v_s: Tensor  # (B, h, w, C) PiEG's embeddings; the graph goes through v_n, not through delta
    d_global_n: Tensor | None  # Eq. 4 of v_n (None without the global contrast)
    search: CandidateSearch | None  # the exact nearest-anchor search of v_n's candidates
    base: Tensor  # what PiEG perturbed: v_n, or its foreground cells as (1, N, 1, C)
    region: Tensor | None  # Eq. 4's region for base (None: all of base's cells)


def _tau_key_before_threshold(
    module: nn.Module, state: dict[str, Any], prefix: str, *args: Any
) -> None:
    """Checkpoints written before `threshold` owned tau stored it as `<prefix>tau`."""
    if prefix + "tau" in state and prefix + "threshold.tau" not in state:
        state[prefix + "threshold.tau"] = state.pop(prefix + "tau")


class PathoScopeModel(nn.Module):
    """Few-shot pathology detection: frozen E, adapter f, discriminator D, anchor bank, PiEG.

    Each argument is one hyperparameter group (`pathoscope.hparams`), or a mapping of its fields.
    Buffers: the bank's anchors and distance_scale, and `threshold.tau` (the image threshold, NaN
    until a validation sets it; `threshold` is the post-processor that owns the decision). Plain attributes: `weights_tag` (the backbone's weights, for reports) and
    `preprocessing` (the training datamodule's, so that predict prepares pixels the same way).
    """

    def __init__(
        self,
        network: NetworkParams = NetworkParams(),
        pieg: PiEGParams = PiEGParams(),
        losses: LossParams = LossParams(),
        bank: BankParams = BankParams(),
        scoring: ScoringParams = ScoringParams(),
    ) -> None:
        super().__init__()
        self.hp = ModelParams(network, pieg, losses, bank, scoring)
        self.backbone = Backbone(
            pretrained=self.hp.network.pretrained, weights=self.hp.network.weights
        )
        self.adapter = Adapter(FEATURE_DIM)
        self.discriminator = Discriminator(FEATURE_DIM, self.hp.network.hidden_dim)
        self.bank = AnchorBank(FEATURE_DIM, backend=self.hp.bank.backend)
        self.blur = GaussianBlur(self.hp.scoring.blur_sigma)
        self.threshold = ImageThreshold()
        self.register_load_state_dict_pre_hook(_tau_key_before_threshold)
        self.weights_tag = self.backbone.weights_tag
        self.preprocessing: dict[str, Any] = {}

    @property
    def tau(self) -> Tensor:
        """The image threshold buffer (`threshold.tau`; NaN until a validation sets it)."""
        return self.threshold.tau

    def with_scoring(self, **changes: Any) -> None:
        """Change scoring fields in place (e.g. source="anchor_distance": the same bank, scored
        the PatchCore way); the blur follows blur_sigma."""
        self.hp = replace(self.hp, scoring=replace(self.hp.scoring, **changes))
        self.blur = GaussianBlur(self.hp.scoring.blur_sigma).to(self.tau.device)

    # -- features -----------------------------------------------------------------------------------
    def embed(self, x: Tensor, fast_backbone: bool = False) -> Tensor:
        """x (B, 3, H, W) -> adapted features v (B, h, w, C).

        `fast_backbone`: E's copy with BatchNorm folded into its convolutions, in channels_last
        (`folded.inference_backbone`: the same features within float rounding, about 1.8x faster
        on CPU); training uses it.
        """
        return self.adapter(self.frozen_features(x, fast_backbone))

    @torch.no_grad()
    def frozen_features(self, x: Tensor, fast_backbone: bool = False) -> Tensor:
        """x (B, 3, H, W) -> the frozen backbone's features (B, h, w, C), before the adapter."""
        if fast_backbone:
            e = self._fast_backbone()(x.contiguous(memory_format=torch.channels_last))
        else:
            e = self.backbone(x)  # (B, C, h, w)
        return e.permute(0, 2, 3, 1)

    def pooled_features(self, x_n: Tensor, x_p: Tensor, draws: Tensor | None) -> Tensor:
        """The frozen features of [x_n, x_p] (2B, h, w, C) for a training step.

        `draws` (B,) (the batch's `draw`, present with `data.train_pool`): the data stream
        repeats, and the same draw always holds the same x_n and x_p, so the features of a batch
        whose draws were all seen are taken from the pool kept since `clear_feature_pool()`
        instead of the backbone (which is frozen: the same numbers). Without draws, the backbone.
        """
        if draws is None:
            return self.frozen_features(torch.cat([x_n, x_p]), fast_backbone=True)
        pool: dict[int, tuple[Tensor, Tensor]] = self.__dict__.setdefault("_feature_pool", {})
        keys = [int(k) for k in draws]
        if all(k in pool for k in keys):
            return torch.stack([pool[k][0] for k in keys] + [pool[k][1] for k in keys])
        e = self.frozen_features(torch.cat([x_n, x_p]), fast_backbone=True)
        b = len(keys)
        for i, k in enumerate(keys):
            pool[k] = (e[i].clone(), e[b + i].clone())
        return e

    def clear_feature_pool(self) -> None:
        """Forget the pooled training features (a new fit, new data or new weights)."""
        self.__dict__.pop("_feature_pool", None)

    def _fast_backbone(self) -> nn.Module:
        """The folded copy of E, rebuilt when E's weights or device change; kept out of the
        module tree (never in state_dict, never moved by .to())."""
        weight = next(self.backbone.parameters())
        key = (weight.data_ptr(), weight._version, weight.device)
        cached = self.__dict__.get("_fast_backbone_cache")
        if cached is None or cached[0] != key:
            cached = (key, inference_backbone(self.backbone))
            self.__dict__["_fast_backbone_cache"] = cached
        return cached[1]

    @torch.no_grad()
    def build_bank(self, images: Tensor, n_bank_images: int, chunk: int = 16) -> None:
        """Build the anchor bank from backbone features of images[:n_bank_images]; the rest are
        held out to set the bank's distance_scale."""
        device = self.tau.device
        feats = []
        for part in images.split(chunk):
            e = self.backbone(part.to(device))  # (b, C, h, w)
            feats.append(e.permute(0, 2, 3, 1).reshape(e.shape[0], -1, e.shape[1]).cpu())
        all_feats = torch.cat(feats)  # (N, h*w, C)
        bank_feats = all_feats[:n_bank_images].reshape(-1, all_feats.shape[-1])
        heldout = all_feats[n_bank_images:].reshape(-1, all_feats.shape[-1])
        gen = torch.Generator().manual_seed(self.hp.bank.seed)
        self.bank.build(
            bank_feats.to(device),
            coreset_ratio=self.hp.bank.coreset_ratio,
            max_anchors=self.hp.bank.max_anchors,
            generator=gen,
            heldout=heldout.to(device) if heldout.numel() else None,
        )

    # -- training -------------------------------------------------------------------------------------
    def training_losses(self, batch: TrainBatch, step: int = 0) -> dict[str, Tensor]:
        """The loss terms of one step (Eq. 5 + Eq. 6); `loss` is the sum of the enabled ones.

        `step` (the global step) seeds PiEG's Gaussian start. Also returns, without gradient,
        `pieg_shift` (mean ||v_s - v_n|| / distance_scale), `d_n` and `d_s` (D's mean score on v_n
        and on v_s).
        """
        lo = self.hp.losses
        x_n, x_p = batch.image, batch.lesion_image
        b = x_n.shape[0]
        v = self.adapter(self.pooled_features(x_n, x_p, batch.draw))  # (2B, h, w, C)
        v_n, v_p = v[:b], v[b:]
        grid = tuple(v.shape[1:3])
        lesion = mask_to_grid(batch.lesion_mask, grid, lo.lesion_min_fraction)  # (B, h, w)
        foreground = None
        if lo.global_in_foreground:
            foreground = mask_to_grid(batch.foreground, grid, 0.5)
        out: dict[str, Tensor] = {}

        # Eq. 1: local contrast between v_n and v_p on the lesion cells.
        if lo.use_local_contrast:
            d_local_n = local_distance(v_n, lesion, self.bank)
            d_local_p = local_distance(v_p, lesion, self.bank)
            out["lc"] = tritanh(d_local_n, d_local_p, lo.lambda_pull, lo.lambda_push, lo.eps)

        # D's first layer on the real features [v_n, v_p] once: its output gives PiEG's frozen
        # BatchNorm statistics and enters the step's own pass below. With losses.max_cells, the
        # same random subset of cells of v_n and of v_p (rows of the flattened grids).
        d, c = self.discriminator, v.shape[-1]
        real, target = v.reshape(2, -1, c), lesion.reshape(-1)  # real[0]: v_n, real[1]: v_p
        rows = self._d_rows(real.shape[1], step)
        if rows is not None:
            real, target = real[:, rows.to(v.device)], target[rows.to(target.device)]
        n_cells = real.shape[1]
        # (2 n_cells, hidden): v_n's rows, then v_p's; on the whole grid as one 1x1 convolution
        h_real = d.fc1(real.reshape(-1, c)) if rows is not None else d.fc1_grid(v)
        bn_stats = hidden_stats(h_real.detach())
        v_s, d_global_n, search, base, region = self.synthesize(
            v_n, v_p, foreground, step, bn_stats=bn_stats
        )

        # D once on [v_n, v_p, v_s]: one BatchNorm batch (Eq. 5, Eq. 6). v_s may hold fewer
        # cells than v_n (losses.synthetic_in_foreground, pieg.max_cells), so D sees rows.
        logits = d.head(torch.cat([h_real, d.fc1_grid(v_s)]))
        l_n, l_p, l_s = logits.split([n_cells, n_cells, logits.shape[0] - 2 * n_cells])
        out["focal"] = focal_loss(l_p, target, lo.focal_gamma)
        out["bce_n"] = bce(l_n, 0.0)
        out["bce_s"] = bce(l_s, 1.0)
        if d_global_n is not None:
            d_global_s = global_distance(v_s, self.bank, region, search=search.nearest)
            out["gc"] = tritanh(d_global_n, d_global_s, lo.lambda_pull, lo.lambda_push, lo.eps)
        out["loss"] = sum(out[k] for k in ("focal", "lc", "bce_n", "bce_s", "gc") if k in out)
        with torch.no_grad():
            out["pieg_shift"] = (
                torch.linalg.vector_norm(v_s - base, dim=-1).mean() / self.bank.distance_scale
            )
            out["d_n"] = torch.sigmoid(l_n).mean()
            out["d_s"] = torch.sigmoid(l_s).mean()
        return out

    def _d_rows(self, cells: int, step: int) -> Tensor | None:
        """Sorted random rows of a flattened (B h w) grid that enter D's step (losses.max_cells),
        drawn from the step's own generator; None when every cell does."""
        m = self.hp.losses.max_cells
        if not 0 < m < cells:
            return None
        gen = torch.Generator().manual_seed(int(step) * 7927 + self.hp.bank.seed + 1)
        return torch.randperm(cells, generator=gen)[:m].sort().values

    def synthesize(
        self,
        v_n: Tensor,
        v_p: Tensor,
        foreground: Tensor | None,
        step: int = 0,
        bn_stats: tuple[Tensor, Tensor] | None = None,
    ) -> Synthesis:
        """PiEG's v_s for v_n (B, h, w, C) as a training step makes it (Eq. 3).

        D's BatchNorm uses the batch statistics of [v_n, v_p] (B, h, w, C each), frozen (given as
        `bn_stats` when the caller has them); `foreground` (B, h, w) bool or None restricts Eq. 4.
        `step` seeds the Gaussian start and the cell subset (pieg.max_cells).
        """
        lo, pg = self.hp.losses, self.hp.pieg
        c = v_n.shape[-1]
        if bn_stats is None:  # BatchNorm statistics of the real features, frozen for PiEG
            bn_stats = self.discriminator.batch_stats(torch.cat([v_n, v_p]))
        bn_stats = (bn_stats[0].detach(), bn_stats[1].detach())
        # PiEG's input: every cell of v_n, or (synthetic_in_foreground) the foreground cells as
        # one (1, N, 1, C) "image", whose Eq. 4 mean is then over the batch's foreground cells;
        # with pieg.max_cells, a random subset of those cells, in the same layout.
        base, region = v_n, foreground
        if lo.synthetic_in_foreground and foreground is not None and bool(foreground.any()):
            base, region = v_n.reshape(-1, c)[foreground.reshape(-1)].reshape(1, -1, 1, c), None
        gen = torch.Generator().manual_seed(int(step) * 7919 + self.hp.bank.seed)
        cells = base.numel() // c
        if 0 < pg.max_cells < cells:  # a random subset of those cells, as (1, max_cells, 1, C)
            keep = torch.randperm(cells, generator=gen)[: pg.max_cells].sort().values
            if region is not None:
                region = region.reshape(-1)[keep.to(region.device)].reshape(1, -1, 1)
            base = base.reshape(-1, c)[keep.to(base.device)].reshape(1, -1, 1, c)
        search = None
        d_global_n = None
        if lo.use_global_contrast:
            search = CandidateSearch(self.bank, base.reshape(-1, c), k=self.hp.bank.knn_candidates)
            d_global_n = global_distance(base, self.bank, region, search=search.nearest)

        def global_terms(v_s: Tensor) -> Tensor:  # the v_s-dependent terms of Eq. 6
            loss = bce(self.discriminator(v_s, bn_stats=bn_stats), 1.0)
            if d_global_n is not None:
                d_s = global_distance(v_s, self.bank, region, search=search.nearest)
                loss = loss + tritanh(
                    d_global_n.detach(), d_s, lo.lambda_pull, lo.lambda_push, lo.eps
                )
            return loss

        v_s = pieg(
            base,
            global_terms,
            params=pg,
            distance_scale=float(self.bank.distance_scale),
            nearest=self.bank.nearest,
            anchors=self.bank.anchors,
            generator=gen,
            score=lambda v: torch.sigmoid(self.discriminator(v, bn_stats=bn_stats)),
        )
        return Synthesis(v_s, d_global_n, search, base, region)

    def pieg_unit(self) -> float:
        """The feature-space length of one unit of eta / noise_std (see `PiEGParams.units`)."""
        return feature_unit(self.hp.pieg, float(self.bank.distance_scale))

    # -- inference ------------------------------------------------------------------------------------
    def patch_scores(self, x: Tensor) -> Tensor:
        """x (B, 3, H, W) -> per-position scores (B, 1, h, w) before upsampling."""
        v = self.embed(x)
        source = self.hp.scoring.source
        if source == "discriminator":
            return torch.sigmoid(self.discriminator(v)).unsqueeze(1)
        b, h, w, c = v.shape
        dist, _ = self.bank.nearest(v.reshape(-1, c))
        dist = (dist / self.bank.distance_scale).reshape(b, 1, h, w)
        if source == "anchor_distance":
            return dist
        return torch.sigmoid(self.discriminator(v)).unsqueeze(1) * dist  # fusion

    def forward(self, x: Tensor, foreground: Tensor | None = None) -> InferenceOutput:
        """x (B, 3, H, W) -> (score (B,), anomaly_map (B, 1, H, W)); score = max inside foreground."""
        m = anomaly_map(self.patch_scores(x), tuple(x.shape[-2:]), self.blur)
        return InferenceOutput(image_score(m, foreground), m)
