"""`pathoscope maps`: anomaly maps of a few fixed test slices across the configs and K of a runs
folder (the paper's Fig. 3; the grid is pathoscope/app/figures/map_grid.py).

Runs: every `<config>/k<K>/seed<S>/predictions.npz` under `--runs` for the chosen seed (`--seed`,
default 0), configs in table order, then K; hidden (partial) folders are never read. The columns
are chosen on the first run (`select_slices`); the images are read through the data module of
its config.yaml (`--data-root` replaces its root). Writes `maps_grid.png` into the runs folder
(or `--out`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from pathoscope.app.figures.map_grid import Run, draw_grid, select_slices
from pathoscope.app.reporting import config_order

GRID_FILE = "maps_grid.png"


def find_runs(runs: Path, seed: int) -> list[Run]:
    """The seed's runs under `runs`, configs in table order, then K."""
    found = []
    for path in sorted(Path(runs).rglob(f"seed{seed}/predictions.npz")):
        rel = path.relative_to(runs)
        if any(part.startswith(".") for part in rel.parts) or len(rel.parts) < 4:
            continue
        k_dir = rel.parts[-3]
        if not (k_dir.startswith("k") and k_dir[1:].isdigit()):
            continue
        with np.load(path) as f:
            predictions = {k: f[k] for k in f.files}
        found.append(Run("/".join(rel.parts[:-3]), int(k_dir[1:]), path.parent, predictions))
    if not found:
        raise FileNotFoundError(
            f"{runs}: no <config>/k<K>/seed{seed}/predictions.npz (run `pathoscope train` first)"
        )
    return sorted(found, key=lambda r: (config_order(r.config), r.shots))


def run_map_grid(
    runs_dir: Path,
    seed: int = 0,
    n_slices: int = 4,
    data_root: str | None = None,
    out: Path | None = None,
) -> Path:
    """Everything the verb does; returns the figure's path."""
    from data_modules.transforms import denormalize
    from pathoscope.app.data import run_datamodule

    if n_slices < 1:
        raise ValueError(f"maps: --slices must be >= 1, got {n_slices}")
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise FileNotFoundError(f"{runs_dir}: runs folder not found")
    runs = find_runs(runs_dir, seed)
    slices = select_slices(runs[0].predictions, n_slices)
    dm = run_datamodule(runs[0].folder / "config.yaml", data_root)
    dataset = dm.test_dataset()
    wanted = set(slices)
    images = {}
    for i in range(len(dataset)):
        item = dataset[i]
        key = (str(item["subject"]), int(item["slice"]))
        if key in wanted:
            images[key] = denormalize(torch.as_tensor(item["image"])).mean(0).numpy()  # (S, S)
    missing = wanted - images.keys()
    if missing:
        raise ValueError(
            f"maps: the data of {runs[0].folder / 'config.yaml'} has no test slice {sorted(missing)[0]}"
            " (another data root? give --data-root)"
        )
    return draw_grid(runs, slices, images, Path(out) if out else runs_dir / GRID_FILE)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pathoscope maps",
        description="A grid of anomaly maps: fixed test slices (columns) across every config and K "
        "(rows) of a runs folder, one seed. Writes maps_grid.png into --runs (or --out).",
    )
    parser.add_argument("--runs", required=True, help="e.g. runs/brats")
    parser.add_argument("--seed", type=int, default=0, help="which seed's runs (default 0)")
    parser.add_argument("--slices", type=int, default=4, help="pathological slices (default 4)")
    parser.add_argument("--data-root", default=None, help="replace the runs' data root")
    parser.add_argument("--out", default=None, help="PNG path (default <runs>/maps_grid.png)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = run_map_grid(Path(args.runs), args.seed, args.slices, args.data_root, args.out)
    print(f"wrote {out}")
    return 0
