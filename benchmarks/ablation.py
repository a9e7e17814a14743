"""Ablations and quality-vs-steps curves on one BraTS set: which choice makes the detector work.

    .venv/bin/python benchmarks/ablation.py --data-root DIR --variants default,texture_lesions \
        --seeds 0,1,2 --shots 2 --max-steps 300 --eval-every 100 --jobs 2 [--data.init_args.x=...]

Each variant is the shipped BraTS experiment (experiments/brats.yaml, random backbone) plus a few
overrides (VARIANTS). A run trains it and, every `--eval-every` steps, scores the test slices in
four ways from the same features and bank, so one training run gives four rows:
  D        sigmoid(D(f(E(x))))                  the method's map (scoring.source discriminator)
  knn_e    nearest-anchor distance of E(x)      = anchor_knn (no training)
  knn_v    nearest-anchor distance of f(E(x))   the adapter's effect on the bank distance
  prod     D x knn_v, their product             scoring.source fusion (ours)
Metrics are the project's (callbacks.metrics.compute_metrics) on maps resized to at most 128 px,
exact at 128 px and 4x cheaper at 256 px. Runs are resumable: a finished (variant, seed) is kept in
<out>/<variant>/k<K>/seed<i>.json; the table (mean +- std over seeds, at the last step, and the
default variant's curve) goes to <out>/ablation-k<K>.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from callbacks.metrics import EvalData, compute_metrics
from pathoscope.app.configs import config_files
from pathoscope.app.lightning_cli import lightning_cli
from pathoscope.app.reporting import mean_std_cell
from pathoscope.ema import averaged_weights
from pathoscope.files import write_text
from pathoscope.postprocess import image_score

EVAL_SIZE = 128
KEYS = ("image_auroc", "pixel_auroc", "pro", "dice_best", "pixel_auroc_fg")
TITLES = ("Image AUROC", "Pixel AUROC", "PRO", "Dice (best)", "Pixel AUROC (fg)")
SCORINGS = {
    "D": "D",
    "knn_e": "anchor distance of E (= anchor_knn)",
    "knn_v": "anchor distance of f(E)",
    "prod": "D x anchor distance of f(E)",
}
# name -> (what it changes, overrides on the shipped experiments/brats.yaml)
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "default": ("the shipped BraTS experiment", []),
    "percentile_norm": (
        "volumes scaled by p99.5 (the former default)",
        ["--data.init_args.intensity_norm=percentile"],
    ),
    "texture_lesions": (
        "texture lesions only (the paper's DTD-style synthesis)",
        ["--data.init_args.intensity_lesions=0"],
    ),
    "intensity_lesions": ("intensity lesions only", ["--data.init_args.intensity_lesions=1"]),
    "paper_pipeline": (
        "p99.5 scaling and texture lesions only",
        ["--data.init_args.intensity_norm=percentile", "--data.init_args.intensity_lesions=0"],
    ),
    "pieg_ascent": ("PiEG ascent (Eq. 3's printed sign)", ["--model.pieg.direction=ascent"]),
    "no_pieg": ("no PiEG steps: v_s = v_n + Gaussian noise", ["--model.pieg.enabled=false"]),
    "pieg_stop05": (
        "PiEG stops each cell where D(v_s) reaches 0.5 (D's boundary)",
        ["--model.pieg.stop_at=0.5"],
    ),
    "pieg_scale_units": (
        "eta and noise in units of the bank's distance_scale",
        ["--model.pieg.units=distance_scale"],
    ),
    "synthetic_all_cells": (
        "PiEG and BCE(D(v_s), 1) on every cell, background included (the paper)",
        ["--model.losses.synthetic_in_foreground=false"],
    ),
    "ema": (
        "exponential moving average of the weights, decay 0.99",
        ["--model.optim.ema_decay=0.99"],
    ),
    "local_only": ("L_LC only (no L_GC)", ["--model.losses.use_global_contrast=false"]),
    "global_only": ("L_GC only (no L_LC)", ["--model.losses.use_local_contrast=false"]),
    "no_contrast": (
        "neither L_LC nor L_GC",
        ["--model.losses.use_local_contrast=false", "--model.losses.use_global_contrast=false"],
    ),
}


def evaluate(module: L.LightningModule, dm: Any) -> dict[str, dict[str, float]]:
    """Test metrics of the four scorings (module docstring) of the module's current weights; during
    a fit with optim.ema_decay, of their average, as validation does."""
    with averaged_weights(module.trainer):
        return _evaluate(module, dm)


@torch.no_grad()
def _evaluate(module: L.LightningModule, dm: Any) -> dict[str, dict[str, float]]:
    was_training = module.training
    module.eval()
    model = module.model
    maps: dict[str, list[np.ndarray]] = {}
    scores: dict[str, list[np.ndarray]] = {}
    gts, fgs, labels = [], [], []
    for batch in dm.test_dataloader():
        x, fg = batch.image, batch.foreground
        e = model.backbone(x).permute(0, 2, 3, 1)  # (B, h, w, C)
        v = model.adapter(e)
        b, h, w, c = v.shape
        scale = float(model.bank.distance_scale)
        grids = {
            "D": torch.sigmoid(model.discriminator(v)),
            "knn_e": model.bank.nearest(e.reshape(-1, c))[0].reshape(b, h, w) / scale,
            "knn_v": model.bank.nearest(v.reshape(-1, c))[0].reshape(b, h, w) / scale,
        }
        grids["prod"] = grids["D"] * grids["knn_v"]
        size = min(EVAL_SIZE, x.shape[-1])
        for name, g in grids.items():
            m = model.blur(F.interpolate(g[:, None], size=x.shape[-2:], mode="bilinear"))
            scores.setdefault(name, []).append(image_score(m, fg).numpy())
            maps.setdefault(name, []).append(
                F.interpolate(m, size=(size, size), mode="area")[:, 0].numpy()
            )
        gts.append(F.interpolate(batch.gt_mask.float(), size=(size, size))[:, 0].numpy() > 0)
        fgs.append(F.interpolate(fg.float(), size=(size, size))[:, 0].numpy() > 0)
        labels.append(batch.label.numpy())
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
    """Evaluates every `every` steps (and at step 0); writes the points and the training logs."""

    def __init__(self, dm: Any, every: int, out: Path) -> None:
        self.dm, self.every, self.out = dm, every, out
        self.points: list[dict[str, Any]] = []
        self.logs: list[dict[str, float]] = []
        self.t0 = time.time()

    def record(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        point = {
            "step": int(trainer.global_step),
            "minutes": round((time.time() - self.t0) / 60, 2),
        }
        point.update(evaluate(module, self.dm))
        self.points.append(point)
        print(json.dumps(point), flush=True)

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.t0 = time.time()
        self.record(trainer, module)

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        logs = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
        self.logs.append({"step": int(trainer.global_step), **logs})
        if trainer.global_step % self.every == 0:
            self.record(trainer, module)


def _result_file(args: argparse.Namespace, variant: str, seed: int) -> Path:
    return args.out / variant / f"k{args.shots}" / f"seed{seed}.json"


def run_single(args: argparse.Namespace, variant: str, seed: int, overrides: list[str]) -> Path:
    """Train one (variant, seed) in this process; returns its result file."""
    out = _result_file(args, variant, seed)
    cli_args: list[str] = []
    for f in config_files("brats"):
        cli_args += ["--config", str(f)]
    cli_args += [
        "--model.network.pretrained=false",
        *overrides,
        *VARIANTS[variant][1],
        f"--data.root={args.data_root}",
        f"--data.shots={args.shots}",
        f"--data.seed={seed}",
        f"--seed_everything={seed}",
        f"--trainer.max_steps={args.max_steps}",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.limit_val_batches=0",
    ]
    cli = lightning_cli(cli_args, run=False, save_config_callback=None)
    dm, module, trainer = cli.datamodule, cli.model, cli.trainer
    dm.setup("fit")
    curve = Curve(dm, args.eval_every, out)
    trainer.callbacks = [c for c in trainer.callbacks if type(c).__name__ != "ModelCheckpoint"]
    trainer.callbacks.append(curve)
    trainer.fit(module, datamodule=dm)
    if curve.points[-1]["step"] != trainer.global_step:
        curve.record(trainer, module)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"variant": variant, "seed": seed, "shots": args.shots, "overrides": overrides}
    result.update(points=curve.points, train=curve.logs)
    return write_text(out, json.dumps(result))


def _cell(values: list[float]) -> str:
    return mean_std_cell(values, scale=100, digits=1)


def table(results: dict[str, list[dict[str, Any]]], shots: int) -> str:
    """Markdown: one row per (variant, scoring) at the last step; the default's curve."""
    lines = [
        f"K = {shots}; mean ± std over seeds, in percent, at the last training step.",
        "",
        "| variant | scoring | seeds | steps | " + " | ".join(TITLES) + " |",
        "|---" * (len(TITLES) + 4) + "|",
    ]
    for variant, runs in results.items():
        if not runs:
            continue
        finals = [r["points"][-1] for r in runs]
        steps = finals[0]["step"]
        scorings = list(SCORINGS) if variant == "default" else ["D", "prod"]
        for name in scorings:
            cells = [_cell([f[name][k] for f in finals]) for k in KEYS]
            lines.append(
                f"| {variant} | {name} | {len(runs)} | {steps} | " + " | ".join(cells) + " |"
            )
    default = results.get("default") or []
    if default:
        lines += ["", "Quality against training steps (default variant):", ""]
        lines += [
            "| step | scoring | seeds | " + " | ".join(TITLES) + " |",
            "|---" * (len(TITLES) + 3) + "|",
        ]
        steps = sorted({p["step"] for r in default for p in r["points"]})
        for step in steps:
            at = [p for r in default for p in r["points"] if p["step"] == step]
            for name in ("D", "prod"):
                cells = [_cell([p[name][k] for p in at]) for k in KEYS]
                lines.append(f"| {step} | {name} | {len(at)} | " + " | ".join(cells) + " |")
    lines += ["", "Variants:", ""]
    lines += [" ".join([f"- `{v}`: {VARIANTS[v][0]}", *VARIANTS[v][1]]) for v in results]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", required=True)
    p.add_argument("--variants", default="default")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--shots", type=int, default=2)
    p.add_argument("--max-steps", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (one thread each)")
    p.add_argument("--out", type=Path, default=Path("runs/ablation"))
    p.add_argument("--single", nargs=2, metavar=("VARIANT", "SEED"), help=argparse.SUPPRESS)
    return p


def _run_all(args: argparse.Namespace, todo: list[tuple[str, int]], overrides: list[str]) -> None:
    """Each (variant, seed) of `todo` in its own process (`--single`), `args.jobs` at a time,
    its output in seed<i>.log beside its result."""
    own = [
        f"--data-root={args.data_root}",
        f"--shots={args.shots}",
        f"--max-steps={args.max_steps}",
        f"--eval-every={args.eval_every}",
        f"--out={args.out}",
        *overrides,
    ]
    running: list[subprocess.Popen] = []
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if args.jobs > 1 else dict(os.environ)
    for variant, seed in todo:
        while len(running) >= args.jobs:
            running = [r for r in running if r.poll() is None]
            time.sleep(5)
        log = args.out / variant / f"k{args.shots}" / f"seed{seed}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, __file__, *own, "--single", variant, str(seed)]
        print(f"== {variant} / seed {seed} ==", flush=True)
        running.append(
            subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
        )
    for r in running:
        r.wait()


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args, overrides = p.parse_known_args(argv)
    if args.single:
        run_single(args, args.single[0], int(args.single[1]), overrides)
        return 0
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; expected some of {sorted(VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    todo = [(v, s) for v in variants for s in seeds if not _result_file(args, v, s).is_file()]
    _run_all(args, todo, overrides)
    results = {
        v: [json.loads(f.read_text()) for s in seeds if (f := _result_file(args, v, s)).is_file()]
        for v in variants
    }
    text = table(results, args.shots)
    write_text(args.out / f"ablation-k{args.shots}.md", text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    from pathoscope.app.cpu import keep_freed_memory

    keep_freed_memory()  # as the `pathoscope` command does (speed only)
    sys.exit(main())
