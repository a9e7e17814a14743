"""Experiment orchestration: repeated runs, summaries, the paper-style table, local grids, sweeps.

One run = fit then test in-process through PathoScopeCLI (so YAMLs and overrides mean exactly
what they mean for `pathoscope fit`), written into a hidden `.<name>.partial` sibling folder and
renamed when complete: a folder named `seed<i>` always holds a finished run (metrics.json,
predictions.npz, config.yaml, last.ckpt, logs/), and nothing half-written is ever picked up by
`pathoscope table`.

Layout: <runs>/<dataset>/<config>/k<K>/seed<i>/ for the runs, and summary.json / summary.md in
<runs>/<dataset>/<config>/k<K>/.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import math
import os
import shutil
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import yaml
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from pathoscope.paper_tables import paper_rows

DATASETS: dict[str, tuple[str, ...]] = {
    "demo": ("brats.yaml", "demo.yaml"),  # synthetic BraTS: demo.yaml holds the deltas
    "brats": ("brats.yaml",),
    "chestxray8": ("chestxray8.yaml",),
}
DEFAULT_CONFIG = "pathoscope"  # the method itself: the dataset config alone
DEMO_ROOT = Path("data/demo/brats")
LAST_CHECKPOINT = "last"  # the only checkpoint a run keeps: <checkpoint.dirpath>/last.ckpt
# The four metrics of the paper's Table 1, in its order, with their column titles.
TABLE_METRICS: dict[str, str] = {
    "image_auroc": "Image AUROC",
    "pixel_auroc": "Pixel AUROC",
    "pro": "PRO",
    "dice_best": "Dice",
}
# Further metrics reported in summary.md (see callbacks/metrics.py and DESIGN.md).
EXTRA_METRICS: dict[str, str] = {
    "pixel_auroc_fg": "Pixel AUROC (fg)",
    "pro_fg": "PRO (fg)",
    "sensitivity": "Sensitivity@tau",
    "specificity": "Specificity@tau",
    "dice_at_tau": "Dice@tau",
    "iou_at_tau": "IoU@tau",
}
SUMMARY_METRICS = (*TABLE_METRICS, *EXTRA_METRICS, "tau")
MAX_NAME = 120  # longest folder name made from parameters


# ------------------------------------------------------------------------------- configs
def experiments_dir() -> Path:
    """The experiments/ folder of this checkout (PATHOSCOPE_EXPERIMENTS overrides it)."""
    env = os.environ.get("PATHOSCOPE_EXPERIMENTS")
    folder = Path(env) if env else Path(__file__).resolve().parent.parent / "experiments"
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder}: experiments folder not found (set PATHOSCOPE_EXPERIMENTS to it)"
        )
    return folder


def config_names() -> list[str]:
    """The names `--config-name` accepts: pathoscope plus every ablation / baseline YAML."""
    folder = experiments_dir()
    dataset_files = {f for files in DATASETS.values() for f in files}
    names = [
        p.relative_to(folder).with_suffix("").as_posix()
        for p in sorted(folder.rglob("*.yaml"))
        if p.name not in dataset_files and "sweeps" not in p.relative_to(folder).parts
    ]
    return [DEFAULT_CONFIG, *names]


def config_files(dataset: str, config_name: str = DEFAULT_CONFIG) -> list[Path]:
    """The YAMLs of a dataset and config, in the order they are applied."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    folder = experiments_dir()
    files = [folder / name for name in DATASETS[dataset]]
    if config_name != DEFAULT_CONFIG:
        known = config_names()
        if config_name.removesuffix(".yaml") not in known:
            raise ValueError(f"unknown config {config_name!r}; expected one of {', '.join(known)}")
        files.append(folder / f"{config_name.removesuffix('.yaml')}.yaml")
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f}: experiment file not found")
    return files


def parse_int_list(text: str, what: str) -> list[int]:
    """'2,4' -> [2, 4]; ValueError naming `what` otherwise."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{what}: expected integers separated by commas, got {text!r}") from None
    if not values:
        raise ValueError(f"{what}: expected at least one value, got {text!r}")
    return values


# ------------------------------------------------------------------------------- callbacks
class FinalValidation(Callback):
    """Remembers the global step of the last validation (see finish_fit)."""

    def __init__(self) -> None:
        self.validated_at: int | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.validated_at = trainer.global_step


class TrainSamplerEpoch(Callback):
    """Gives the training sampler the epoch actually trained.

    The training data are seeded by (epoch * length + i) through `TrainSampler.set_epoch`.
    Lightning 2.6 passes its `processed` epoch counter, which is one ahead after resuming from a
    checkpoint written at an epoch end, and under DDP it calls set_epoch only on its
    DistributedSamplerWrapper, not on the TrainSampler inside. Either would make a resumed or
    distributed run see other training data than an uninterrupted single-process run.
    """

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from data_modules.common import TrainSampler

        sampler = getattr(trainer.train_dataloader, "sampler", None)
        inner = getattr(getattr(sampler, "dataset", None), "_sampler", None)  # DDP wrapper
        for candidate in (sampler, inner):
            if isinstance(candidate, TrainSampler):
                candidate.set_epoch(trainer.current_epoch)


def finish_fit(
    trainer: L.Trainer, model: L.LightningModule, datamodule: Any, tracker: FinalValidation
) -> None:
    """Validate the final model if no validation ran after the last step, and rewrite last.ckpt,
    so that tau (set on validation) always belongs to the final model."""
    if tracker.validated_at == trainer.global_step or trainer.interrupted:
        return
    trainer.validate(model, datamodule=datamodule, verbose=False)
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.dirpath and cb.filename == LAST_CHECKPOINT:
            path = Path(cb.dirpath) / f"{LAST_CHECKPOINT}{cb.FILE_EXTENSION}"
            trainer.save_checkpoint(path)
            cb.best_model_path = cb.last_model_path = str(path)


# ------------------------------------------------------------------------------- one run
def _logger_spec(kind: str, save_dir: Path, name: str, group: str) -> dict[str, Any]:
    if kind == "csv":
        return {
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": str(save_dir), "name": "logs", "version": ""},
        }
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
    from pathoscope.cli import lightning_cli

    run_dir = Path(run_dir)
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
    dm, model, trainer = cli.datamodule, cli.model, cli.trainer
    dm.setup("fit")  # bad data stops here, before anything is written
    name = (run_name or "{dataset}-k{shots}-s{seed}").format(
        dataset=dm.dataset_name, shots=dm.shots, seed=seed
    )
    if tmp.exists():
        shutil.rmtree(tmp)  # left by an interrupted earlier run
    tmp.mkdir(parents=True)
    spec: dict[str, Any] | None = None
    try:
        if not custom_logger:
            from lightning.pytorch.cli import instantiate_class

            # Built here, not parsed: its run name needs the parsed dataset and shots.
            spec = _logger_spec(logger, tmp, name, group or name)
            trainer.logger = instantiate_class((), spec)
        with warnings.catch_warnings():
            # The run folder holds the logs too: not a stale checkpoint folder.
            warnings.filterwarnings("ignore", message="Checkpoint directory .* is not empty")
            trainer.fit(model, datamodule=dm)
        finish_fit(trainer, model, dm, cli.final_validation)
        trainer.test(model, datamodule=dm, verbose=False)
        if not trainer.is_global_zero:
            return {}
        # The resolved config, with the paths as they are after the rename.
        config = yaml.safe_load(cli.parser.dump(cli.config, skip_none=False))
        if spec is not None:
            config["trainer"]["logger"] = spec
        dumped = yaml.safe_dump(config, sort_keys=False)
        (tmp / "config.yaml").write_text(dumped.replace(str(tmp), str(run_dir)))
        metrics_path = tmp / "metrics.json"
        if not metrics_path.is_file():
            raise FileNotFoundError(f"{metrics_path}: the test wrote no metrics")
        metrics = json.loads(metrics_path.read_text())
        if not (tmp / "last.ckpt").is_file():
            trainer.save_checkpoint(tmp / "last.ckpt")
        _close_loggers(trainer)
        _promote(tmp, run_dir)
        return metrics
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ------------------------------------------------------------------------------- summaries
def _mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample std (ddof 1; None for one value, where it is undefined) of the defined values."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None, None
    mean = sum(vals) / len(vals)
    if len(vals) == 1:
        return mean, None
    var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
    return mean, math.sqrt(var)


def summarize(
    dataset: str, config: str, shots: int, per_seed: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """summary.json's content from the seeds' metrics.json (in seed order)."""
    metrics: dict[str, dict[str, Any]] = {}
    for key in SUMMARY_METRICS:
        values = [m.get(key) for m in per_seed]
        mean, std = _mean_std(values)
        metrics[key] = {"mean": mean, "std": std, "values": values}
    weights = sorted({str(m.get("weights")) for m in per_seed})
    return {
        "dataset": dataset,
        "config": config,
        "shots": shots,
        "repeats": len(per_seed),
        "metrics": metrics,
        "checkpoint": "last",
        "weights": weights[0] if len(weights) == 1 else weights,
        "eval_size": per_seed[0].get("eval_size") if per_seed else None,
    }


def _pct(stat: dict[str, Any] | None) -> str:
    if not stat or stat.get("mean") is None:
        return "-"
    std = stat.get("std")
    if std is None:  # one seed: no spread to report
        return f"{100 * stat['mean']:.2f}"
    return f"{100 * stat['mean']:.2f} ± {100 * std:.2f}"


def _weights_note(weights: Any) -> str:
    if weights == "random":
        return (
            "random (pretrained=False: no ImageNet weights were available; results are far "
            "below what pretrained weights give)"
        )
    return str(weights)


def summary_markdown(summary: dict[str, Any]) -> str:
    """summary.md: the paper's table layout in percent, mean ± std over the seeds."""
    n = summary["repeats"]
    m = summary["metrics"]
    lines = [
        f"## {summary['dataset']} / {summary['config']} / K={summary['shots']}",
        "",
        "| Method | K | " + " | ".join(f"{t} (%)" for t in TABLE_METRICS.values()) + " |",
        "|---|---|" + "---|" * len(TABLE_METRICS),
        f"| {summary['config']} | {summary['shots']} | "
        + " | ".join(_pct(m.get(k)) for k in TABLE_METRICS)
        + " |",
        "",
        "| " + " | ".join(f"{t} (%)" for t in EXTRA_METRICS.values()) + " |",
        "|" + "---|" * len(EXTRA_METRICS),
        "| " + " | ".join(_pct(m.get(k)) for k in EXTRA_METRICS) + " |",
        "",
        (
            f"Mean ± std (sample std, ddof 1) over {n} seeds (0..{n - 1}); the same test set for "
            "every seed, only the K training shots change."
            if n != 1
            else "One seed (0): no spread to report; use REPEATS=N for mean ± std over N seeds."
        ),
        f"Checkpoint reported: {summary['checkpoint']} (the final model; nothing is selected on "
        "test labels).",
        f"Backbone weights: {_weights_note(summary['weights'])}.",
        "Dice is the best Dice over thresholds on the pooled test set (an oracle, as in the "
        f"literature); @tau values use the threshold set on validation normals. Evaluation "
        f"size: {summary.get('eval_size')} px.",
        "",
    ]
    return "\n".join(lines)


def write_summary(folder: Path, summary: dict[str, Any]) -> None:
    (folder / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    (folder / "summary.md").write_text(summary_markdown(summary))


def format_metrics(metrics: dict[str, Any]) -> str:
    """One line of the main metrics in percent."""
    parts = [
        f"{title} {100 * metrics[key]:.2f}" if metrics.get(key) is not None else f"{title} -"
        for key, title in TABLE_METRICS.items()
    ]
    return ", ".join(parts)


# ------------------------------------------------------------------------------- train
def _check_data_root(dataset: str, data_root: str | None) -> Path:
    if data_root is None:
        if dataset == "demo":
            return DEMO_ROOT
        raise ValueError(
            f"--data-root is required for dataset {dataset} (DATA_ROOT=... with make train)"
        )
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: data root not found (a folder is expected)")
    return root


def dataset_root(dataset: str, data_root: str | None) -> Path:
    """The checked data root of a dataset; the demo's synthetic set is written if missing."""
    root = _check_data_root(dataset, data_root)
    return ensure_demo_data(root) if dataset == "demo" else root


def ensure_demo_data(root: Path) -> Path:
    """Write the synthetic BraTS demo set into `root` if it is not there (atomic rename)."""
    if root.is_dir() and any(root.iterdir()):
        return root
    from data_modules.synthetic import make_demo_data

    tmp = root.with_name(f".{root.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"writing the synthetic BraTS demo set into {root} ...", flush=True)
    try:
        make_demo_data("brats", tmp)
        if root.exists():
            root.rmdir()  # empty
        tmp.rename(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


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
) -> Path:
    """Fit + test seeds 0..repeats-1; write summary.json / summary.md; returns the k<K> folder."""
    if shots < 1:
        raise ValueError(f"--shots must be >= 1, got {shots}")
    if repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {repeats}")
    if max_steps is not None and max_steps < 0:
        raise ValueError(f"--max-steps must be >= 0, got {max_steps}")
    _check_overrides(overrides)
    config_name = config_name.removesuffix(".yaml")
    files = config_files(dataset, config_name)
    root = dataset_root(dataset, data_root)
    base = Path(runs_root) / dataset / config_name / f"k{shots}"
    args = [*overrides, f"--data.root={root}", f"--data.shots={shots}"]
    if max_steps is not None:
        args.append(f"--trainer.max_steps={max_steps}")
    per_seed = []
    for seed in range(repeats):
        print(f"== {dataset} / {config_name} / K={shots} / seed {seed} ==", flush=True)
        metrics = run_one(
            files,
            base / f"seed{seed}",
            seed,
            args,
            logger=logger,
            run_name=f"{dataset}-{config_name.replace('/', '-')}-k{{shots}}-s{{seed}}",
            group=config_name,
        )
        per_seed.append(metrics)
    if per_seed and per_seed[0]:  # rank 0 (DDP ranks > 0 get {})
        write_summary(base, summarize(dataset, config_name, shots, per_seed))
    return base


def _check_overrides(overrides: Sequence[str]) -> None:
    for arg in overrides:
        if arg.startswith("-") and not arg.startswith(
            ("--model", "--data", "--trainer", "--metrics", "--checkpoint", "--seed_everything")
        ):
            raise ValueError(
                f"unrecognised argument {arg}: only --model.*, --data.*, --trainer.*, "
                "--metrics.*, --checkpoint.* overrides pass through"
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


# ------------------------------------------------------------------------------- table
def load_summaries(runs_dir: Path) -> list[dict[str, Any]]:
    """Every summary.json under `runs_dir` (partial and old folders are hidden: never read)."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise FileNotFoundError(f"{runs_dir}: runs folder not found")
    out = []
    for path in sorted(runs_dir.rglob("summary.json")):
        if any(part.startswith(".") for part in path.relative_to(runs_dir).parts):
            continue
        try:
            summary = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        if not {"config", "shots", "metrics"} <= summary.keys():
            raise ValueError(f"{path}: not a pathoscope summary (config, shots, metrics expected)")
        out.append(summary)
    return out


def _config_order(name: str) -> tuple[int, str]:
    if name == DEFAULT_CONFIG:
        return (0, name)
    return (1 if name.startswith("ablation/") else 2, name)


def build_table(
    summaries: Sequence[dict[str, Any]], paper: bool = True
) -> tuple[str, list[dict[str, Any]]]:
    """(Markdown, CSV rows) of the paper's Table 1 shape: rows configs, columns metric x K."""
    if not summaries:
        raise ValueError("no summary.json found: run `pathoscope train` first")
    datasets = sorted({str(s.get("dataset")) for s in summaries})
    ks = sorted({int(s["shots"]) for s in summaries})
    by_config: dict[str, dict[int, dict[str, Any]]] = {}
    for s in summaries:
        by_config.setdefault(str(s["config"]), {})[int(s["shots"])] = s
    columns = [(metric, k) for metric in TABLE_METRICS for k in ks]

    header = ["Method", "Source", "Repeats"] + [f"{TABLE_METRICS[m]} K={k}" for m, k in columns]
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows: list[dict[str, Any]] = []
    for config in sorted(by_config, key=_config_order):
        per_k = by_config[config]
        repeats = sorted({int(s.get("repeats", 0)) for s in per_k.values()})
        cells = [_pct(per_k[k]["metrics"].get(m)) if k in per_k else "-" for m, k in columns]
        md.append(
            f"| {config} | ours | {'/'.join(map(str, repeats))} | " + " | ".join(cells) + " |"
        )
        row: dict[str, Any] = {"method": config, "source": "ours", "repeats": repeats[-1]}
        for m, k in columns:
            stat = per_k[k]["metrics"].get(m) if k in per_k else None
            mean = stat.get("mean") if stat else None
            std = stat.get("std") if stat else None
            row[f"{m}_k{k}_mean_pct"] = None if mean is None else 100 * mean
            row[f"{m}_k{k}_std_pct"] = None if std is None else 100 * std
        rows.append(row)
    notes = [
        "",
        "Ours: mean ± std over the seeds, last checkpoint, in percent. Dice = best threshold "
        "on the pooled test set (oracle, as in the literature).",
    ]
    weights = sorted({str(s.get("weights")) for s in summaries})
    notes.append(f"Backbone weights: {', '.join(_weights_note(w) for w in weights)}.")
    if paper:
        refs = [r for d in datasets for r in paper_rows(d)]
        for ref in refs:
            cells = []
            row = {"method": ref.label, "source": f"paper {ref.source}", "repeats": 10}
            for m, k in columns:
                value = ref.metrics.get(m, {}).get(k)
                cells.append("-" if value is None else f"{value:.2f}")
                row[f"{m}_k{k}_mean_pct"] = value
                row[f"{m}_k{k}_std_pct"] = None
            md.append(
                f"| {ref.label} | reference: paper {ref.source} | 10 | " + " | ".join(cells) + " |"
            )
            rows.append(row)
        if refs:
            notes.append(
                "Reference rows are the paper's own numbers (10 repeats, real data), not "
                "reproduced here."
            )
        else:
            notes.append(
                f"No paper reference rows for dataset(s) {', '.join(datasets)} (the paper reports "
                "BraTS2020 and ChestXray8 only)."
            )
    title = f"## {', '.join(datasets)}: K = {', '.join(map(str, ks))}"
    return "\n".join([title, "", *md, *notes, ""]), rows


def _write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in fields})
    path.write_text(buf.getvalue())


def write_table(runs_dir: Path, paper: bool = True) -> str:
    """Write table.md and table.csv into `runs_dir`; returns the Markdown."""
    markdown, rows = build_table(load_summaries(runs_dir), paper=paper)
    (Path(runs_dir) / "table.md").write_text(markdown)
    _write_csv(Path(runs_dir) / "table.csv", rows)
    return markdown


# ------------------------------------------------------------------------------- grid
def parse_param(text: str) -> tuple[str, list[str]]:
    """'model.eta=0.01,0.05' -> ('model.eta', ['0.01', '0.05'])."""
    key, sep, values = text.partition("=")
    key = key.strip().removeprefix("--")
    vals = [v.strip() for v in values.split(",") if v.strip()]
    if not sep or not key or "." not in key or not vals:
        raise ValueError(
            f"--param: expected KEY=V1,V2,... with a dotted key (model.eta=0.01,0.05), got {text!r}"
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
) -> Path:
    """Every combination of the --param values x shots x seeds; grid.md/.csv and plots in `out`."""
    parsed = [parse_param(p) for p in params]
    if any(k < 1 for k in shots):
        raise ValueError(f"--shots must be >= 1, got {list(shots)}")
    if repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {repeats}")
    args = _checked_args(configs, overrides, data_root)
    if max_steps is not None:
        args.append(f"--trainer.max_steps={max_steps}")
    out = Path(out)
    group = "grid-" + "+".join(Path(c).stem for c in configs)
    results: list[tuple[tuple[tuple[str, str], ...], int, dict[str, Any]]] = []
    for values in itertools.product(*(vals for _, vals in parsed)):
        combo = tuple((key, v) for (key, _), v in zip(parsed, values, strict=True))
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
    _write_grid_outputs(out, [key for key, _ in parsed], results)
    return out


def _as_number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _write_grid_outputs(
    out: Path,
    keys: Sequence[str],
    results: Sequence[tuple[tuple[tuple[str, str], ...], int, dict[str, Any]]],
) -> None:
    ks = sorted({k for _, k, _ in results})
    combos = list(dict.fromkeys(combo for combo, _, _ in results))
    by = {(combo, k): s for combo, k, s in results}
    header = [*keys] + [f"{TABLE_METRICS[m]} K={k}" for m in TABLE_METRICS for k in ks]
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows = []
    for combo in combos:
        cells = [v for _, v in combo]
        row: dict[str, Any] = dict(combo)
        for m in TABLE_METRICS:
            for k in ks:
                stat = by[(combo, k)]["metrics"].get(m) if (combo, k) in by else None
                cells.append(_pct(stat))
                mean = stat.get("mean") if stat else None
                std = stat.get("std") if stat else None
                row[f"{m}_k{k}_mean_pct"] = None if mean is None else 100 * mean
                row[f"{m}_k{k}_std_pct"] = None if std is None else 100 * std
        md.append("| " + " | ".join(cells) + " |")
        rows.append(row)
    out.mkdir(parents=True, exist_ok=True)
    (out / "grid.md").write_text(
        "\n".join(md) + "\n\nMean ± std over the seeds in percent, last checkpoint.\n"
    )
    _write_csv(out / "grid.csv", rows)
    _plot_grid(out / f"grid_{keys[0].replace('/', '_')}.png", keys, combos, ks, by)


def _plot_grid(
    path: Path,
    keys: Sequence[str],
    combos: Sequence[tuple[tuple[str, str], ...]],
    ks: Sequence[int],
    by: dict[tuple[tuple[tuple[str, str], ...], int], dict[str, Any]],
) -> None:
    """One panel per metric against the first parameter; one line per K (and other params)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_values = list(dict.fromkeys(combo[0][1] for combo in combos))
    numeric = all(_as_number(v) is not None for v in x_values)
    xs = {v: (_as_number(v) if numeric else i) for i, v in enumerate(x_values)}
    fig, axes = plt.subplots(1, len(TABLE_METRICS), figsize=(4 * len(TABLE_METRICS), 3.5))
    for ax, (metric, title) in zip(axes, TABLE_METRICS.items(), strict=True):
        rest_combos = list(dict.fromkeys(combo[1:] for combo in combos))
        for rest in rest_combos:
            for k in ks:
                pts = []
                for v in x_values:
                    s = by.get((((keys[0], v), *rest), k))
                    stat = s["metrics"].get(metric) if s else None
                    if stat and stat.get("mean") is not None:
                        pts.append((xs[v], 100 * stat["mean"], 100 * (stat.get("std") or 0.0)))
                if not pts:
                    continue
                label = f"K={k}" + "".join(f", {kk}={vv}" for kk, vv in rest)
                px, py, pe = zip(*sorted(pts), strict=True)
                ax.errorbar(px, py, yerr=pe, marker="o", capsize=3, label=label)
        ax.set_title(f"{title} (%)")
        ax.set_xlabel(keys[0])
        if numeric and len(x_values) > 1 and min(xs.values()) > 0:
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(list(xs.values()), x_values)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


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
