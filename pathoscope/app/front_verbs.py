"""The verbs of the front parser of `pathoscope` (pathoscope/app/cli.py, whose table `VERBS`
names them): for each, `<verb>_args(parser)` adds its arguments and `cmd_<verb>(args, extra) -> int`
runs it (`extra`: the arguments the parser left, LightningCLI overrides where the verb takes them).
Imports are lazy: `pathoscope --help` must not wait for torch.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pathoscope.exit_codes import partial_exit


def train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dataset",
        required=True,
        help="a choice of experiments/datasets.yaml: demo | brats | chestxray8 (demo = synthetic "
        "BraTS)",
    )
    p.add_argument("--shots", type=int, default=2, help="K, the training subjects (default 2)")
    p.add_argument("--repeats", type=int, default=1, help="seeds 0..N-1 (default 1)")
    p.add_argument(
        "--config-name",
        default="pathoscope",
        help="pathoscope (the method), or an experiments/ file on top of the dataset config: "
        "ablation/local_only, ablation/global_only, ablation/no_pieg, glass_hypersphere, "
        "glass_manifold, anchor_knn",
    )
    p.add_argument(
        "--data-root",
        default=None,
        help="dataset folder (default: the choice's data_root in experiments/datasets.yaml; the "
        "demo's, data/demo/brats, is written if missing)",
    )
    p.add_argument("--logger", choices=("csv", "wandb"), default="csv")
    p.add_argument("--runs", default="runs", help="runs root folder (default runs)")
    p.add_argument("--max-steps", type=int, default=None, help="override trainer.max_steps")
    p.add_argument(
        "--overwrite", action="store_true", help="replace finished seeds (refused otherwise)"
    )


def cmd_train(args: argparse.Namespace, extra: list[str]) -> int:
    import json

    import yaml

    from pathoscope.app.configs import DEFAULT_CONFIG, config_files, dataset_choices
    from pathoscope.app.experiments import train
    from pathoscope.app.reporting import build_table

    common = dict(
        dataset=args.dataset,
        shots=args.shots,
        repeats=args.repeats,
        data_root=args.data_root,
        logger=args.logger,
        runs_root=args.runs,
        max_steps=args.max_steps,
        overrides=extra,
        overwrite=args.overwrite,
    )
    base = train(config_name=args.config_name, **common)
    print((base / "summary.md").read_text())
    choice = dataset_choices().get(args.dataset)
    folders = [base]
    if args.config_name.removesuffix(".yaml") != DEFAULT_CONFIG or choice is None:
        return _summaries_exit("train", folders)
    for config in choice.compare_with:
        # A baseline that trains nothing (trainer.max_steps: 0 in its file) keeps its 0 steps.
        untrained = (yaml.safe_load(config_files(args.dataset, config)[-1].read_text()) or {}).get(
            "trainer", {}
        ).get("max_steps") == 0
        folders.append(
            train(config_name=config, **{**common, **({"max_steps": None} if untrained else {})})
        )
    if len(folders) > 1:  # the method beside its baselines on the same data and seeds
        summaries = [json.loads((f / "summary.json").read_text()) for f in folders]
        print(build_table(summaries, paper=False)[0])
    return _summaries_exit("train", folders)


def _summaries_exit(verb: str, folders: list[Path]) -> int:
    """_records_exit of the summaries in `folders`."""
    import json

    summaries = [json.loads((f / "summary.json").read_text()) for f in folders]
    return _records_exit(verb, summaries, "summary.md and summary.json")


def _records_exit(verb: str, records: list[dict[str, Any]], where: str) -> int:
    """EXIT_PARTIAL, with a line naming them, when `records` (summary.json / metrics.json
    contents) hold inputs of the data root that the runs were made without; else EXIT_OK."""
    from pathoscope.app.reporting import skipped_inputs

    skipped = skipped_inputs(records)
    names = {name: why for group in skipped.values() for name, why in group.items()}
    kind = next(iter(skipped), "skipped_inputs").removeprefix("skipped_").removesuffix("s")
    return partial_exit(verb, names, f"{kind}(s)", where)


def table_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs", required=True, help="e.g. runs/brats")
    p.add_argument("--no-paper", action="store_true", help="leave out the paper's reference rows")


def cmd_table(args: argparse.Namespace, extra: list[str]) -> int:
    from pathoscope.app.reporting import write_table

    _no_extra(extra, "table")
    markdown = write_table(Path(args.runs), paper=not args.no_paper)
    print(markdown)
    return 0


def grid_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", action="append", default=[], help="experiment YAML (repeatable, in order)"
    )
    p.add_argument(
        "--dataset", default=None, help="instead of --config: a choice of experiments/datasets.yaml"
    )
    p.add_argument(
        "--config-name",
        default="pathoscope",
        help="with --dataset: as for train (default pathoscope)",
    )
    p.add_argument(
        "--param",
        action="append",
        required=True,
        help="KEY=V1,V2,... e.g. model.pieg.eta=0.005,0.01,0.02,0.05 (repeatable: all combinations)",
    )
    p.add_argument("--shots", default="2", help="K values, e.g. 2,4 (default 2)")
    p.add_argument("--repeats", type=int, default=1, help="seeds 0..N-1 (default 1)")
    p.add_argument("--out", default="runs/grid", help="output folder (default runs/grid)")
    p.add_argument("--data-root", default=None, help="dataset folder (sets --data.root)")
    p.add_argument("--logger", choices=("csv", "wandb"), default="csv")
    p.add_argument("--max-steps", type=int, default=None, help="override trainer.max_steps")
    p.add_argument("--overwrite", action="store_true", help="replace finished runs")


def cmd_grid(args: argparse.Namespace, extra: list[str]) -> int:
    from pathoscope.app.configs import config_files, dataset_root
    from pathoscope.app.experiments import grid, parse_int_list

    configs, data_root = args.config, args.data_root
    if args.dataset is not None:  # the dataset's YAMLs (+ --config-name), as `train` uses them
        if configs:
            raise ValueError("give either --dataset (with --config-name) or --config files")
        configs = [str(p) for p in config_files(args.dataset, args.config_name)]
        data_root = str(dataset_root(args.dataset, data_root))
    elif not configs:
        raise ValueError("give --dataset (with --config-name) or --config files")
    folders = grid(
        configs=configs,
        params=args.param,
        shots=parse_int_list(args.shots, "--shots"),
        repeats=args.repeats,
        out=Path(args.out),
        data_root=data_root,
        logger=args.logger,
        max_steps=args.max_steps,
        overrides=extra,
        overwrite=args.overwrite,
    )
    print((Path(args.out) / "grid.md").read_text())
    return _summaries_exit("grid", folders)


def sweep_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", action="append", required=True, help="experiment YAML (repeatable, in order)"
    )
    p.add_argument("--seed", type=int, default=0, help="data seed and seed_everything (default 0)")
    p.add_argument("--out", default="runs/sweeps", help="output folder (default runs/sweeps)")
    p.add_argument("--data-root", default=None, help="dataset folder (sets --data.root)")
    p.add_argument("--logger", choices=("csv", "wandb"), default="wandb")


def cmd_sweep_run(args: argparse.Namespace, extra: list[str]) -> int:
    from pathoscope.app.experiments import sweep_run
    from pathoscope.app.reporting import format_metrics

    metrics = sweep_run(
        configs=args.config,
        seed=args.seed,
        out=Path(args.out),
        data_root=args.data_root,
        logger=args.logger,
        overrides=extra,
    )
    print(format_metrics(metrics))
    return _records_exit("sweep-run", [metrics], "metrics.json")


def make_demo_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, choices=("brats", "chestxray8"))
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--kind",
        choices=("phantom", "anatomy", "anatomy-hard"),
        default=None,
        help="brats only: phantom brains (default), or brains from the MNI152 template with "
        "BraTS-like gliomas in the 240 x 240 x 155 frame (the development benchmark; nilearn); "
        "anatomy-hard: the same with white-matter hyperintensities, per-subject contrast, bias, "
        "noise and slice thickness, and smaller, subtler tumours",
    )


def cmd_make_demo_data(args: argparse.Namespace, extra: list[str]) -> int:
    from data_modules.synthetic import ANATOMY_SHAPE, PROTOCOL_SIZES, make_demo_data

    _no_extra(extra, "make-demo-data")
    if args.kind is not None and args.dataset != "brats":
        raise ValueError(f"--kind applies to --dataset brats only, not {args.dataset}")
    # Large enough for `train --dataset <same>` (its default test counts), unlike make train's demo.
    sizes = PROTOCOL_SIZES[args.dataset]
    if args.kind in ("anatomy", "anatomy-hard"):  # the development benchmarks: BraTS's frame
        sizes = {**sizes, "shape": ANATOMY_SHAPE}
    root = make_demo_data(args.dataset, args.out, kind=args.kind or "phantom", **sizes)
    print(f"wrote a synthetic {args.dataset} set; data root: {root}")
    return 0


def show_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", action="append", required=True, help="experiment YAML (repeatable, in order)"
    )
    p.add_argument("--out", default="show_data.png", help="PNG path (default show_data.png)")


def cmd_show_data(args: argparse.Namespace, extra: list[str]) -> int:
    from data_modules.visualize import show_data_grid
    from pathoscope.app.data import build_datamodule

    datamodule = build_datamodule(args.config, extra)
    out = show_data_grid(datamodule, args.out)
    print(f"wrote {out}")
    return 0


def _no_extra(extra: list[str], verb: str) -> None:
    if extra:
        raise ValueError(f"unrecognised arguments for {verb}: {' '.join(extra)}")
