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
from pathoscope.feature_grid import FEATURE_DIM
from pathoscope.heads import Adapter, Discriminator
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
from pathoscope.pieg import CandidateSearch, pieg
from pathoscope.postprocess import GaussianBlur, anomaly_map, image_score


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


class PathoScopeModel(nn.Module):
    """Few-shot pathology detection: frozen E, adapter f, discriminator D, anchor bank, PiEG.

    Each argument is one hyperparameter group (`pathoscope.hparams`), or a mapping of its fields.
    Buffers: the bank's anchors and distance_scale, and `tau` (the image threshold, NaN until a
    validation sets it). Plain attributes: `weights_tag` (the backbone's weights, for reports) and
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
        self.register_buffer("tau", torch.tensor(float("nan")))
        self.weights_tag = self.backbone.weights_tag
        self.preprocessing: dict[str, Any] = {}

    def with_scoring(self, **changes: Any) -> None:
        """Change scoring fields in place (e.g. source="anchor_distance": the same bank, scored
        the PatchCore way); the blur follows blur_sigma."""
        self.hp = replace(self.hp, scoring=replace(self.hp.scoring, **changes))
        self.blur = GaussianBlur(self.hp.scoring.blur_sigma).to(self.tau.device)

    # -- features -----------------------------------------------------------------------------------
    def embed(self, x: Tensor) -> Tensor:
        """x (B, 3, H, W) -> adapted features v (B, h, w, C)."""
        with torch.no_grad():
            e = self.backbone(x)  # (B, C, h, w), frozen
        return self.adapter(e.permute(0, 2, 3, 1))

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
    def training_losses(self, batch: dict[str, Tensor], step: int = 0) -> dict[str, Tensor]:
        """The loss terms of one step (Eq. 5 + Eq. 6); `loss` is the sum of the enabled ones.

        `step` (the global step) seeds PiEG's Gaussian start. Also returns, without gradient,
        `pieg_shift` (mean ||v_s - v_n|| / distance_scale), `d_n` and `d_s` (D's mean score on v_n
        and on v_s).
        """
        lo = self.hp.losses
        x_n, x_p = batch["image"], batch["lesion_image"]
        b = x_n.shape[0]
        v = self.embed(torch.cat([x_n, x_p]))  # (2B, h, w, C)
        v_n, v_p = v[:b], v[b:]
        grid = tuple(v.shape[1:3])
        lesion = mask_to_grid(batch["lesion_mask"], grid, lo.lesion_min_fraction)  # (B, h, w)
        foreground = None
        if lo.global_in_foreground and "foreground" in batch:
            foreground = mask_to_grid(batch["foreground"], grid, 0.5)
        out: dict[str, Tensor] = {}

        # Eq. 1: local contrast between v_n and v_p on the lesion cells.
        if lo.use_local_contrast:
            d_local_n = local_distance(v_n, lesion, self.bank)
            d_local_p = local_distance(v_p, lesion, self.bank)
            out["lc"] = tritanh(d_local_n, d_local_p, lo.lambda_pull, lo.lambda_push, lo.eps)

        v_s, d_global_n, search, base, region = self.synthesize(v_n, v_p, foreground, step)

        # D once on [v_n, v_p, v_s]: one BatchNorm batch (Eq. 5, Eq. 6). v_s may hold fewer
        # cells than v_n (losses.synthetic_in_foreground), so D sees the three as rows.
        c = v_n.shape[-1]
        logits = self.discriminator(
            torch.cat([v_n.reshape(-1, c), v_p.reshape(-1, c), v_s.reshape(-1, c)])
        )
        n_cells = v_n.shape[0] * v_n.shape[1] * v_n.shape[2]
        l_n, l_p, l_s = logits.split([n_cells, n_cells, logits.shape[0] - 2 * n_cells])
        l_n, l_p = l_n.reshape(v_n.shape[:3]), l_p.reshape(v_n.shape[:3])
        out["focal"] = focal_loss(l_p, lesion, lo.focal_gamma)
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

    def synthesize(
        self, v_n: Tensor, v_p: Tensor, foreground: Tensor | None, step: int = 0
    ) -> Synthesis:
        """PiEG's v_s for v_n (B, h, w, C) as a training step makes it (Eq. 3).

        D's BatchNorm uses the batch statistics of [v_n, v_p] (B, h, w, C each), frozen;
        `foreground` (B, h, w) bool or None restricts Eq. 4. `step` seeds the Gaussian start.
        """
        lo, pg = self.hp.losses, self.hp.pieg
        c = v_n.shape[-1]
        # BatchNorm statistics of the real features, frozen for PiEG's passes through D.
        bn_stats = tuple(s.detach() for s in self.discriminator.batch_stats(torch.cat([v_n, v_p])))
        # PiEG's input: every cell of v_n, or (synthetic_in_foreground) the foreground cells as
        # one (1, N, 1, C) "image", whose Eq. 4 mean is then over the batch's foreground cells.
        base, region = v_n, foreground
        if lo.synthetic_in_foreground and foreground is not None and bool(foreground.any()):
            base, region = v_n.reshape(-1, c)[foreground.reshape(-1)].reshape(1, -1, 1, c), None
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

        gen = torch.Generator().manual_seed(int(step) * 7919 + self.hp.bank.seed)
        unit = self.pieg_unit()
        v_s = pieg(
            base,
            global_terms,
            eta=pg.eta * unit if pg.enabled else 0.0,
            steps=pg.steps if pg.enabled else 0,
            noise_std=pg.noise_std * unit,
            noise_mean=pg.noise_mean * unit,
            keep_noise=pg.keep_noise,
            min_distance=pg.min_distance * float(self.bank.distance_scale),
            projection=pg.projection,
            nearest=self.bank.nearest,
            anchors=self.bank.anchors,
            generator=gen,
            direction=pg.direction,
        )
        return Synthesis(v_s, d_global_n, search, base, region)

    def pieg_unit(self) -> float:
        """The feature-space length of one unit of eta / noise_std (see `PiEGParams.units`)."""
        if self.hp.pieg.units == "distance_scale":
            return float(self.bank.distance_scale)
        return 1.0

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
