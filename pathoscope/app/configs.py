"""Where the experiment YAMLs are and which of them make up a `--dataset` / `--config-name`.

experiments/defaults.yaml holds the model, trainer and metrics defaults and is read first by every
LightningCLI run; experiments/datasets.yaml lists the `--dataset` choices (their files, their
default data root, the synthetic set written when that root is missing); every other YAML outside
sweeps/ is a `--config-name` applied on top (ablations, baselines). docs/configs.md has the layout.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULTS_FILE = "defaults.yaml"
DATASETS_FILE = "datasets.yaml"
DEFAULT_CONFIG = "pathoscope"  # the method itself: the dataset's files alone


@dataclass(frozen=True)
class DatasetChoice:
    """One entry of datasets.yaml."""

    name: str
    configs: tuple[str, ...]  # experiment files, relative to experiments/, in order
    data_root: str | None = None  # used when no --data-root is given
    demo_data: dict[str, Any] = field(default_factory=dict)  # make_demo_data's arguments
    compare_with: tuple[str, ...] = ()  # configs `train` also runs and tables beside the method


def read_yaml(path: str | Path) -> Any:
    """The content of a YAML file; ValueError naming the file and the line when it is not YAML."""
    try:
        return yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise ValueError(f"{path}: not valid YAML{where}: {problem}") from None


def experiments_dir() -> Path:
    """The experiments/ folder of this checkout (PATHOSCOPE_EXPERIMENTS overrides it)."""
    env = os.environ.get("PATHOSCOPE_EXPERIMENTS")
    folder = Path(env) if env else Path(__file__).resolve().parents[2] / "experiments"
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder}: experiments folder not found (set PATHOSCOPE_EXPERIMENTS to it)"
        )
    return folder


def defaults_file() -> Path:
    """experiments/defaults.yaml, the first config of every run."""
    path = experiments_dir() / DEFAULTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the shared defaults file is missing")
    return path


def dataset_choices() -> dict[str, DatasetChoice]:
    """The `--dataset` choices of datasets.yaml, in its order."""
    path = experiments_dir() / DATASETS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the list of dataset choices is missing")
    entries = read_yaml(path) or {}
    choices = {}
    for name, entry in entries.items():
        if not isinstance(entry, Mapping) or not entry.get("configs"):
            raise ValueError(f"{path}: dataset {name!r} needs a non-empty `configs` list")
        unknown = set(entry) - {"configs", "data_root", "demo_data", "compare_with"}
        if unknown:
            raise ValueError(f"{path}: dataset {name!r} has unknown keys {sorted(unknown)}")
        choices[str(name)] = DatasetChoice(
            str(name),
            tuple(str(c) for c in entry["configs"]),
            entry.get("data_root"),
            dict(entry.get("demo_data") or {}),
            tuple(str(c) for c in entry.get("compare_with") or ()),
        )
    return choices


def config_names() -> list[str]:
    """The names `--config-name` accepts: pathoscope plus every ablation / baseline YAML."""
    folder = experiments_dir()
    reserved = {DEFAULTS_FILE, DATASETS_FILE}
    reserved |= {c for choice in dataset_choices().values() for c in choice.configs}
    names = [
        p.relative_to(folder).with_suffix("").as_posix()
        for p in sorted(folder.rglob("*.yaml"))
        if p.relative_to(folder).as_posix() not in reserved
        and "sweeps" not in p.relative_to(folder).parts
    ]
    return [DEFAULT_CONFIG, *names]


def config_files(dataset: str, config_name: str = DEFAULT_CONFIG) -> list[Path]:
    """The YAMLs of a dataset and config, in the order they are applied (after defaults.yaml)."""
    choices = dataset_choices()
    if dataset not in choices:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(choices)}")
    folder = experiments_dir()
    files = [folder / name for name in choices[dataset].configs]
    if config_name != DEFAULT_CONFIG:
        known = config_names()
        if config_name.removesuffix(".yaml") not in known:
            raise ValueError(f"unknown config {config_name!r}; expected one of {', '.join(known)}")
        files.append(folder / f"{config_name.removesuffix('.yaml')}.yaml")
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f}: experiment file not found")
    return files


def dataset_root(dataset: str, data_root: str | None) -> Path:
    """The checked data root of a dataset; a synthetic set is written where datasets.yaml says
    so and the folder is missing or empty."""
    choice = dataset_choices()[dataset]
    if data_root is None:
        if choice.data_root is None:
            raise ValueError(
                f"--data-root is required for dataset {dataset} (DATA_ROOT=... with make train)"
            )
        root = Path(choice.data_root)
    else:
        root = Path(data_root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: data root not found (a folder is expected)")
    if choice.demo_data:
        return ensure_demo_data(root, choice.demo_data)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: data root not found (a folder is expected)")
    return root


def ensure_demo_data(root: Path, demo_data: Mapping[str, Any]) -> Path:
    """Write the synthetic set `make_demo_data(**demo_data)` into `root` if it is not there
    (written aside, then renamed: never half a set)."""
    if root.is_dir() and any(root.iterdir()):
        return root
    from data_modules.synthetic import make_demo_data  # lazy: only when a set is written

    options = dict(demo_data)
    dataset = options.pop("dataset")
    tmp = root.with_name(f".{root.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"writing the synthetic {dataset} demo set into {root} ...", flush=True)
    try:
        make_demo_data(dataset, tmp, **options)
        if root.exists():
            root.rmdir()  # empty
        tmp.rename(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root
