"""Shared helpers of the integration tests: tiny overrides that make every experiment file run in
seconds. The experiment YAMLs are used as they are; these overrides only shrink sizes (64 px,
2 steps of 4 images, PiEG T=2, a 64-wide discriminator, a few test items) and switch the backbone
to random weights (no network here).
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
EXPERIMENTS = REPO / "experiments"
PIEG_STEPS = 2  # T in the tests (the paper's 20 is too slow here)


def tiny_overrides(dataset: str, root: Path, max_steps: int = 2) -> list[str]:
    """LightningCLI overrides for a fast run on the session's synthetic data."""
    args = [
        f"--data.root={root}",
        "--data.image_size=64",
        "--data.batch_size=4",
        "--data.steps_per_epoch=2",
        f"--trainer.max_steps={max_steps}",
        "--trainer.limit_val_batches=2",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.log_every_n_steps=1",
        "--model.network.pretrained=false",
        f"--model.pieg.steps={PIEG_STEPS}",
        "--model.network.hidden_dim=64",
        "--model.bank.max_anchors=256",
        "--metrics.eval_size=64",
    ]
    if dataset == "chestxray8":
        args += ["--data.n_test=9"]  # odd: DDP pads it
    else:
        args += ["--data.n_test_healthy=4", "--data.n_test_tumorous=5"]
    return args


def dataset_configs(dataset: str) -> list[str]:
    """The --config arguments of a dataset (demo = brats.yaml + demo.yaml)."""
    files = {
        "brats": ["brats.yaml"],
        "demo": ["brats.yaml", "demo.yaml"],
        "chestxray8": ["chestxray8.yaml"],
    }[dataset]
    out: list[str] = []
    for name in files:
        out += ["--config", str(EXPERIMENTS / name)]
    return out
