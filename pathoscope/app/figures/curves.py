"""Training curves of one run, from its own CSV log (Lightning's CSVLogger `metrics.csv`).

One figure, four panels against the global step: the loss terms (`train/loss` and each of
`focal`, `lc`, `bce_n`, `bce_s`, `gc` that was logged), PiEG's shift `train/pieg_shift` (mean
||v_s - v_n|| in the bank's distance scales), D's mean score on v_n and v_s (`train/d_n`,
`train/d_s`), and the image threshold `val/tau` set at each validation (and the test's tau).
A panel whose values were never logged says so.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

LOSS_TERMS = ("loss", "focal", "lc", "bce_n", "bce_s", "gc")
CURVES_FILE = "training_curves.png"


def read_log(csv_path: Path) -> dict[str, list[tuple[int, float]]]:
    """{column: [(step, value), ...]} of every non-empty, finite cell of a CSVLogger file."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            step = row.get("step")
            if not step:
                continue
            for key, text in row.items():
                if key in ("step", "epoch") or not text:
                    continue
                try:
                    value = float(text)
                except ValueError:
                    continue
                if math.isfinite(value):
                    series.setdefault(key, []).append((int(float(step)), value))
    return series


def plot_training_curves(csv_path: Path, out_path: Path, title: str = "") -> Path | None:
    """Write the figure of the module docstring; None (nothing written) without training rows."""
    series = read_log(Path(csv_path))
    if not any(k.startswith("train/") for k in series):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    panels = [
        (axes[0, 0], "loss terms", [f"train/{t}" for t in LOSS_TERMS], None),
        (axes[0, 1], "PiEG shift ||v_s - v_n|| (distance scales)", ["train/pieg_shift"], None),
        (axes[1, 0], "D's mean score", ["train/d_n", "train/d_s"], (0.0, 1.0)),
        (axes[1, 1], "image threshold tau", ["val/tau", "test/tau"], None),
    ]
    labels = {
        "train/d_n": "on v_n (normal)",
        "train/d_s": "on v_s (PiEG)",
        "val/tau": "validation",
        "test/tau": "test",
    }
    for ax, name, keys, ylim in panels:
        drawn = False
        for key in keys:
            points = series.get(key)
            if not points:
                continue
            steps, values = zip(*points, strict=True)
            marker = "*" if key == "test/tau" else "o"
            ax.plot(
                steps,
                values,
                marker=marker,
                markersize=4 if marker == "o" else 10,
                label=labels.get(key, key.split("/", 1)[1]),
            )
            drawn = True
        ax.set_title(name, fontsize=10)
        ax.grid(True, alpha=0.3)
        if ylim:
            ax.set_ylim(*ylim)
        if drawn:
            ax.legend(fontsize=8, ncol=2 if len(keys) > 3 else 1)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    for ax in axes[1]:
        ax.set_xlabel("global step")
    fig.suptitle(title or Path(csv_path).parent.parent.name, fontsize=11)
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=90)
    plt.close(fig)
    return out_path
