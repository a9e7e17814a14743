"""Exponential moving average of the trained weights (the adapter's and the discriminator's).

The discriminator's map on unseen anatomy moves noticeably from one step to the next (few shots,
random lesions every batch); evaluating an average of the recent weights instead of the last ones
removes most of that step-to-step noise at no inference cost. `WeightEMA` is the average (plain
torch); `EMACallback` runs it through a fit (`PathoScope.configure_callbacks` adds it).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn


class WeightEMA:
    """A shadow copy of the floating-point tensors (parameters and buffers) of some modules.

    `update()` after each optimiser step moves the shadow towards the current values with weight
    1 - d, d = min(decay, (1 + n) / (10 + n)) at the n-th update (a short warm-up, so the shadow
    does not stay near the initial weights); `swap()` exchanges shadow and current values in place
    (call it twice to undo). Integer buffers (BatchNorm's counter) are left alone.
    """

    def __init__(self, modules: Mapping[str, nn.Module], decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self._live = {
            f"{prefix}.{name}": t
            for prefix, module in modules.items()
            for name, t in module.state_dict(keep_vars=True).items()
            if t.is_floating_point()
        }
        self.shadow = {k: t.detach().clone() for k, t in self._live.items()}

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        d = min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))
        for k, t in self._live.items():
            self.shadow[k].lerp_(t.detach(), 1.0 - d)

    @torch.no_grad()
    def swap(self) -> None:
        for k, t in self._live.items():
            tmp = t.detach().clone()
            t.detach().copy_(self.shadow[k])
            self.shadow[k].copy_(tmp)

    def state_dict(self) -> dict[str, Tensor | int]:
        return {"updates": self.updates, **{k: v.clone() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: Mapping[str, Tensor | int]) -> None:
        self.updates = int(state["updates"])
        for k in self.shadow:
            self.shadow[k].copy_(state[k])


class EMACallback(Callback):
    """The weight average of a fit (optim.ema_decay > 0), in Lightning's hooks.

    `PathoScope.configure_callbacks` adds it, so every Trainer that fits the module has it (the
    CLI's, a Python user's, the benchmarks'). Lightning's own WeightAveraging callback averages
    every parameter and buffer of the module, tau and the anchor bank included; this one averages
    the trained heads only (`WeightEMA` of `model.adapter` and `model.discriminator`):
      fit start: the average starts from the weights as loaded; a resumed fit puts its checkpoint's
        raw weights back into the model and continues its average (and its update count);
      after each training batch: one update;
      validation epochs: the average is in the model (validation, tau and panels see it);
      checkpoints during the fit: `state_dict` holds the average (what inference uses) and
        `checkpoint["pathoscope"]["ema"]` = {"updates", "raw": the raw weights by state_dict key};
      train end: the average stays in the model (test, predict, later checkpoints); done.
    The checkpoint keys are those the LightningModule wrote when it ran the average itself, so its
    checkpoints resume. Lightning runs a module's callbacks after the Trainer's and before
    ModelCheckpoint: the other callbacks' validation-epoch-end hooks still see the average, and a
    checkpoint written after a batch includes that batch's update. Lightning calls no callback for
    a weights-only checkpoint: mid-fit, such a file holds the raw weights.
    """

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.ema: WeightEMA | None = None  # during fit
        self.swapped = False  # the average is in the model (validation)
        self._resume: dict[str, Any] | None = None  # checkpoint["pathoscope"]["ema"] of a resume

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._resume = (checkpoint.get("pathoscope") or {}).get("ema")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = pl_module.model
        trained = {"model.adapter": model.adapter, "model.discriminator": model.discriminator}
        self.ema, self.swapped = WeightEMA(trained, self.decay), False  # shadow = weights as loaded
        resume, self._resume = self._resume, None
        if resume is not None:  # those were the average: the raw ones come back into the model
            self.ema.load_state_dict({"updates": resume["updates"], **resume["raw"]})
            self.ema.swap()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any
    ) -> None:
        if self.ema is not None:
            self.ema.update()

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._put_average_in(True)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._put_average_in(False)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._put_average_in(True)
        self.ema, self.swapped = None, False

    def _put_average_in(self, averaged: bool) -> None:
        """Swap so that the model holds the average (True) or the raw weights (False)."""
        if self.ema is not None and self.swapped != averaged:
            self.ema.swap()
            self.swapped = averaged

    @contextmanager
    def averaged(self) -> Iterator[None]:
        """The average in the model inside the block (as in validation), the weights of the moment
        again after it; nothing changes outside a fit."""
        before = self.swapped
        self._put_average_in(True)
        try:
            yield
        finally:
            self._put_average_in(before)

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self.ema is None:
            return
        ema, state = self.ema, checkpoint["state_dict"]
        averaged = {k: state[k].clone() for k in ema.shadow} if self.swapped else {}
        raw = dict(ema.shadow) if self.swapped else {k: state[k] for k in ema.shadow}
        state.update({k: v.clone() for k, v in (averaged or ema.shadow).items()})
        # PathoScope.on_save_checkpoint (called after the callbacks) adds to this dict.
        checkpoint.setdefault("pathoscope", {})["ema"] = {
            "updates": ema.updates,
            "raw": {k: v.clone() for k, v in raw.items()},
        }


def averaged_weights(trainer: L.Trainer | None) -> AbstractContextManager[None]:
    """A context with the fit's weight average in the model (`EMACallback.averaged`), or a
    no-op context when `trainer` has no EMACallback."""
    for callback in trainer.callbacks if trainer is not None else []:
        if isinstance(callback, EMACallback):
            return callback.averaged()
    return nullcontext()
