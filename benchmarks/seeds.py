"""Seeds of one BraTS configuration as `pathoscope train` runs them (fit + test), timed, and the table
that compares two configurations seed by seed (paired: the same split, shots and backbone).

    .venv/bin/python benchmarks/seeds.py run --data-root DIR --name fast --seeds 0-4 --jobs 2 \
        [--config pathoscope] [LightningCLI overrides ...]
    .venv/bin/python benchmarks/seeds.py table --names before,fast [--out FILE.md]

`run` trains seed after seed (`--jobs N`: N processes of one intra-op thread each; `--threads T`
otherwise) into <runs>/<name>/seed<i>/ (the run folder of `pathoscope train`, plus seconds.json:
the wall-clock seconds of fit + test and the thread count) with the random backbone unless
`--model.network.weights` is given. A finished seed is kept. `table` prints, per metric, each
configuration's mean ± std over the seeds both have, each seed's values, and the paired
difference (second minus first, mean ± std), with minutes per seed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

KEYS = ("image_auroc", "pixel_auroc", "pro", "dice_best", "pixel_auroc_fg")
TITLES = ("Image AUROC", "Pixel AUROC", "PRO", "Dice (best)", "Pixel AUROC (fg)")


def parse_seeds(text: str) -> list[int]:
    """'0-4' or '0,2,5' -> the seeds."""
    seeds: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        seeds += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    return seeds


def run_seed(args: argparse.Namespace, seed: int, overrides: list[str]) -> None:
    """One seed in this process (imports the project here: `run` may use another checkout)."""
    import torch

    from pathoscope.app.configs import config_files
    from pathoscope.app.experiments import run_one

    try:  # as the `pathoscope` command does (a checkout from before this setting has none)
        from pathoscope.app.cpu import keep_freed_memory

        keep_freed_memory()
    except ImportError:
        pass
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = args.runs / args.name / f"seed{seed}"
    cli = [
        f"--data.root={args.data_root}",
        f"--data.shots={args.shots}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]
    if not any(o.startswith("--model.network.weights") for o in overrides):
        cli.append("--model.network.pretrained=false")
    start = time.perf_counter()
    run_one(config_files("brats", args.config), folder, seed, [*cli, *overrides])
    seconds = time.perf_counter() - start
    info = {"seconds": seconds, "threads": torch.get_num_threads(), "overrides": overrides}
    (folder / "seconds.json").write_text(json.dumps(info, indent=2) + "\n")


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    todo = [s for s in parse_seeds(args.seeds) if not (args.runs / args.name / f"seed{s}").is_dir()]
    if args.jobs <= 1:
        for seed in todo:
            print(f"== {args.name} / seed {seed} ==", flush=True)
            run_seed(args, seed, overrides)
        return 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    own = [
        "run",
        f"--data-root={args.data_root}",
        f"--name={args.name}",
        f"--config={args.config}",
        f"--shots={args.shots}",
        f"--runs={args.runs}",
        "--threads=1",
    ]
    running: list[subprocess.Popen] = []
    failed = 0
    for seed in todo:
        while len(running) >= args.jobs:
            failed += sum(r.returncode != 0 for r in running if r.poll() is not None)
            running = [r for r in running if r.returncode is None]
            time.sleep(5)
        log = args.runs / args.name / f"seed{seed}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        print(f"== {args.name} / seed {seed} (log: {log}) ==", flush=True)
        cmd = [sys.executable, __file__, *own, f"--seeds={seed}", *overrides]
        running.append(
            subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
        )
    failed += sum(r.wait() != 0 for r in running)
    return 1 if failed else 0


def load(runs: Path, name: str) -> dict[int, dict[str, Any]]:
    """{seed: metrics.json + seconds} of the finished seeds of `name`."""
    out = {}
    for folder in sorted((runs / name).glob("seed*")):
        metrics, seconds = folder / "metrics.json", folder / "seconds.json"
        if folder.is_dir() and metrics.is_file():
            row = json.loads(metrics.read_text())
            if seconds.is_file():
                row.update(json.loads(seconds.read_text()))
            out[int(folder.name.removeprefix("seed"))] = row
    return out


def _cell(values: list[float], scale: float = 100.0) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{mean:.1f}"
    return f"{mean:.1f} ± {statistics.stdev(values) * scale:.1f}"


def table(runs: Path, first: str, second: str) -> str:
    """Markdown: mean ± std of each configuration over their common seeds, the paired difference,
    then every seed's row, in percent, with minutes per seed."""
    a, b = load(runs, first), load(runs, second)
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise SystemExit(f"no seed finished in both {first} and {second} under {runs}")
    head = "| configuration | seeds | minutes / seed | " + " | ".join(TITLES) + " |"
    lines = [head, "|---" * (len(TITLES) + 3) + "|"]
    for name, rows in ((first, a), (second, b)):
        minutes = [rows[s]["seconds"] / 60 for s in seeds if "seconds" in rows[s]]
        cells = [_cell([rows[s][k] for s in seeds]) for k in KEYS]
        lines.append(
            f"| {name} | {len(seeds)} | {_cell(minutes, 1.0)} | " + " | ".join(cells) + " |"
        )
    diffs = [_cell([b[s][k] - a[s][k] for s in seeds]) for k in KEYS]
    minutes = [(b[s]["seconds"] - a[s]["seconds"]) / 60 for s in seeds if "seconds" in a[s]]
    lines.append(
        f"| {second} - {first}, paired | {len(seeds)} | {_cell(minutes, 1.0)} | "
        + " | ".join(diffs)
        + " |"
    )
    lines += ["", "| seed | configuration | minutes | " + " | ".join(TITLES) + " |"]
    lines.append("|---" * (len(TITLES) + 3) + "|")
    for s in seeds:
        for name, rows in ((first, a), (second, b)):
            minutes = f"{rows[s]['seconds'] / 60:.1f}" if "seconds" in rows[s] else "-"
            cells = [f"{rows[s][k] * 100:.1f}" for k in KEYS]
            lines.append(f"| {s} | {name} | {minutes} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="verb", required=True)
    r = sub.add_parser("run", help="train and test seeds of one configuration")
    r.add_argument("--data-root", required=True)
    r.add_argument("--name", required=True, help="folder name of this configuration")
    r.add_argument("--config", default="pathoscope", help="pathoscope or an experiments/ file")
    r.add_argument("--seeds", default="0-2")
    r.add_argument("--shots", type=int, default=2)
    r.add_argument("--jobs", type=int, default=1, help="parallel processes, one thread each")
    r.add_argument("--threads", type=int, default=0, help="intra-op threads (0: torch's default)")
    r.add_argument("--runs", type=Path, default=Path("runs/seeds"))
    t = sub.add_parser("table", help="two configurations, paired per seed")
    t.add_argument("--names", required=True, help="FIRST,SECOND")
    t.add_argument("--runs", type=Path, default=Path("runs/seeds"))
    t.add_argument("--out", type=Path)
    args, overrides = p.parse_known_args(argv)
    if args.verb == "run":
        if args.jobs > 1 and len(parse_seeds(args.seeds)) == 1:
            args.jobs = 1
        if args.jobs <= 1 and len(parse_seeds(args.seeds)) == 1:
            todo = parse_seeds(args.seeds)[0]
            if not (args.runs / args.name / f"seed{todo}").is_dir():
                run_seed(args, todo, overrides)
            return 0
        return run(args, overrides)
    if overrides:
        p.error(f"table takes no overrides: {overrides}")
    first, second = args.names.split(",")
    text = table(args.runs, first, second)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
