"""The tables of benchmarks/ablation.py and benchmarks/peers.py (ABLATION.md and PEERS.md are made
of them): the cells are the mean and sample std over seeds of the numbers each run recorded, worked
out here by hand, and every variant, scoring and step appears."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str) -> ModuleType:
    """A benchmarks/ script as a module (benchmarks/ is scripts, not an installed package)."""
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ablation = _load("ablation")
peers = _load("peers")

KEYS = ablation.KEYS


def _point(step: int, base: float) -> dict:
    """A curve point whose metrics under scoring s are base + offset(s) (offsets below)."""
    offsets = {"D": 0.0, "knn_e": -0.1, "knn_v": -0.05, "prod": 0.02}
    return {
        "step": step,
        "minutes": 0.0,
        **{s: {k: base + o for k in KEYS} for s, o in offsets.items()},
    }


def _run(finals: float) -> dict:
    return {"points": [_point(0, 0.5), _point(100, finals)]}


def _row(text: str, *first: str) -> list[str]:
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[: len(first)] == list(first):
            return cells
    raise AssertionError(f"no row starting {first} in\n{text}")


def test_ablation_table_cells_are_mean_and_std_over_seeds() -> None:
    results = {"default": [_run(0.70), _run(0.80)], "no_pieg": [_run(0.60)]}
    text = ablation.table(results, shots=2)
    # two seeds at 0.70 and 0.80: mean 75.0, sample std 0.1 / sqrt(2) = 7.07 percent
    row = _row(text, "default", "D")
    assert row[2:4] == ["2", "100"]
    assert row[4] == "75.0 ± 7.1"
    assert _row(text, "default", "knn_e")[4] == "65.0 ± 7.1"
    assert _row(text, "default", "prod")[4] == "77.0 ± 7.1"
    # a one-seed variant has no std; other variants show D and the fused score only
    assert _row(text, "no_pieg", "D")[4] == "60.0"
    assert _row(text, "no_pieg", "prod")[4] == "62.0"
    with pytest.raises(AssertionError):
        _row(text, "no_pieg", "knn_e")
    # the curve: every recorded step of the default variant, D and prod
    assert _row(text, "0", "D")[3] == "50.0 ± 0.0"
    assert _row(text, "100", "prod")[3] == "77.0 ± 7.1"
    assert "`no_pieg`: no PiEG steps" in text


def test_peers_table_cells_are_mean_and_std_over_seeds() -> None:
    runs = {
        "pathoscope": [{k: v for k in peers.TABLE} for v in (0.9, 0.8, 0.7)],
        "patchcore": [{k: 0.5 for k in peers.TABLE}],
    }
    text = peers.table(runs, shots=2, seeds=[0, 1, 2])
    row = _row(text, peers.ROW_NAMES["pathoscope"])
    assert row[1] == f"0.800 ± {math.sqrt(0.01):.3f}"  # sample std of 0.9, 0.8, 0.7
    assert _row(text, peers.ROW_NAMES["patchcore"])[1] == "0.500"
    assert text.splitlines()[0].startswith("| K = 2, seeds 0,1,2 |")
