"""Peers side by side on one BraTS split: PathoSCOPE, anchor_knn, the GLASS baselines and anomalib's
PatchCore and PaDiM, scored with the project's own metrics.

    make peers DATA_ROOT=DIR [SHOTS=2] [SEEDS=0,1,2]
    .venv/bin/python benchmarks/peers.py --data-root DIR --shots 2 --seeds 0,1,2 [overrides...]

Every method sees exactly the same thing: the project's split of the seed (the same K training
slices, the same test slices), the same normalisation (the data module's tensors) and the same
random ResNet18 (anomalib's extractor gets the weights the project's run of that seed used). The
project's configs run in-process as `pathoscope train` runs them; anomalib, which pins an older
jsonargparse, runs in its own environment (`.venv-peers/`, see `make peers`) through
benchmarks/peers_anomalib.py. Finished seeds are reused (delete their folder to rerun).

Writes <runs>/brats/<method>/k<K>/seed<i>/metrics.json per method and seed, and the table (mean +-
std over seeds) to <runs>/peers-k<K>.md / .json; prints the table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from callbacks.metrics import EvalData, compute_metrics
from data_modules.common import to_rgb
from data_modules.transforms import normalize
from pathoscope.app.configs import config_files
from pathoscope.app.data import build_datamodule
from pathoscope.app.experiments import run_one
from pathoscope.app.reporting import mean_std_cell
from pathoscope.files import write_text

PROJECT_CONFIGS = ("pathoscope", "anchor_knn", "glass_hypersphere", "glass_manifold")
PEERS = ("patchcore", "padim")
UNTRAINED = ("anchor_knn",)  # --max-steps leaves these at their config's 0 steps
TABLE = {
    "image_auroc": "Image AUROC",
    "pixel_auroc": "Pixel AUROC",
    "pro": "PRO",
    "dice_best": "Dice (best)",
    "pixel_auroc_fg": "Pixel AUROC (fg)",
}
ROW_NAMES = {
    "pathoscope": "PathoSCOPE (`brats.yaml`)",
    "anchor_knn": "`anchor_knn` (nearest anchor, no training)",
    "glass_hypersphere": "GLASS-h (`glass_hypersphere.yaml`)",
    "glass_manifold": "GLASS-m (`glass_manifold.yaml`)",
    "patchcore": "anomalib PatchCore",
    "padim": "anomalib PaDiM",
}


def _project_run(
    config: str,
    data_root: str,
    shots: int,
    seed: int,
    runs: Path,
    overrides: list[str],
    max_steps: int | None = None,
) -> dict[str, Any]:
    run_dir = runs / "brats" / config / f"k{shots}" / f"seed{seed}"
    done = run_dir / "metrics.json"
    if done.is_file():
        return json.loads(done.read_text())
    print(f"== {config} / K={shots} / seed {seed} ==", flush=True)
    args = [*overrides, f"--data.root={data_root}", f"--data.shots={shots}"]
    if max_steps is not None and config not in UNTRAINED:
        args.append(f"--trainer.max_steps={max_steps}")
    return run_one(config_files("brats", config), run_dir, seed, args)


def _export_split(
    data_root: str, shots: int, seed: int, overrides: list[str], out: Path
) -> dict[str, np.ndarray]:
    """The seed's split as the data module gives it: raw training slices and test items."""
    data_args = [a for a in overrides if a.startswith("--data")]
    dm = build_datamodule(
        [str(p) for p in config_files("brats", "pathoscope")],
        [*data_args, f"--data.root={data_root}", f"--data.shots={shots}", f"--data.seed={seed}"],
    )
    dm.setup("test")
    train = torch.stack([normalize(to_rgb(s.image)) for s in dm.split.train]).numpy()
    test = dm.test_dataset()
    items = [test[i] for i in range(len(test))]
    arrays = {
        "train": train,
        "test": torch.stack([it["image"] for it in items]).numpy(),
        "gt_masks": np.stack([np.asarray(it["gt_mask"]).reshape(train.shape[-2:]) for it in items]),
        "foreground": np.stack(
            [np.asarray(it["foreground"]).reshape(train.shape[-2:]) for it in items]
        ),
        "labels": np.array([int(it["label"]) for it in items]),
    }
    np.savez(out, train=arrays["train"], test=arrays["test"])
    return arrays


def _backbone_state(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(run_dir / "last.ckpt", map_location="cpu", weights_only=False)
    prefix = "model.backbone.net."
    return {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}


def _peer_runs(
    args: argparse.Namespace, seed: int, overrides: list[str], backbone_run: Path
) -> dict[str, dict[str, Any]]:
    folders = {p: args.runs / "brats" / p / f"k{args.shots}" / f"seed{seed}" for p in args.peers}
    if all((f / "metrics.json").is_file() for f in folders.values()):
        return {p: json.loads((f / "metrics.json").read_text()) for p, f in folders.items()}
    print(f"== anomalib {'/'.join(args.peers)} / K={args.shots} / seed {seed} ==", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        split_path, weights, out = Path(tmp) / "split.npz", Path(tmp) / "bb.pt", Path(tmp) / "o.npz"
        split = _export_split(args.data_root, args.shots, seed, overrides, split_path)
        torch.save(_backbone_state(backbone_run), weights)
        script = Path(__file__).with_name("peers_anomalib.py")
        cmd = [args.peers_python, str(script), str(split_path), str(weights), str(out)]
        subprocess.run([*cmd, "--seed", str(seed)], check=True)
        result = dict(np.load(out))
    metrics = {}
    for peer, folder in folders.items():
        maps = result[f"{peer}_maps"].astype(np.float32)
        n = len(maps)
        data = EvalData(
            scores=result[f"{peer}_scores"].astype(np.float32),
            labels=split["labels"],
            maps=maps,
            gt_masks=split["gt_masks"].astype(bool),
            foreground=split["foreground"].astype(bool),
            has_mask=np.ones(n, bool),
            index=np.arange(n),
            subject=np.array([""] * n),
            slice=np.zeros(n, np.int64),
        )
        metrics[peer] = {**compute_metrics(data, tau=None), "eval_size": list(maps.shape[1:])}
        folder.mkdir(parents=True, exist_ok=True)
        write_text(folder / "metrics.json", json.dumps(metrics[peer], indent=2))
    return metrics


def table(per_method: dict[str, list[dict[str, Any]]], shots: int, seeds: list[int]) -> str:
    head = f"| K = {shots}, seeds {','.join(map(str, seeds))} | " + " | ".join(TABLE.values())
    lines = [head + " |", "|---" * (len(TABLE) + 1) + "|"]
    for method, runs in per_method.items():
        cells = [mean_std_cell([m.get(k) for m in runs]) for k in TABLE]
        lines.append(f"| {ROW_NAMES.get(method, method)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", required=True)
    p.add_argument("--shots", type=int, default=2)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--configs", default=",".join(PROJECT_CONFIGS))
    p.add_argument("--peers", default=",".join(PEERS))
    p.add_argument("--runs", type=Path, default=Path("runs/peers"))
    p.add_argument("--peers-python", default=".venv-peers/bin/python")
    p.add_argument("--max-steps", type=int, help="training steps of the trained configs")
    args, overrides = p.parse_known_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    configs = [c for c in args.configs.split(",") if c]
    args.peers = [c for c in args.peers.split(",") if c]
    if not configs:
        p.error("--configs: at least one project config is needed (its run gives the backbone)")
    per_method: dict[str, list[dict[str, Any]]] = {m: [] for m in [*configs, *args.peers]}
    for seed in seeds:
        for config in configs:
            metrics = _project_run(
                config, args.data_root, args.shots, seed, args.runs, overrides, args.max_steps
            )
            per_method[config].append(metrics)
        if args.peers:
            first = args.runs / "brats" / configs[0] / f"k{args.shots}" / f"seed{seed}"
            for peer, metrics in _peer_runs(args, seed, overrides, first).items():
                per_method[peer].append(metrics)
    text = table(per_method, args.shots, seeds)
    stem = args.runs / f"peers-k{args.shots}"
    write_text(stem.with_suffix(".md"), text + "\n")
    write_text(stem.with_suffix(".json"), json.dumps(per_method, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    from pathoscope.app.cpu import keep_freed_memory

    keep_freed_memory()  # as the `pathoscope` command does (speed only)
    sys.exit(main())
