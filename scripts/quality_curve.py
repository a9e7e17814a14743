"""Research probe: test metrics every N training steps, for several scorings of the same model.

    .venv/bin/python scripts/quality_curve.py --data-root DIR --shots 2 --seed 0 \
        --max-steps 400 --eval-every 50 --out runs/curve/NAME.json [--model.x=... overrides]

Scorings evaluated at each point (same features, same bank):
  d        sigmoid(D(v))                  the method's map
  knn_v    ||v - nearest anchor|| / scale  anchor distance of the adapted features
  knn_e    same on the backbone features   (= anchor_knn)
  prod     d * knn_v                       calibration-free fusion
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from callbacks.metrics import EvalData, compute_metrics
from pathoscope.app.configs import config_files
from pathoscope.app.lightning_cli import lightning_cli
from pathoscope.postprocess import image_score

EVAL_SIZE = 128
KEYS = ("image_auroc", "pixel_auroc", "pro", "dice_best", "pixel_auroc_fg")


@torch.no_grad()
def evaluate(module, dm) -> dict[str, dict[str, float]]:
    was_training = module.training
    module.eval()
    model = module.model  # the torch model
    maps: dict[str, list[np.ndarray]] = {}
    scores: dict[str, list[np.ndarray]] = {}
    gts, fgs, labels = [], [], []
    for batch in dm.test_dataloader():
        x, fg = batch["image"], batch["foreground"]
        e = model.backbone(x).permute(0, 2, 3, 1)  # (B, h, w, C)
        v = model.adapter(e)
        b, h, w, c = v.shape
        scale = float(model.bank.distance_scale)
        grids = {
            "d": torch.sigmoid(model.discriminator(v)),
            "knn_v": model.bank.nearest(v.reshape(-1, c))[0].reshape(b, h, w) / scale,
            "knn_e": model.bank.nearest(e.reshape(-1, c))[0].reshape(b, h, w) / scale,
        }
        grids["prod"] = grids["d"] * grids["knn_v"]
        size = min(EVAL_SIZE, x.shape[-1])  # metrics on a coarser grid: 4x cheaper at 256 px
        for name, g in grids.items():
            m = model.blur(F.interpolate(g[:, None], size=x.shape[-2:], mode="bilinear"))
            scores.setdefault(name, []).append(image_score(m, fg).numpy())
            m = F.interpolate(m, size=(size, size), mode="area")
            maps.setdefault(name, []).append(m[:, 0].numpy())
        gts.append(F.interpolate(batch["gt_mask"].float(), size=(size, size))[:, 0].bool().numpy())
        fgs.append(F.interpolate(fg.float(), size=(size, size))[:, 0].bool().numpy())
        labels.append(batch["label"].numpy())
    gt, fgm, lab = np.concatenate(gts), np.concatenate(fgs), np.concatenate(labels)
    n = len(lab)
    out = {}
    for name in maps:
        data = EvalData(
            scores=np.concatenate(scores[name]),
            labels=lab,
            maps=np.concatenate(maps[name]),
            gt_masks=gt,
            foreground=fgm,
            has_mask=np.ones(n, bool),
            index=np.arange(n),
            subject=np.array([""] * n),
            slice=np.zeros(n, np.int64),
        )
        met = compute_metrics(data, tau=None)
        out[name] = {k: round(float(met[k]), 4) for k in KEYS}
    module.train(was_training)
    return out


class Curve(L.Callback):
    def __init__(self, dm, every: int, out: Path) -> None:
        self.dm, self.every, self.out = dm, every, out
        self.points: list[dict] = []
        self.t0 = time.time()
        self.train_logs: list[dict] = []

    def _record(self, trainer, model) -> None:
        res = evaluate(model, self.dm)
        point = {"step": int(trainer.global_step), "minutes": (time.time() - self.t0) / 60, **res}
        self.points.append(point)
        print(json.dumps(point), flush=True)
        self.out.write_text(json.dumps({"points": self.points, "train": self.train_logs}))

    def on_fit_start(self, trainer, model) -> None:
        self.t0 = time.time()

    def on_train_start(self, trainer, model) -> None:
        self._record(trainer, model)

    def on_train_batch_end(self, trainer, model, outputs, batch, batch_idx) -> None:
        logs = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
        self.train_logs.append({"step": int(trainer.global_step), **logs})
        if trainer.global_step % self.every == 0:
            self._record(trainer, model)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--data-root", required=True)
    p.add_argument("--shots", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=400)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--out", type=Path, required=True)
    args, overrides = p.parse_known_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    cli_args = []
    for f in config_files("brats"):
        cli_args += ["--config", str(f)]
    cli_args += [
        "--model.network.pretrained=false",
        *overrides,
        f"--data.root={args.data_root}",
        f"--data.shots={args.shots}",
        f"--data.seed={args.seed}",
        f"--seed_everything={args.seed}",
        f"--trainer.max_steps={args.max_steps}",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.limit_val_batches=0",
        "--trainer.enable_model_summary=false",
    ]
    cli = lightning_cli(cli_args, run=False, save_config_callback=None)
    dm, model, trainer = cli.datamodule, cli.model, cli.trainer
    dm.setup("fit")
    curve = Curve(dm, args.eval_every, args.out)
    trainer.callbacks = [c for c in trainer.callbacks if type(c).__name__ != "ModelCheckpoint"]
    trainer.callbacks.append(curve)
    trainer.fit(model, datamodule=dm)
    if not curve.points or curve.points[-1]["step"] != trainer.global_step:
        curve._record(trainer, model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
