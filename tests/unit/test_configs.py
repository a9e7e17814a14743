"""Defaults defined once: the hyperparameter dataclasses and the data modules' signatures hold them;
experiment YAMLs hold deliberate overrides only, and Python and the CLI build the same experiment."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest

from callbacks.metrics import AnomalyMetrics
from callbacks.panels import AnomalyPanels
from data_modules.brats import BraTSDataModule
from pathoscope import hparams
from pathoscope.app.configs import (
    DEFAULT_CONFIG,
    config_names,
    dataset_choices,
    defaults_file,
    experiments_dir,
    read_yaml,
)
from pathoscope.app.lightning_cli import lightning_cli
from pathoscope.lightning_model import PathoScope

GROUPS = {
    "network": hparams.NetworkParams,
    "pieg": hparams.PiEGParams,
    "losses": hparams.LossParams,
    "bank": hparams.BankParams,
    "scoring": hparams.ScoringParams,
    "optim": hparams.OptimParams,
}
MISSING = object()


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tuple(tree) if isinstance(tree, list) else tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _signature_default(cls: Any, name: str) -> Any:
    param = inspect.signature(cls.__init__).parameters.get(name)
    if param is None or param.default is inspect.Parameter.empty:
        return MISSING
    return tuple(param.default) if isinstance(param.default, list) else param.default


def _code_default(key: str, merged: dict[str, Any]) -> Any:
    """The value `key` takes when no YAML sets it (MISSING: required or not a code default)."""
    parts = key.split(".")
    if parts[0] == "model" and len(parts) == 3:
        fields = {f.name: f.default for f in dataclasses.fields(GROUPS[parts[1]])}
        return fields.get(parts[2], MISSING)
    if parts[:2] == ["data", "init_args"] and "data.class_path" in merged:
        module, _, name = merged["data.class_path"].rpartition(".")
        return _signature_default(getattr(importlib.import_module(module), name), parts[2])
    owners = {"trainer": L.Trainer, "metrics": AnomalyMetrics, "panels": AnomalyPanels}
    if parts[0] in owners and len(parts) == 2:
        return _signature_default(owners[parts[0]], parts[1])
    return MISSING


def _value_before(key: str, merged: dict[str, Any]) -> Any:
    return merged[key] if key in merged else _code_default(key, merged)


def _chains() -> dict[str, list[Path]]:
    folder = experiments_dir()
    return {
        name: [defaults_file(), *(folder / c for c in choice.configs)]
        for name, choice in dataset_choices().items()
    }


def _restated_in_chain(files: list[Path]) -> tuple[list[str], dict[str, Any]]:
    merged: dict[str, Any] = {}
    restated = []
    for path in files:
        values = _flat(read_yaml(path) or {})
        context = {**merged, **{k: v for k, v in values.items() if k == "data.class_path"}}
        for key, value in values.items():
            if key != "data.class_path" and _value_before(key, context) == value:
                restated.append(f"{path.name}: {key} = {value!r}")
        merged.update(values)
    return restated, merged


def test_no_experiment_file_restates_what_comes_before_it() -> None:
    """defaults.yaml, each dataset's files and each ablation / baseline file set only values that
    differ from the code's defaults and from the files applied before them (an add-on file is
    checked against every dataset it can be applied to: a value it needs on one is kept)."""
    restated: set[str] = set()
    merged_per_dataset = {}
    for name, files in _chains().items():
        found, merged_per_dataset[name] = _restated_in_chain(files)
        restated |= set(found)
    folder = experiments_dir()
    for config in config_names():
        if config == DEFAULT_CONFIG:
            continue
        values = _flat(read_yaml(folder / f"{config}.yaml") or {})
        for key, value in values.items():
            if all(_value_before(key, m) == value for m in merged_per_dataset.values()):
                restated.add(f"{config}.yaml: {key} = {value!r}")
    assert sorted(restated) == []


def test_the_check_sees_a_restated_value(tmp_path: Path) -> None:
    """The check itself: a dataset file that repeats the code's eta, or the trainer default of an
    earlier file, is reported."""
    first = tmp_path / "a.yaml"
    first.write_text("trainer:\n  max_steps: 7\nmodel:\n  pieg:\n    eta: 0.01\n    steps: 3\n")
    second = tmp_path / "b.yaml"
    second.write_text("trainer:\n  max_steps: 7\n  max_epochs: 2\n")
    found, _ = _restated_in_chain([first, second])
    assert found == ["a.yaml: model.pieg.eta = 0.01", "b.yaml: trainer.max_steps = 7"]


def test_python_and_the_cli_build_the_same_brats_experiment(tmp_path: Path) -> None:
    """`PathoScope(**brats.yaml's model)` / `BraTSDataModule(**its init_args)` equal what
    `pathoscope fit --config experiments/brats.yaml` builds, field by field."""
    brats = experiments_dir() / "brats.yaml"
    spec = read_yaml(brats)
    root = str(tmp_path)
    model_args = {g: dict(v) for g, v in (spec.get("model") or {}).items()}
    model_args.setdefault("network", {})["pretrained"] = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random backbone
        cli = lightning_cli(
            ["--config", str(brats), f"--data.root={root}", "--model.network.pretrained=false"],
            run=False,
        )
        module = PathoScope(**model_args)
    data = BraTSDataModule(root=root, **spec["data"]["init_args"])
    assert dict(cli.model.hparams) == dict(module.hparams)
    assert _plain(cli.datamodule.hparams) == _plain(data.hparams)
    assert cli.model.model.hp == module.model.hp


def _plain(hp: Any) -> dict[str, Any]:
    """Saved init arguments without the CLI's own bookkeeping (`_class_path`, `_instantiator`)."""
    return {k: _flat(v)[""] for k, v in dict(hp).items() if not k.startswith("_")}


@pytest.mark.parametrize("field", ["intensity_norm", "intensity_lesions"])
def test_brats_data_defaults_are_the_shipped_ones(field: str) -> None:
    """The choices that made the BraTS default work are the data module's own defaults."""
    assert (
        _signature_default(BraTSDataModule, field)
        == {
            "intensity_norm": "median",
            "intensity_lesions": 0.5,
        }[field]
    )
