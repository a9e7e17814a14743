"""`pathoscope embeddings`: a t-SNE of normal, pathological, PiEG and Gaussian embeddings of a
trained run, and the nearest-neighbour distance ratio that says how close PiEG's lie to real
pathology (pathoscope/app/figures/embedding_space.py computes and draws them). Writes
`embeddings.png` and `embeddings.json` (the ratio, its two terms, the distance to the normal set
for scale, the set sizes) into `--out` (default: the checkpoint's folder), and prints the ratio.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pathoscope.app.figures.embedding_space import (
    GROUPS,
    LABELS,
    closeness,
    discriminator_means,
    plot_embeddings,
    real_embeddings,
    subsample,
    synthetic_embeddings,
)

FIGURE, REPORT = "embeddings.png", "embeddings.json"


def run_embeddings(
    ckpt_path: Path,
    config: Path,
    out: Path,
    data_root: str | None = None,
    points: int = 500,
    batches: int = 2,
    seed: int = 0,
) -> dict[str, Any]:
    """Everything the verb does (module docstring); returns embeddings.json's content."""
    from pathoscope.app.data import run_datamodule
    from pathoscope.checkpoint import load_model

    if points < 2 or batches < 1:
        raise ValueError(
            f"embeddings: --points must be >= 2 and --batches >= 1; got {points}, {batches}"
        )
    model = load_model(ckpt_path)
    dm = run_datamodule(config, data_root)
    sets = {
        **real_embeddings(model, dm.test_dataset()),
        **synthetic_embeddings(model, dm.train_dataloader(), batches, seed),
    }
    for name, values in sets.items():
        if values.shape[0] == 0:
            raise ValueError(f"embeddings: no {LABELS[name]} feature cell in the data")
    totals = {name: int(values.shape[0]) for name, values in sets.items()}
    sets = subsample(sets, points, seed)
    numbers = closeness(sets)
    numbers.update(discriminator_means(model, sets))
    out.mkdir(parents=True, exist_ok=True)
    title = f"{ckpt_path}"
    plot_embeddings(sets, numbers, out / FIGURE, title, seed)
    report = {
        **numbers,
        "points": {name: int(values.shape[0]) for name, values in sets.items()},
        "cells": totals,
        "checkpoint": str(ckpt_path),
        "seed": seed,
        "figure": FIGURE,
    }
    (out / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pathoscope embeddings",
        description="t-SNE of normal, pathological, PiEG and Gaussian embeddings of a trained "
        "model, and how close PiEG's lie to real pathology (nearest-neighbour distance ratio, "
        "< 1: closer than Gaussian noise). Writes embeddings.png and embeddings.json.",
    )
    parser.add_argument("--run", default=None, help="a run folder (its last.ckpt and config.yaml)")
    parser.add_argument("--ckpt_path", default=None, help="instead of --run: a checkpoint")
    parser.add_argument(
        "--config",
        default=None,
        help="the data's YAML (default: config.yaml beside the checkpoint)",
    )
    parser.add_argument("--data-root", default=None, help="replace the config's data root")
    parser.add_argument("--points", type=int, default=500, help="cells per set (default 500)")
    parser.add_argument(
        "--batches", type=int, default=2, help="training batches for PiEG (default 2)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="output folder (default: the checkpoint's)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if (args.run is None) == (args.ckpt_path is None):
        raise ValueError("embeddings: give either --run DIR or --ckpt_path FILE")
    ckpt = Path(args.run) / "last.ckpt" if args.run else Path(args.ckpt_path)
    config = Path(args.config) if args.config else ckpt.parent / "config.yaml"
    for path in (ckpt, config):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: not found" + (" (give --config)" if path == config else "")
            )
    out = Path(args.out) if args.out else ckpt.parent
    report = run_embeddings(ckpt, config, out, args.data_root, args.points, args.batches, args.seed)
    print(
        f"nearest-neighbour distance ratio, pathological to PiEG / to Gaussian: "
        f"{report['nn_ratio_pieg_over_gaussian']:.4f} "
        f"({report['nn_pathological_to_pieg']:.4g} / {report['nn_pathological_to_gaussian']:.4g}; "
        f"to normal {report['nn_pathological_to_normal']:.4g}; the normal cells' own ratio "
        f"{report['nn_ratio_normal_over_gaussian']:.4f})"
    )
    print("mean D: " + ", ".join(f"{name} {report[f'd_{name}']:.3f}" for name in GROUPS))
    print(f"wrote {out / FIGURE} and {out / REPORT}")
    return 0
