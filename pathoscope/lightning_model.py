"""PathoScope, the thin LightningModule around `PathoScopeModel`: optimisers, logging, hooks.

It holds no maths: the training losses and the inference path are the torch model's. What it adds
is what a Trainer needs: the two optimisers stepped as one, the anchor bank built from the
datamodule at fit start, the folded detector for validation and test (`folded.inference_net`), the
weight average's callback (optim.ema_decay: `configure_callbacks`, pathoscope/ema.py), log keys,
and the checkpoint's version and metadata (pathoscope/checkpoint.py).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from pathoscope.batches import ImageBatch, TrainBatch
from pathoscope.checkpoint import (
    CHECKPOINT_VERSION,
    check_version,
    model_params,
    read_checkpoint,
)
from pathoscope.ema import EMACallback
from pathoscope.folded import inference_net
from pathoscope.hparams import (
    BankParams,
    LossParams,
    NetworkParams,
    OptimParams,
    PiEGParams,
    ScoringParams,
    coerce,
)
from pathoscope.joint_optimizer import JointOptimizer
from pathoscope.postprocess import ImageThreshold
from pathoscope.torch_model import InferenceOutput, PathoScopeModel


def cosine_factor(step: int, total: int) -> float:
    """The learning-rate factor of optim.schedule "cosine" after `step` of `total` steps: 1 at the
    start, 0 at the end (half a cosine), 0 beyond."""
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


class PathoScope(L.LightningModule):
    """Few-shot pathology detection (docs/design.md), trained and evaluated by a Trainer.

    Args:
        network: the backbone's weights and D's width (`NetworkParams`).
        pieg: Pathology-informed Embedding Generation, Eq. 3 (`PiEGParams`).
        losses: the loss terms and their constants, Eq. 1, 2, 4-6 (`LossParams`).
        bank: the prototypical anchor bank (`BankParams`).
        scoring: anomaly map, image score and tau (`ScoringParams`).
        optim: the adapter's and the discriminator's optimisers (`OptimParams`).
    Each group may also be given as a mapping of its fields (as checkpoints store them).
    """

    def __init__(
        self,
        network: NetworkParams = NetworkParams(),
        pieg: PiEGParams = PiEGParams(),
        losses: LossParams = LossParams(),
        bank: BankParams = BankParams(),
        scoring: ScoringParams = ScoringParams(),
        optim: OptimParams = OptimParams(),
    ) -> None:
        super().__init__()
        self.model = PathoScopeModel(network, pieg, losses, bank, scoring)
        self.optim = coerce(OptimParams, optim)
        self.save_hyperparameters({**self.model.hp.to_dict(), "optim": asdict(self.optim)})
        # The detector of the current evaluation epoch (`_start_evaluation`), in a tuple: outside
        # the module tree, so never in state_dict.
        self._evaluator: tuple[nn.Module, ...] = ()

    # -- what callbacks and reports read ------------------------------------------------------------
    @property
    def tau(self) -> Tensor:
        """The image threshold buffer (NaN until a validation sets it)."""
        return self.model.tau

    @property
    def threshold(self) -> ImageThreshold:
        """The post-processor that owns tau and the decision at it."""
        return self.model.threshold

    @property
    def tau_quantile(self) -> float:
        return self.model.hp.scoring.tau_quantile

    @property
    def weights_tag(self) -> str:
        return self.model.weights_tag

    @property
    def preprocessing(self) -> dict[str, Any]:
        return self.model.preprocessing

    # -- checkpoints --------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: Any = "cpu") -> PathoScope:
        """Load a trained module; its backbone weights come from the checkpoint, never the hub."""
        checkpoint = read_checkpoint(path)
        p = model_params(checkpoint["hyper_parameters"])
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Backbone: pretrained=False")
            module = cls(
                p.network,
                p.pieg,
                p.losses,
                p.bank,
                p.scoring,
                checkpoint["hyper_parameters"]["optim"],
            )
        module.load_state_dict(checkpoint["state_dict"])
        module.on_load_checkpoint(checkpoint)
        return module.to(map_location).eval()

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls, checkpoint_path: str | Path, *args: Any, **kwargs: Any
    ) -> PathoScope:
        """Lightning's loader, after the version check (a clear error naming the file)."""
        if isinstance(checkpoint_path, str | Path):
            read_checkpoint(checkpoint_path)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Added to what callbacks wrote there before (EMACallback: "ema").
        checkpoint.setdefault("pathoscope", {}).update(
            version=CHECKPOINT_VERSION,
            weights=self.model.weights_tag,
            preprocessing=self.model.preprocessing,
        )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = check_version(checkpoint, "checkpoint")
        self.model.weights_tag = meta["weights"]
        self.model.preprocessing = dict(meta.get("preprocessing") or {})

    # -- fit ----------------------------------------------------------------------------------------
    def configure_callbacks(self) -> list[Callback]:
        """The weight average of optim.ema_decay > 0 (`EMACallback`): every Trainer that fits this
        module runs it, the CLI's and a Python user's alike."""
        return [EMACallback(self.optim.ema_decay)] if self.optim.ema_decay > 0.0 else []

    def on_fit_start(self) -> None:
        self.model.clear_feature_pool()  # data.train_pool: features of this fit's data only
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "preprocessing"):
            self.model.preprocessing = dict(dm.preprocessing())
        if self.model.bank.built:  # loaded from a checkpoint: never rebuilt
            return
        if dm is None or not hasattr(dm, "anchor_images"):
            raise RuntimeError(
                "PathoScope.fit needs a datamodule with anchor_images() to build the bank"
            )
        bank = self.model.hp.bank
        batch = dm.anchor_images(copies=bank.copies + bank.heldout_copies, seed=bank.seed)
        self.model.build_bank(batch.image, n_bank_images=dm.shots * (1 + bank.copies))

    def on_train_end(self) -> None:
        self.model.clear_feature_pool()

    def on_fit_end(self) -> None:
        if self.global_step == 0 and self.model.hp.scoring.source != "anchor_distance":
            rank_zero_warn(
                "PathoScope: fit ended after 0 training steps (trainer.max_steps=0?): the "
                f"discriminator is untrained, so scoring.source={self.model.hp.scoring.source!r} "
                "gives meaningless scores and metrics. Train for some steps, or use the untrained "
                "nearest-anchor baseline (scoring.source=anchor_distance, "
                "experiments/anchor_knn.yaml).",
                category=UserWarning,
            )

    def configure_optimizers(self) -> Any:
        optimizer = JointOptimizer(
            [
                torch.optim.Adam(
                    self.model.adapter.parameters(),
                    lr=self.optim.lr_adapter,
                    weight_decay=self.optim.weight_decay_adapter,
                ),
                torch.optim.AdamW(
                    self.model.discriminator.parameters(),
                    lr=self.optim.lr_discriminator,
                    weight_decay=self.optim.weight_decay_discriminator,
                ),
            ]
        )
        if self.optim.schedule == "constant":
            return optimizer
        total = self._scheduled_steps()
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: cosine_factor(step, total)
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def _scheduled_steps(self) -> int:
        """The fit's length in optimiser steps, over which optim.schedule runs."""
        trainer = self.trainer
        total = trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches
        if not math.isfinite(total) or total <= 0:
            raise ValueError(
                f"optim.schedule={self.optim.schedule!r} needs a finite fit: set trainer.max_steps "
                "(or trainer.max_epochs)"
            )
        return int(total)

    def training_step(self, batch: TrainBatch, batch_idx: int) -> Tensor:
        out = self.model.training_losses(batch, step=self.global_step)
        b = batch.size
        logged = {f"train/{k}": v.detach() for k, v in out.items() if k != "loss"}
        self.log_dict(logged, batch_size=b)
        self.log("train/loss", out["loss"].detach(), batch_size=b, prog_bar=True)
        return out["loss"]

    # -- evaluation -----------------------------------------------------------------------------------
    def forward(self, x: Tensor, foreground: Tensor | None = None) -> InferenceOutput:
        return self.model(x, foreground)

    def _start_evaluation(self) -> None:
        """The fastest exact detector of the current weights (`folded.inference_net`: the folded
        one when D scores, exact within 1e-5 and ~1.7x faster on CPU) for this evaluation epoch;
        rebuilt per epoch since D trains between validations (EMACallback swaps the average in
        before this runs)."""
        self._evaluator = (inference_net(self.model),)

    def on_validation_epoch_start(self) -> None:
        self._start_evaluation()

    def on_test_epoch_start(self) -> None:
        self._start_evaluation()

    def on_validation_epoch_end(self) -> None:
        self._evaluator = ()

    def on_test_epoch_end(self) -> None:
        self._evaluator = ()

    def _eval_step(self, batch: ImageBatch) -> dict[str, Tensor]:
        net = self._evaluator[0] if self._evaluator else self.model
        score, anomaly_map = net(batch.image, batch.foreground)
        return {"score": score, "anomaly_map": anomaly_map}

    def validation_step(self, batch: ImageBatch, batch_idx: int) -> dict[str, Tensor]:
        return self._eval_step(batch)

    def test_step(self, batch: ImageBatch, batch_idx: int) -> dict[str, Tensor]:
        return self._eval_step(batch)

    def predict_step(self, batch: ImageBatch, batch_idx: int) -> InferenceOutput:
        return self.model(batch.image, batch.foreground)
