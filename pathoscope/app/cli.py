"""The `pathoscope` command.

`pathoscope fit|validate|test ...` is a LightningCLI (`PathoScopeCLI`, app/lightning_cli.py):
experiments/defaults.yaml, then `--config experiments/X.yaml` (repeatable: later files override
earlier ones), any key overridable (`--model.pieg.eta 0.02`, `--data.shots 4`,
`--trainer.max_steps 100`). The other verbs belong to the front parser here, each with its own
`--help`:

  train           fit + test seeds 0..N-1 of one dataset / config / K, then summary.json + .md
  table           gather every config and K under a runs folder into one Markdown table + CSV
  grid            a local parameter grid (no account needed): table + one plot per metric
  sweep-run       one fit + test for a W&B sweep agent (experiments/sweeps/*.yaml call it)
  make-demo-data  write a synthetic BraTS or ChestX-ray8 set in the real on-disk format
  show-data       a PNG grid of training, synthetic-lesion and test images of a config
  predict, export, bench, embeddings, maps  (their own modules: pathoscope.app.predict.run,
                  .export, .bench.run, .embeddings, .maps)

Every error a user can cause (bad data, missing weights, missing files, bad values) ends with one
line on stderr and exit status 2, never a traceback. Exit statuses, the same for every verb
(pathoscope/exit_codes.py): 0 done (also "nothing left to do"), 2 usage or input error,
3 done with some inputs skipped (a line names them), 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pathoscope.exit_codes import EXIT_INTERRUPTED, EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, partial_exit

FIT_VERBS = ("fit", "validate", "test")  # the LightningCLI verbs (its `predict` is ours)
__all__ = ["EXIT_OK", "EXIT_PARTIAL", "EXIT_USAGE", "main"]

_HELP = """\
usage: pathoscope <verb> [options]   (pathoscope <verb> --help for each verb)

PathoSCOPE: few-shot unsupervised pathology detection.

LightningCLI verbs (--config experiments/X.yaml, any key overridable):
  fit             train (and validate, which sets the image threshold tau)
  validate        run validation of a checkpoint (--ckpt_path)
  test            test a checkpoint (--ckpt_path): metrics.json in --metrics.output_dir

Experiment verbs:
  train           fit + test seeds 0..N-1 into runs/<dataset>/<config>/k<K>/, then summary
  table           one Markdown table + CSV of every config and K under a runs folder
  grid            local parameter grid (--param model.pieg.eta=0.01,0.05): table + plots
  sweep-run       one fit + test of a W&B sweep configuration (used by experiments/sweeps/)

Other verbs:
  predict         anomaly maps for new images from a checkpoint
  export          export a checkpoint (ONNX / TorchScript)
  bench           speed and cost benchmarks
  make-demo-data  write a synthetic BraTS / ChestX-ray8 set in the real on-disk format
  show-data       PNG grid of the training, synthetic-lesion and test images of a config

Figures:
  embeddings      t-SNE of normal, pathological, PiEG and Gaussian embeddings of a trained run,
                  and how close PiEG's lie to real pathology
  maps            anomaly maps of a few fixed test slices across the configs and K of a runs folder
"""


def _error_types() -> tuple[type[BaseException], ...]:
    """The exceptions that mean bad input and end as one line (imports kept lazy: torch is slow)."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from data_modules.errors import DataError
    from pathoscope.backbone import BackboneWeightsError

    # MisconfigurationException: Lightning's refusal of a trainer setting (--trainer.max_steps -5)
    return (
        DataError,
        BackboneWeightsError,
        FileNotFoundError,
        ValueError,
        MisconfigurationException,
    )


# ------------------------------------------------------------------------------- LightningCLI
def _run_lightning(argv: list[str]) -> int:
    # lazy: torch and Lightning are slow
    from pathoscope.app.lightning_cli import lightning_cli, our_interrupts

    with our_interrupts():
        cli = lightning_cli(argv, run=True)
    where = "metrics.json and the warnings above" if argv[0] == "test" else "the warnings above"
    return _skipped_exit(argv[0], cli.datamodule, where)


def _skipped_exit(verb: str, datamodule: Any, where: str) -> int:
    """EXIT_PARTIAL, with a line naming them, when the data module left inputs out; else EXIT_OK."""
    skipped = getattr(datamodule, "skipped", None) or {}
    kind = getattr(datamodule, "input_kind", "input")
    return partial_exit(verb, skipped, f"{kind}(s)", where)


# ------------------------------------------------------------------------------- front verbs
def _add_train_args(p: argparse.ArgumentParser) -> None:
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


def _cmd_train(args: argparse.Namespace, extra: list[str]) -> int:
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


def _cmd_table(args: argparse.Namespace, extra: list[str]) -> int:
    from pathoscope.app.reporting import write_table

    _no_extra(extra, "table")
    markdown = write_table(Path(args.runs), paper=not args.no_paper)
    print(markdown)
    return 0


def _cmd_grid(args: argparse.Namespace, extra: list[str]) -> int:
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


def _cmd_sweep_run(args: argparse.Namespace, extra: list[str]) -> int:
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


def _cmd_make_demo_data(args: argparse.Namespace, extra: list[str]) -> int:
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


def _cmd_show_data(args: argparse.Namespace, extra: list[str]) -> int:
    from data_modules.visualize import show_data_grid
    from pathoscope.app.data import build_datamodule

    datamodule = build_datamodule(args.config, extra)
    out = show_data_grid(datamodule, args.out)
    print(f"wrote {out}")
    return 0


def _no_extra(extra: list[str], verb: str) -> None:
    if extra:
        raise ValueError(f"unrecognised arguments for {verb}: {' '.join(extra)}")


def _load_module(module: str, verb: str) -> Any:
    """Import `module`; a top-level folder of the checkout (benchmarks/) is loaded from its file,
    since the console script does not put the checkout on sys.path."""
    if module in sys.modules:
        return sys.modules[module]
    path = Path(__file__).resolve().parents[2].joinpath(*module.split(".")).with_suffix(".py")
    if not module.startswith("pathoscope.") and path.is_file():
        spec = importlib.util.spec_from_file_location(module, path)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[module] = mod
        spec.loader.exec_module(mod)
        return mod
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name is not None and module.startswith(err.name):
            raise FileNotFoundError(
                f"the `{verb}` verb is not available in this installation (module {module})"
            ) from err
        raise


def _dispatch_module(module: str, verb: str) -> Callable[[list[str]], int]:
    """`main(argv) -> int` of a verb living in its own module, imported only when used."""

    def run(argv: list[str]) -> int:
        return int(_load_module(module, verb).main(argv) or 0)

    return run


_MODULE_VERBS: dict[str, tuple[str, str]] = {
    "predict": ("pathoscope.app.predict.run", "anomaly maps for new images from a checkpoint"),
    "export": ("pathoscope.app.export", "export a checkpoint"),
    "bench": ("pathoscope.app.bench.run", "speed and cost benchmarks (writes bench.json)"),
    "embeddings": ("pathoscope.app.embeddings", "embeddings of a trained run in 2-D"),
    "maps": ("pathoscope.app.maps", "maps of fixed test slices across runs"),
}


def _front_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pathoscope", add_help=False)
    sub = parser.add_subparsers(dest="verb")

    p = sub.add_parser(
        "train",
        help="fit + test seeds 0..N-1, then summary.json / summary.md",
        description="Fit then test seeds 0..N-1 into <runs>/<dataset>/<config>/k<K>/seed<i>/ "
        "(metrics.json, predictions.npz, config.yaml, last.ckpt, panels/, "
        "training_curves.png), then summary.json and summary.md (with each seed's figures) in "
        "<runs>/<dataset>/<config>/k<K>/. Further --model.* / --data.* / "
        "--trainer.* arguments override the experiment YAMLs.",
    )
    _add_train_args(p)
    p.set_defaults(handler=_cmd_train)

    p = sub.add_parser(
        "table",
        help="one Markdown table + CSV of a runs folder",
        description="Gather every <config>/k<K>/summary.json under --runs into one table "
        "shaped like the paper's Table 1 (rows: configs; columns: Image AUROC, Pixel AUROC, "
        "PRO, Dice for each K), with the paper's own rows marked as reference; writes table.md, "
        "table.csv and metrics_vs_k.png (the metrics against K beside the paper's rows) into "
        "--runs and prints the Markdown.",
    )
    p.add_argument("--runs", required=True, help="e.g. runs/brats")
    p.add_argument("--no-paper", action="store_true", help="leave out the paper's reference rows")
    p.set_defaults(handler=_cmd_table)

    p = sub.add_parser(
        "grid",
        help="local parameter grid: table + PNG plot of each metric against the parameter",
        description="Run every combination of --param values x --shots x seeds 0..N-1 (fit + "
        "test), then write grid.md, grid.csv and grid_<param>.png into --out. Further "
        "--model.* / --data.* / --trainer.* arguments override the YAMLs.",
    )
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
    p.set_defaults(handler=_cmd_grid)

    p = sub.add_parser(
        "sweep-run",
        help="one fit + test for a W&B sweep agent",
        description="Fit then test one configuration in-process and log it (W&B by default; "
        "offline unless WANDB_MODE=online). The sweep's ${args} (--model.pieg.eta=0.01 ...) are "
        "LightningCLI overrides. Writes <out>/<group>/<overrides>/seed<i>/.",
    )
    p.add_argument(
        "--config", action="append", required=True, help="experiment YAML (repeatable, in order)"
    )
    p.add_argument("--seed", type=int, default=0, help="data seed and seed_everything (default 0)")
    p.add_argument("--out", default="runs/sweeps", help="output folder (default runs/sweeps)")
    p.add_argument("--data-root", default=None, help="dataset folder (sets --data.root)")
    p.add_argument("--logger", choices=("csv", "wandb"), default="wandb")
    p.set_defaults(handler=_cmd_sweep_run)

    p = sub.add_parser(
        "make-demo-data",
        help="write a synthetic dataset in the real on-disk format",
        description="Write a synthetic BraTS2020 (NIfTI) or ChestX-ray8 (PNG + CSV) set, large "
        "enough for the dataset's default protocol (train --dataset D runs on it), and print the "
        "folder to give as --data.root.",
    )
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
    p.set_defaults(handler=_cmd_make_demo_data)

    p = sub.add_parser(
        "show-data",
        help="PNG grid of training / synthetic-lesion / test images of a config",
        description="Build the data module of the YAMLs' data sections (plus --data.* "
        "overrides, e.g. --data.root DIR) and write a grid: augmented training images, the "
        "same with synthetic lesions (outlined), test images with their gt_mask outlined.",
    )
    p.add_argument(
        "--config", action="append", required=True, help="experiment YAML (repeatable, in order)"
    )
    p.add_argument("--out", default="show_data.png", help="PNG path (default show_data.png)")
    p.set_defaults(handler=_cmd_show_data)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `pathoscope` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_HELP, end="")
        return 0 if argv else EXIT_USAGE
    verb = argv[0]
    from pathoscope.app.cpu import keep_freed_memory

    keep_freed_memory()  # speed only (pathoscope.app.cpu)
    if "WANDB_SWEEP_ID" not in os.environ:  # W&B never blocks: offline unless asked (or an agent)
        os.environ.setdefault("WANDB_MODE", "offline")
    try:
        if verb in FIT_VERBS:
            return _run_lightning(argv)
        if verb in _MODULE_VERBS:
            return _dispatch_module(_MODULE_VERBS[verb][0], verb)(argv[1:])
        parser = _front_parser()
        if verb not in parser._subparsers._group_actions[0].choices:  # type: ignore[union-attr]
            print(
                f"pathoscope: error: unknown verb {verb!r} (see pathoscope --help)", file=sys.stderr
            )
            return EXIT_USAGE
        args, extra = parser.parse_known_args(argv)
        return int(args.handler(args, extra))
    except SystemExit as exc:  # argparse / jsonargparse --help and usage errors
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_USAGE)
    except KeyboardInterrupt as exc:
        why = f": {exc}" if str(exc) else ""
        print(f"pathoscope {verb}: interrupted{why}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:
        err = _reason(err)
        if not isinstance(err, _error_types()) and not _is_argument_error(err):
            raise
        print(f"pathoscope {verb}: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_USAGE


def _reason(err: Exception) -> Exception:
    """The user error behind `err`: jsonargparse reports a class that refused its arguments as
    "Does not validate against any of the Union subtypes ...", raised from the class's own error
    (e.g. "shots must be >= 1, got 0"), which is the one to show."""
    cause = err.__cause__
    while isinstance(cause, _error_types()):
        err, cause = cause, cause.__cause__
    return err


def _is_argument_error(err: BaseException) -> bool:
    return isinstance(err, argparse.ArgumentError) or type(err).__name__ == "ArgumentError"


def _one_line(err: BaseException) -> str:
    """The message of `err` on one line (jsonargparse nests reasons over several lines)."""
    text = str(err)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return " | ".join(lines[:3]) if lines else type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
