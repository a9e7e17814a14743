"""Section 6: what a researcher waits for. One default K = 2 BraTS seed (fit + test of the shipped
experiments/brats.yaml, as `pathoscope train` runs it: bank, training, validation, test, metrics,
panels, checkpoint) against one `anchor_knn` seed on the same data (bank, validation and test, no
training), interleaved in this process with the same thread count; and the seconds of 100 default
training steps (Trainer.fit without validation, bank building excluded), which show a regression
of the training step without a whole seed.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch

from pathoscope.app.bench.common import Row, Sizes, median_spread, paired_ratios
from pathoscope.app.configs import config_files
from pathoscope.app.experiments import run_one
from pathoscope.app.lightning_cli import lightning_cli

SEED_RATIO_TARGET = 8.0
SHOTS = 2


def seed_overrides(root: Path, sizes: Sizes) -> list[str]:
    """The CLI arguments of a bench seed: the bench's data and backbone, K = 2, the sizes' deltas."""
    args = [
        f"--data.root={root}",
        f"--data.shots={SHOTS}",
        "--model.network.pretrained=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]
    if sizes.weights is not None:
        args.append(f"--model.network.weights={sizes.weights}")
    return [*args, *sizes.seed_overrides]


class StepClock(L.Callback):
    """Wall time from the first training batch's start to the last one's end."""

    def __init__(self) -> None:
        self.start: float | None = None
        self.end: float | None = None
        self.steps = 0

    def on_train_batch_start(self, *args: Any) -> None:
        if self.start is None:
            self.start = time.perf_counter()

    def on_train_batch_end(self, *args: Any) -> None:
        self.end = time.perf_counter()
        self.steps += 1

    @property
    def seconds(self) -> float:
        return (self.end or 0.0) - (self.start or 0.0)


def training_steps_seconds(root: Path, sizes: Sizes, steps: int) -> tuple[float, int]:
    """Seconds of `steps` training steps of the shipped BraTS experiment (the bank built before the
    clock starts; no validation, checkpoint or logger); returns (seconds, steps run)."""
    args: list[str] = []
    for f in config_files("brats"):
        args += ["--config", str(f)]
    args += seed_overrides(root, sizes)
    args += [
        f"--trainer.max_steps={steps}",
        "--trainer.limit_val_batches=0",
        "--trainer.logger=false",
    ]
    out = Path(tempfile.mkdtemp(prefix="pathoscope-bench-steps-"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cli = lightning_cli(
                [*args, f"--trainer.default_root_dir={out}"], run=False, save_config_callback=None
            )
            clock = StepClock()
            trainer = cli.trainer
            trainer.callbacks = [
                c for c in trainer.callbacks if type(c).__name__ != "ModelCheckpoint"
            ] + [clock]
            trainer.fit(cli.model, datamodule=cli.datamodule)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return clock.seconds, clock.steps


def one_seed(config: str, root: Path, sizes: Sizes) -> Callable[[], dict[str, Any]]:
    """A call that runs seed 0 of `config` as `pathoscope train` does, in a temporary folder."""

    def run() -> dict[str, Any]:
        out = Path(tempfile.mkdtemp(prefix=f"pathoscope-bench-{config}-"))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return run_one(
                    config_files("brats", config), out / "seed0", 0, seed_overrides(root, sizes)
                )
        finally:
            shutil.rmtree(out, ignore_errors=True)

    return run


def bench_seed(root: Path, sizes: Sizes) -> tuple[list[Row], dict[str, Any]]:
    """Rows 6a (seed / anchor_knn seed, paired per round) and 6b (100 training steps)."""
    runs = {"anchor_knn": one_seed("anchor_knn", root, sizes)}
    runs["pathoscope"] = one_seed("pathoscope", root, sizes)
    runs["anchor_knn"]()  # warm-up of the shared parts (data files, first imports), unrecorded
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    metrics: dict[str, list[dict[str, Any]]] = {name: [] for name in runs}
    for r in range(sizes.seed_rounds):
        order = list(runs) if r % 2 == 0 else list(reversed(runs))
        for name in order:
            start = time.perf_counter()
            metrics[name].append(runs[name]())
            seconds[name].append(time.perf_counter() - start)
    ratios = paired_ratios(seconds["pathoscope"], seconds["anchor_knn"])
    ratio, spread = median_spread(ratios)
    steps_seconds, steps = training_steps_seconds(root, sizes, sizes.seed_steps)
    full_s, knn_s = (median_spread(seconds[n])[0] for n in ("pathoscope", "anchor_knn"))
    threads = torch.get_num_threads()
    rows = [
        Row(
            "6a",
            f"one K = {SHOTS} BraTS seed (brats.yaml, fit + test) / one anchor_knn seed",
            ratio,
            "x",
            spread if len(ratios) > 1 else None,
            target=f"<= {SEED_RATIO_TARGET:g}",
            passed=ratio <= SEED_RATIO_TARGET,
        ),
        Row(
            "6.",
            f"seconds per seed: brats.yaml / anchor_knn ({threads} threads)",
            full_s,
            f"s / {knn_s:.0f} s",
        ),
        Row(
            "6b",
            f"{steps} training steps of brats.yaml ({sizes.image_size} px)",
            steps_seconds,
            "s",
        ),
    ]
    raw = {
        "seconds": seconds,
        "ratios": ratios,
        "pathoscope_seconds": full_s,
        "anchor_knn_seconds": knn_s,
        "threads": threads,
        "training_steps": steps,
        "training_steps_seconds": steps_seconds,
        "image_auroc": {n: [m.get("image_auroc") for m in ms] for n, ms in metrics.items()},
    }
    return rows, raw
