"""WeightEMA and EMACallback (pathoscope/ema.py): the average, and its run through a fit, a
checkpoint and a resumed fit (optim.ema_decay)."""

from __future__ import annotations

import warnings
from pathlib import Path
from unittest.mock import Mock

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from data_modules.brats import BraTSDataModule
from pathoscope.ema import EMACallback, WeightEMA, averaged_weights
from pathoscope.lightning_model import PathoScope


def test_update_follows_the_warmed_up_decay_by_hand() -> None:
    lin = nn.Linear(1, 1, bias=False)
    bn = nn.BatchNorm1d(1)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    ema = WeightEMA({"lin": lin, "bn": bn}, decay=0.9)
    assert set(ema.shadow) == {
        "lin.weight",
        "bn.weight",
        "bn.bias",
        "bn.running_mean",
        "bn.running_var",
    }
    expected = 1.0
    for n, value in enumerate([3.0, -1.0, 5.0, 2.0], start=1):
        with torch.no_grad():
            lin.weight.fill_(value)
        ema.update()
        d = min(0.9, (1 + n) / (10 + n))  # 2/11, 3/12, 4/13, 5/14: the warm-up, below 0.9
        expected = d * expected + (1 - d) * value
        assert float(ema.shadow["lin.weight"]) == pytest.approx(expected, rel=1e-6)
    ema.swap()
    assert float(lin.weight.detach()) == pytest.approx(expected, rel=1e-6)
    assert float(ema.shadow["lin.weight"]) == 2.0
    ema.swap()
    assert float(lin.weight.detach()) == 2.0
    with pytest.raises(ValueError, match="decay"):
        WeightEMA({"lin": lin}, decay=1.0)


class _Record(L.Callback):
    """The discriminator's fc2 weight after every optimiser step."""

    def __init__(self) -> None:
        self.raw: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer: L.Trainer, module: PathoScope, *args: object) -> None:
        self.raw.append(module.model.discriminator.fc2.weight.detach().clone())


def test_fit_ends_with_the_average_and_checkpoints_hold_it(
    brats_root: Path, tmp_path: Path
) -> None:
    decay, steps = 0.6, 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = PathoScope(
            network={"pretrained": False, "hidden_dim": 16},
            pieg={"steps": 1},
            bank={"max_anchors": 64, "copies": 1},
            optim={"ema_decay": decay},
        )
        start = module.model.discriminator.fc2.weight.detach().clone()
        record = _Record()
        trainer = L.Trainer(
            max_steps=steps,
            accelerator="cpu",
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            enable_checkpointing=False,
            callbacks=[record],
            default_root_dir=tmp_path,
        )
        dm = BraTSDataModule(
            str(brats_root),
            shots=2,
            image_size=64,
            n_test_healthy=4,
            n_test_tumorous=4,
            batch_size=2,
        )
        L.seed_everything(0)
        trainer.fit(module, dm)
    expected = start
    for n, raw in enumerate(record.raw, start=1):
        d = min(decay, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * raw
    final = module.model.discriminator.fc2.weight.detach()
    torch.testing.assert_close(final, expected)
    assert not torch.allclose(final, record.raw[-1])  # the average, not the last step
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    state = torch.load(tmp_path / "m.ckpt", weights_only=False)["state_dict"]
    torch.testing.assert_close(state["model.discriminator.fc2.weight"], expected)


def _module(decay: float) -> PathoScope:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PathoScope(
            network={"pretrained": False, "hidden_dim": 16}, optim={"ema_decay": decay}
        )


def test_the_module_brings_the_callback_only_with_a_decay() -> None:
    assert _module(0.0).configure_callbacks() == []
    (callback,) = _module(0.5).configure_callbacks()
    assert isinstance(callback, EMACallback) and callback.decay == 0.5


def test_checkpoint_during_fit_holds_the_average_and_the_raw_weights() -> None:
    module = _module(0.5)
    (callback,) = module.configure_callbacks()
    trainer = Mock()  # the hooks below do not use it
    callback.on_fit_start(trainer, module)
    w = module.model.discriminator.fc2.weight
    with torch.no_grad():
        w.add_(1.0)  # a "step"
    callback.on_train_batch_end(trainer, module, None, None, 0)
    assert callback.ema is not None
    averaged = callback.ema.shadow["model.discriminator.fc2.weight"].clone()
    raw = w.detach().clone()
    checkpoint = {"state_dict": module.state_dict()}
    callback.on_save_checkpoint(trainer, module, checkpoint)  # Lightning: callbacks first,
    module.on_save_checkpoint(checkpoint)  # then the module
    assert set(checkpoint["pathoscope"]) == {"ema", "version", "weights", "preprocessing"}
    torch.testing.assert_close(checkpoint["state_dict"]["model.discriminator.fc2.weight"], averaged)
    torch.testing.assert_close(
        checkpoint["pathoscope"]["ema"]["raw"]["model.discriminator.fc2.weight"], raw
    )
    # A resumed fit gets the raw weights back in the model and the average in the shadow.
    resumed = _module(0.5)
    resumed.load_state_dict(checkpoint["state_dict"])
    resumed.on_load_checkpoint(checkpoint)  # Lightning: the module first, then the callbacks
    (again,) = resumed.configure_callbacks()
    again.on_load_checkpoint(trainer, resumed, checkpoint)
    again.on_fit_start(trainer, resumed)
    assert again.ema is not None
    torch.testing.assert_close(resumed.model.discriminator.fc2.weight.detach(), raw)
    torch.testing.assert_close(again.ema.shadow["model.discriminator.fc2.weight"], averaged)
    assert again.ema.updates == 1
    with averaged_weights(trainer_with(again)):  # what benchmarks/ablation.py evaluates
        torch.testing.assert_close(resumed.model.discriminator.fc2.weight.detach(), averaged)
    torch.testing.assert_close(resumed.model.discriminator.fc2.weight.detach(), raw)


def trainer_with(*callbacks: L.Callback) -> Mock:
    trainer = Mock()
    trainer.callbacks = list(callbacks)
    return trainer


class _Start(L.Callback):
    """The discriminator's fc2 weight when training starts."""

    def on_train_start(self, trainer: L.Trainer, module: PathoScope) -> None:
        self.weight = module.model.discriminator.fc2.weight.detach().clone()


def _fit(
    root: Path, folder: Path, steps: int, callbacks: list[L.Callback], ckpt: Path | None = None
) -> PathoScope:
    """Fit a small module with optim.ema_decay 0.6 for `steps` in total (resumed from `ckpt`)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = PathoScope(
            network={"pretrained": False, "hidden_dim": 16},
            pieg={"steps": 1},
            bank={"max_anchors": 64, "copies": 1},
            optim={"ema_decay": 0.6},
        )
        trainer = L.Trainer(
            max_steps=steps,
            accelerator="cpu",
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            callbacks=callbacks,
            default_root_dir=folder,
        )
        dm = BraTSDataModule(
            str(root), shots=2, image_size=64, n_test_healthy=4, n_test_tumorous=4, batch_size=2
        )
        L.seed_everything(0)
        trainer.fit(module, dm, ckpt_path=ckpt)
    return module


def test_a_resumed_fit_continues_the_average_from_the_raw_weights(
    brats_root: Path, tmp_path: Path
) -> None:
    """Through Lightning: a checkpoint written during the fit (after step 2), and a fit resumed
    from it, which trains on from step 2's raw weights and continues the average, so that after
    2 + 2 steps the model holds the average of all four steps' weights."""
    first, second, start = _Record(), _Record(), _Start()
    every_2 = ModelCheckpoint(tmp_path / "ckpt", "mid", every_n_train_steps=2, save_top_k=-1)
    _fit(brats_root, tmp_path, 2, [first, start, every_2])
    initial = start.weight
    resumed = _fit(brats_root, tmp_path, 4, [second, start], ckpt=tmp_path / "ckpt" / "mid.ckpt")
    torch.testing.assert_close(start.weight, first.raw[-1], rtol=0, atol=0)
    assert len(first.raw) == len(second.raw) == 2
    expected = initial
    for n, raw in enumerate(first.raw + second.raw, start=1):
        d = min(0.6, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * raw
    torch.testing.assert_close(resumed.model.discriminator.fc2.weight.detach(), expected)
