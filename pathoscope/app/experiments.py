"""Experiments: repeated runs of one config (train), local parameter grids, W&B sweep runs.

One run = fit then test in-process through PathoScopeCLI (so YAMLs and overrides mean exactly
what they mean for `pathoscope fit`), written into a hidden `.<name>.partial` sibling folder and
renamed when complete: a folder named `seed<i>` always holds a finished run (metrics.json,
predictions.npz, config.yaml, last.ckpt, logs/, panels/, training_curves.png), and nothing
half-written is ever picked up by `pathoscope table`. The CSV log (logs/metrics.csv) is kept with
the W&B logger too: the training curves are drawn from it.

Layout: <runs>/<dataset>/<config>/k<K>/seed<i>/ for the runs, and summary.json / summary.md in
<runs>/<dataset>/<config>/k<K>/ (written by pathoscope.app.reporting). Neither `train` nor
`grid` replaces a finished run unless asked (`overwrite`). `train` keeps the seeds that the same
command finished before and runs the missing ones (so the same command finishes an interrupted
`--repeats N`); a finished seed made with other settings is refused, naming the setting, before
any run starts. `grid` refuses any finished run, naming it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pathoscope.app.configs import DEFAULT_CONFIG, config_files, dataset_root
from pathoscope.app.figures.curves import CURVES_FILE, plot_training_curves
from pathoscope.app.lightning_cli import finish_fit, lightning_cli, our_interrupts
from pathoscope.app.reporting import GridResult, summarize, write_grid_outputs, write_summary

MAX_NAME = 120  # longest folder name made from parameters


def parse_int_list(text: str, what: str) -> list[int]:
    """'2,4' -> [2, 4]; ValueError naming `what` otherwise."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{what}: expected integers separated by commas, got {text!r}") from None
    if not values:
        raise ValueError(f"{what}: expected at least one value, got {text!r}")
    return values


# ------------------------------------------------------------------------------- one run
def _csv_logger_spec(save_dir: Path) -> dict[str, Any]:
    return {
        "class_path": "lightning.pytorch.loggers.CSVLogger",
        "init_args": {"save_dir": str(save_dir), "name": "logs", "version": ""},
    }


def _logger_spec(kind: str, save_dir: Path, name: str, group: str) -> dict[str, Any]:
    if kind == "csv":
        return _csv_logger_spec(save_dir)
    if kind == "wandb":
        # Never blocks: offline unless the user asked for online (or a sweep agent runs us).
        if "WANDB_SWEEP_ID" not in os.environ:
            os.environ.setdefault("WANDB_MODE", "offline")
        return {
            "class_path": "lightning.pytorch.loggers.WandbLogger",
            "init_args": {
                "name": name,
                "group": group,
                "project": os.environ.get("WANDB_PROJECT", "pathoscope"),
                "save_dir": str(save_dir),
            },
        }
    raise ValueError(f"unknown logger {kind!r}; expected csv or wandb")


def _close_loggers(trainer: Any) -> None:
    for logger in trainer.loggers:
        if type(logger).__name__ == "WandbLogger":
            logger.experiment.finish()  # flush before the folder is renamed


def _promote(tmp: Path, final: Path) -> None:
    """Replace `final` by the finished `tmp` (the old run, if any, is removed afterwards)."""
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)


@dataclass
class _Prepared:
    """One run's parsed command line, before anything is written."""

    cli: Any  # PathoScopeCLI (run=False)
    tmp: Path  # the hidden folder the run is written into
    spec: dict[str, Any] | None  # the logger this run builds (None: the overrides give one)
    name: str  # the run's name (W&B, the training curves' title)


def _prepare(
    configs: Sequence[Path | str],
    run_dir: Path,
    seed: int,
    overrides: Sequence[str],
    logger: str,
    run_name: str | None,
    group: str | None,
) -> _Prepared:
    """Parse one run's command line: the YAMLs, `overrides`, then the run's own settings (seed,
    output folders, logger) last. `run_name` may use {dataset}, {shots} and {seed}."""
    tmp = run_dir.with_name(f".{run_dir.name}.partial")
    args: list[str] = []
    for path in configs:
        args += ["--config", str(path)]
    args += list(overrides)
    args += [
        f"--seed_everything={seed}",
        f"--data.seed={seed}",
        f"--trainer.default_root_dir={tmp}",
        f"--checkpoint.dirpath={tmp}",
        f"--metrics.output_dir={tmp}",
        "--metrics.save_predictions=true",
    ]
    custom_logger = any(a.startswith("--trainer.logger") for a in overrides)
    if not custom_logger:
        args += ["--trainer.logger=false"]
    cli = lightning_cli(args, run=False, save_config_callback=None)
    dm = cli.datamodule
    name = (run_name or "{dataset}-k{shots}-s{seed}").format(
        dataset=dm.dataset_name, shots=dm.shots, seed=seed
    )
    # Built here, not parsed: its run name needs the parsed dataset and shots.
    spec = None if custom_logger else _logger_spec(logger, tmp, name, group or name)
    return _Prepared(cli, tmp, spec, name)


def _config_yaml(run: _Prepared, run_dir: Path) -> str:
    """config.yaml of the run: the resolved configuration, with the paths after the rename."""
    config = yaml.safe_load(run.cli.parser.dump(run.cli.config, skip_none=False))
    if run.spec is not None:
        config["trainer"]["logger"] = run.spec
    return yaml.safe_dump(config, sort_keys=False).replace(str(run.tmp), str(run_dir))


def run_one(
    configs: Sequence[Path | str],
    run_dir: Path,
    seed: int,
    overrides: Sequence[str] = (),
    logger: str = "csv",
    run_name: str | None = None,
    group: str | None = None,
) -> dict[str, Any]:
    """Fit then test one seed in-process; returns metrics.json's content.

    `overrides` are LightningCLI arguments applied after the YAMLs; the run's own settings (seed,
    output folders, logger) come last. `run_name` may use {dataset}, {shots} and {seed}.
    Bad data is found (datamodule.setup) before anything is written.
    """
    run_dir = Path(run_dir)
    run = _prepare(configs, run_dir, seed, overrides, logger, run_name, group)
    dm, model, trainer, tmp = run.cli.datamodule, run.cli.model, run.cli.trainer, run.tmp
    dm.setup("fit")  # bad data stops here, before anything is written
    if tmp.exists():
        shutil.rmtree(tmp)  # left by an interrupted earlier run
    tmp.mkdir(parents=True)
    try:
        if run.spec is not None:
            from lightning.pytorch.cli import instantiate_class

            loggers = [instantiate_class((), run.spec)]
            if logger != "csv":  # the training curves read the CSV log
                loggers.append(instantiate_class((), _csv_logger_spec(tmp)))
            trainer.loggers = loggers
        with warnings.catch_warnings(), our_interrupts():
            # The run folder holds the logs too: not a stale checkpoint folder.
            warnings.filterwarnings("ignore", message="Checkpoint directory .* is not empty")
            trainer.fit(model, datamodule=dm)
            finish_fit(trainer, model, dm, run.cli.final_validation)
            trainer.test(model, datamodule=dm, verbose=False)
        if not trainer.is_global_zero:
            return {}
        (tmp / "config.yaml").write_text(_config_yaml(run, run_dir))
        metrics_path = tmp / "metrics.json"
        if not metrics_path.is_file():
            raise FileNotFoundError(f"{metrics_path}: the test wrote no metrics")
        metrics = json.loads(metrics_path.read_text())
        if not (tmp / "last.ckpt").is_file():
            trainer.save_checkpoint(tmp / "last.ckpt")
        _close_loggers(trainer)
        log = tmp / "logs" / "metrics.csv"
        if log.is_file():
            plot_training_curves(log, tmp / CURVES_FILE, title=f"{run.name} (global step)")
        _promote(tmp, run_dir)
        return metrics
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_finished(
    configs: Sequence[Path | str],
    run_dir: Path,
    seed: int,
    overrides: Sequence[str] = (),
    logger: str = "csv",
    run_name: str | None = None,
    group: str | None = None,
) -> dict[str, Any]:
    """metrics.json of the finished run in `run_dir` when this command (run_one's arguments)
    would make it again; ValueError naming the first setting that differs otherwise."""
    run_dir = Path(run_dir)
    saved_path, metrics_path = run_dir / "config.yaml", run_dir / "metrics.json"
    if not saved_path.is_file() or not metrics_path.is_file():
        raise ValueError(
            f"{run_dir}: a finished run without config.yaml or metrics.json, which this command "
            "cannot check or report: pass --overwrite to replace it, or give another --runs folder"
        )
    wanted = yaml.safe_load(
        _config_yaml(_prepare(configs, run_dir, seed, overrides, logger, run_name, group), run_dir)
    )
    key = first_difference(yaml.safe_load(saved_path.read_text()), wanted)
    if key is not None:
        raise ValueError(
            f"{run_dir}: a finished run with other settings ({key} differs from this command's): "
            "pass --overwrite to replace the finished runs, or give another --runs folder"
        )
    return json.loads(metrics_path.read_text())


def first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    """The dotted key of the first value that differs between two nested dicts (None if equal)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in [*a, *(k for k in b if k not in a)]:
            where = f"{prefix}.{key}" if prefix else str(key)
            if key not in a or key not in b:
                return where
            found = first_difference(a[key], b[key], where)
            if found is not None:
                return found
        return None
    return None if a == b else (prefix or "the configuration")


# ------------------------------------------------------------------------------- train
def train(
    dataset: str,
    shots: int,
    repeats: int = 1,
    config_name: str = DEFAULT_CONFIG,
    data_root: str | None = None,
    logger: str = "csv",
    runs_root: str | Path = "runs",
    max_steps: int | None = None,
    overrides: Sequence[str] = (),
    overwrite: bool = False,
) -> Path:
    """Fit + test seeds 0..repeats-1; write summary.json / summary.md; returns the k<K> folder.

    What an earlier run of the same command finished is kept as it is (its metrics.json read
    back, nothing rewritten); the missing seeds run, and one an interruption left partial starts
    again. A finished seed made with other settings is refused (ValueError naming the setting,
    before any run); `overwrite` redoes every seed.
    """
    if shots < 1:
        raise ValueError(f"--shots must be >= 1, got {shots}")
    if repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {repeats}")
    if max_steps is not None and max_steps < 0:
        raise ValueError(f"--max-steps must be >= 0, got {max_steps}")
    _check_overrides(overrides)
    config_name = config_name.removesuffix(".yaml")
    files = config_files(dataset, config_name)
    base = Path(runs_root) / dataset / config_name / f"k{shots}"
    root = dataset_root(dataset, data_root)
    args = [*overrides, f"--data.root={root}", f"--data.shots={shots}"]
    if max_steps is not None:
        args.append(f"--trainer.max_steps={max_steps}")
    naming = {
        "logger": logger,
        "run_name": f"{dataset}-{config_name.replace('/', '-')}-k{{shots}}-s{{seed}}",
        "group": config_name,
    }
    finished = [s for s in range(repeats) if not overwrite and (base / f"seed{s}").is_dir()]
    kept = {s: check_finished(files, base / f"seed{s}", s, args, **naming) for s in finished}
    per_seed = []
    for seed in range(repeats):
        title = f"== {dataset} / {config_name} / K={shots} / seed {seed}"
        if seed in kept:
            print(f"{title}: finished before, kept ==", flush=True)
            per_seed.append(kept[seed])
            continue
        print(f"{title} ==", flush=True)
        try:
            per_seed.append(run_one(files, base / f"seed{seed}", seed, args, **naming))
        except KeyboardInterrupt:
            raise KeyboardInterrupt(
                f"seed {seed} was not finished and is removed; the same command keeps the "
                "finished seeds and runs the others"
            ) from None
    if per_seed and per_seed[0]:  # rank 0 (DDP ranks > 0 get {})
        write_summary(base, summarize(dataset, config_name, shots, per_seed))
    return base


OVERRIDE_PREFIXES = (
    "--model",
    "--data",
    "--trainer",
    "--metrics",
    "--checkpoint",
    "--seed_everything",
)


def _check_overrides(overrides: Sequence[str]) -> None:
    """Every option is a LightningCLI key; `--key=value` and `--key value` are both accepted (a
    value may start with "-": `--model.pieg.eta -1` is refused by the range check, not here)."""
    value_next = False
    for arg in overrides:
        if value_next and not arg.startswith("--"):
            value_next = False
            continue
        if arg.startswith("-"):
            if not arg.startswith(OVERRIDE_PREFIXES):
                raise ValueError(
                    f"unrecognised argument {arg}: only --model.*, --data.*, --trainer.*, "
                    "--metrics.*, --checkpoint.* overrides pass through"
                )
            value_next = "=" not in arg
        else:
            raise ValueError(f"unrecognised argument {arg}: a value needs its --key before it")


def _refuse_finished(folders: Iterable[Path], overwrite: bool) -> None:
    """ValueError naming the first finished run among `folders`, unless `overwrite`."""
    finished = [f for f in folders if f.is_dir()]
    if finished and not overwrite:
        raise ValueError(
            f"{finished[0]}: a finished run is there ({len(finished)} of the runs to do); pass "
            "--overwrite to replace them, or give another --runs / --out folder"
        )


def _checked_args(
    configs: Sequence[str], overrides: Sequence[str], data_root: str | None
) -> list[str]:
    """The overrides plus --data.root, after checking them, the config files and the data root."""
    _check_overrides(overrides)
    for c in configs:
        if not Path(c).is_file():
            raise FileNotFoundError(f"{c}: config file not found")
    args = list(overrides)
    if data_root is not None:
        root = Path(data_root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: data root not found (a folder is expected)")
        args.append(f"--data.root={root}")
    return args


# ------------------------------------------------------------------------------- grid
def parse_param(text: str) -> tuple[str, list[str]]:
    """'model.pieg.eta=0.01,0.05' -> ('model.pieg.eta', ['0.01', '0.05'])."""
    key, sep, values = text.partition("=")
    key = key.strip().removeprefix("--")
    vals = [v.strip() for v in values.split(",") if v.strip()]
    if not sep or not key or "." not in key or not vals:
        raise ValueError(
            f"--param: expected KEY=V1,V2,... with a dotted key (model.pieg.eta=0.01,0.05), got {text!r}"
        )
    return key, vals


def _combo_name(combo: Iterable[tuple[str, str]]) -> str:
    return ",".join(f"{k}={v}" for k, v in combo).replace("/", "_")


def grid(
    configs: Sequence[str],
    params: Sequence[str],
    shots: Sequence[int],
    repeats: int = 1,
    out: Path = Path("runs/grid"),
    data_root: str | None = None,
    logger: str = "csv",
    max_steps: int | None = None,
    overrides: Sequence[str] = (),
    overwrite: bool = False,
) -> list[Path]:
    """Every combination of the --param values x shots x seeds; grid.md/.csv and plots in `out`.
    Finished runs are never replaced unless `overwrite` (ValueError before any run). Returns the
    folders of the combinations' summaries."""
    parsed = [parse_param(p) for p in params]
    if any(k < 1 for k in shots):
        raise ValueError(f"--shots must be >= 1, got {list(shots)}")
    if repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {repeats}")
    args = _checked_args(configs, overrides, data_root)
    if max_steps is not None:
        args.append(f"--trainer.max_steps={max_steps}")
    out = Path(out)
    combos = [
        tuple((key, v) for (key, _), v in zip(parsed, values, strict=True))
        for values in itertools.product(*(vals for _, vals in parsed))
    ]
    _refuse_finished(
        (
            out / _combo_name(combo) / f"k{k}" / f"seed{seed}"
            for combo in combos
            for k in shots
            for seed in range(repeats)
        ),
        overwrite,
    )
    group = "grid-" + "+".join(Path(c).stem for c in configs)
    results: list[GridResult] = []
    for combo in combos:
        for k in shots:
            per_seed = []
            folder = out / _combo_name(combo) / f"k{k}"
            for seed in range(repeats):
                print(f"== grid {_combo_name(combo)} / K={k} / seed {seed} ==", flush=True)
                per_seed.append(
                    run_one(
                        configs,
                        folder / f"seed{seed}",
                        seed,
                        [*args, *(f"--{key}={v}" for key, v in combo), f"--data.shots={k}"],
                        logger=logger,
                        run_name=f"{{dataset}}-{_combo_name(combo)}-k{{shots}}-s{{seed}}",
                        group=group,
                    )
                )
            summary = summarize("grid", _combo_name(combo), k, per_seed)
            summary["params"] = dict(combo)
            write_summary(folder, summary)
            results.append((combo, k, summary))
    write_grid_outputs(out, [key for key, _ in parsed], results)
    return [out / _combo_name(combo) / f"k{k}" for combo, k, _ in results]


# ------------------------------------------------------------------------------- sweeps
def sweep_run(
    configs: Sequence[str],
    seed: int = 0,
    out: Path = Path("runs/sweeps"),
    data_root: str | None = None,
    logger: str = "wandb",
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """One fit + test of a sweep configuration (the sweep's ${args} are `overrides`)."""
    args = _checked_args(configs, overrides, data_root)
    group = "+".join(Path(c).stem for c in configs)
    params = [
        a.removeprefix("--") for a in overrides if "=" in a and not a.startswith("--data.root")
    ]
    name = ",".join(sorted(params)).replace("/", "_") or "defaults"
    if len(name) > MAX_NAME:  # file names have a length limit: a readable prefix + a hash
        digest = hashlib.sha1(name.encode()).hexdigest()[:12]
        name = f"{name[: MAX_NAME - 13]}-{digest}"
    return run_one(
        configs,
        Path(out) / group / name / f"seed{seed}",
        seed,
        args,
        logger=logger,
        run_name=f"{{dataset}}-{group}-k{{shots}}-s{{seed}}",
        group=group,
    )
