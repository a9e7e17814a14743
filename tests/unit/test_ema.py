"""WeightEMA (pathoscope/ema.py) and its use by the LightningModule (optim.ema_decay)."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from data_modules.brats import BraTSDataModule
from pathoscope.ema import WeightEMA
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


def test_checkpoint_during_fit_holds_the_average_and_the_raw_weights() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = PathoScope(
            network={"pretrained": False, "hidden_dim": 16}, optim={"ema_decay": 0.5}
        )
    module._start_ema()
    w = module.model.discriminator.fc2.weight
    with torch.no_grad():
        w.add_(1.0)  # a "step"
    module._ema.update()
    averaged = module._ema.shadow["model.discriminator.fc2.weight"].clone()
    raw = w.detach().clone()
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    torch.testing.assert_close(checkpoint["state_dict"]["model.discriminator.fc2.weight"], averaged)
    torch.testing.assert_close(
        checkpoint["pathoscope"]["ema"]["raw"]["model.discriminator.fc2.weight"], raw
    )
    # A resumed fit gets the raw weights back in the model and the average in the shadow.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resumed = PathoScope(
            network={"pretrained": False, "hidden_dim": 16}, optim={"ema_decay": 0.5}
        )
    resumed.load_state_dict(checkpoint["state_dict"])
    resumed.on_load_checkpoint(checkpoint)
    resumed._start_ema()
    torch.testing.assert_close(resumed.model.discriminator.fc2.weight.detach(), raw)
    torch.testing.assert_close(resumed._ema.shadow["model.discriminator.fc2.weight"], averaged)
    assert resumed._ema.updates == 1
