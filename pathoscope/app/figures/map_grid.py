"""The grid of `pathoscope maps` (pathoscope/app/maps.py): anomaly maps of a few fixed test
slices across runs (the paper's Fig. 3).

Rows: the test images with their gt_mask
outlined (red), then one row per run, configs in table order and K ascending, each map blended
over the image in its own colour range (that run's smallest to largest test map value, so that a
discriminator's and a distance's maps both show). Columns, fixed for every row (`select_slices`):
the pathological test slices with a pixel-level gt_mask at the 1/n, 2/n, ..., n/n quantiles of
lesion area (the largest lesion last), then the normal test slice of the lowest index. The
slices are named by (subject, slice), found in every run's predictions (runs over one test set
share it); a run without one of them shows a blank cell.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class Run:
    config: str
    shots: int
    folder: Path
    predictions: dict[str, np.ndarray]


def select_slices(predictions: dict[str, np.ndarray], n: int) -> list[tuple[str, int]]:
    """(subject, slice) of the columns of the module docstring."""
    area = predictions["gt_masks"].reshape(len(predictions["labels"]), -1).sum(1)
    lesions = np.flatnonzero((predictions["labels"] == 1) & predictions["has_mask"] & (area > 0))
    lesions = lesions[np.argsort(area[lesions], kind="stable")]
    rows = []
    if lesions.size and n > 0:
        quantiles = np.arange(1, n + 1) / n
        positions = np.ceil(quantiles * lesions.size).astype(int) - 1
        rows = list(dict.fromkeys(lesions[positions].tolist()))
    normal = np.flatnonzero(predictions["labels"] == 0)
    if normal.size:
        rows.append(int(normal[0]))
    return [(str(predictions["subject"][r]), int(predictions["slice"][r])) for r in rows]


def _resized(array: np.ndarray, size: int, mode: str) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    if t.shape[-1] != size or t.shape[-2] != size:
        t = F.interpolate(t, size=(size, size), mode=mode)
    return t[0, 0].numpy()


def _row_of(predictions: dict[str, np.ndarray]) -> dict[tuple[str, int], int]:
    """{(subject, slice): its index in the predictions}."""
    return {
        (str(s), int(k)): n
        for n, (s, k) in enumerate(zip(predictions["subject"], predictions["slice"], strict=True))
    }


def _draw_images(
    axes: Sequence[Any],
    slices: Sequence[tuple[str, int]],
    greys: dict[tuple[str, int], np.ndarray],
    reference: dict[str, np.ndarray],
) -> None:
    """The first row: each image (`greys`: (S, S) by (subject, slice), S the cells' size) with its
    gt_mask (from the `reference` predictions) outlined."""
    from data_modules.visualize import draw_outline

    size = next(iter(greys.values())).shape[-1]
    where = _row_of(reference)
    for j, key in enumerate(slices):
        gt = _resized(reference["gt_masks"][where[key]], size, "nearest") > 0.5
        rgb = (np.repeat(greys[key][..., None], 3, axis=2).clip(0, 1) * 255).astype(np.uint8)
        axes[j].imshow(draw_outline(rgb, gt))
        label = "normal" if not gt.any() else f"lesion {int(gt.sum())} px"
        axes[j].set_title(f"{key[0]}\nslice {key[1]}, {label}", fontsize=7)
    axes[0].set_ylabel("image + gt_mask", fontsize=8)


def _draw_run(
    axes: Sequence[Any],
    run: Run,
    slices: Sequence[tuple[str, int]],
    greys: dict[tuple[str, int], np.ndarray],
) -> None:
    """One run's row: its maps blended over `greys` (as in _draw_images) in its own value range."""
    from callbacks.visualization import colour_map
    from data_modules.visualize import draw_outline

    size = next(iter(greys.values())).shape[-1]
    p = run.predictions
    rows = _row_of(p)
    value_range = (float(p["maps"].min()), float(p["maps"].max()))
    for j, key in enumerate(slices):
        ax = axes[j]
        if key not in rows:
            ax.text(0.5, 0.5, "not in this run", ha="center", va="center", fontsize=7)
            continue
        amap = _resized(p["maps"][rows[key]], size, "bilinear")
        gt = _resized(p["gt_masks"][rows[key]], size, "nearest") > 0.5
        grey = np.repeat(greys[key][..., None], 3, axis=2) * 255.0
        blended = (0.5 * grey + 0.5 * colour_map(amap, value_range) + 0.5).astype(np.uint8)
        ax.imshow(draw_outline(blended, gt))
    axes[0].set_ylabel(f"{run.config}\nK={run.shots}", fontsize=8)


def draw_grid(
    runs: Sequence[Run],
    slices: Sequence[tuple[str, int]],
    images: dict[tuple[str, int], np.ndarray],
    out_path: Path,
) -> Path:
    """The figure of the module docstring; `images` (S, S) grey in [0, 1] by (subject, slice)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = max(int(r.predictions["maps"].shape[-1]) for r in runs)
    cell = 1.7
    fig, axes = plt.subplots(
        len(runs) + 1,
        len(slices),
        figsize=(cell * len(slices) + 1.2, cell * (len(runs) + 1) + 0.6),
        squeeze=False,
    )
    greys = {key: _resized(images[key], size, "area") for key in slices}
    _draw_images(axes[0], slices, greys, runs[0].predictions)
    for i, run in enumerate(runs, 1):
        _draw_run(axes[i], run, slices, greys)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(
        "anomaly maps across runs (jet, each run over its own test range), gt_mask in red",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
