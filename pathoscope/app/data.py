"""The data module of experiment YAMLs or of a finished run, outside LightningCLI.

`show-data`, the figure verbs (`embeddings`, `maps`) and the peers benchmark need the data of a
config without a model or a Trainer: `build_datamodule` parses only the `data` sections (and the
lesion threshold that the model's `losses.lesion_min_fraction` links to the data), then
`--data.*` overrides; `run_datamodule` does it for a run folder's resolved config.yaml.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ArgumentParser

from pathoscope.app.configs import defaults_file, read_yaml


def build_datamodule(configs: Sequence[str | Path], overrides: Sequence[str] = ()) -> Any:
    """The data module of experiment YAMLs (their `data` sections, and the lesion threshold the
    model's `losses.lesion_min_fraction` links to it) plus `--data.*` overrides."""
    from data_modules.common import FewShotDataModule

    for path in configs:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: config file not found")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--config", action="append", default=[])
    parser.add_subclass_arguments(FewShotDataModule, "data", required=True)

    data_args: list[str] = []
    fraction = None
    for path in [defaults_file(), *configs]:
        config = read_yaml(path) or {}
        losses = (config.get("model") or {}).get("losses") or {}
        fraction = losses.get("lesion_min_fraction", fraction)
        if config.get("data") is not None:
            data_args += ["--data", yaml.safe_dump(config["data"])]
    if fraction is not None:
        data_args.append(f"--data.lesion_min_fraction={fraction}")
    wanted = list(overrides)
    bad = [a for a in wanted if a.startswith("--") and not a.startswith("--data")]
    if bad:
        raise ValueError(f"only --data.* overrides are accepted, got {bad[0]}")
    cfg = parser.parse_args(data_args + wanted)
    return parser.instantiate_classes(cfg).data


def run_datamodule(config: str | Path, data_root: str | Path | None = None) -> Any:
    """The data module of a run's config.yaml (or any experiment YAML), its data root replaced
    by `data_root` when given; set up, so that its test set is ready."""
    overrides = [] if data_root is None else [f"--data.root={Path(data_root).expanduser()}"]
    dm = build_datamodule([config], overrides)
    dm.setup("test")
    return dm
