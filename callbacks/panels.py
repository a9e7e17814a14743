"""AnomalyPanels: after every test, pictures of where the detector fires on a fixed selection.

The selection (`select_panels`) uses the test predictions that AnomalyMetrics collected (rows
sorted by dataset index; ties go to the lower index):

* false alarms: the `false_alarms` normal items (label 0) with the highest scores;
* misses: the `misses` pathological items (label 1) with the lowest scores;
* random: `random` items drawn with `numpy.random.default_rng(seed)` from the items not chosen
  above, in index order.

A group holds fewer items when the test set has fewer. Each item becomes one panel
(callbacks/visualization.py: input, gt_mask outline, anomaly_map, pred_mask at tau), drawn at the
evaluation size; the maps of all panels share one colour range, the test set's smallest to
largest map value. Written into `<output_dir>/panels/`:

    <group>_<rank>_<index>_<subject>_s<slice>.png   one panel per item, at least MIN_TILE px a tile
    overview.png   every panel, smaller (OVERVIEW_TILE px tiles), one column per group
    panels.json    tau, the colour range, and per panel: group, rank, index, subject, slice,
                   label, score and file

With a WandbLogger the panels are logged as `test/panels` (with captions) and the overview as
`test/panels_overview`. `enabled=False` turns it all off (`--panels.enabled false`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from PIL import Image

from callbacks.metrics import AnomalyMetrics, EvalData, resolve_output_dir
from callbacks.visualization import overview_image, render_panel
from data_modules.transforms import denormalize
from pathoscope.metrics import iou_score
from pathoscope.postprocess import pathological

__all__ = ["GROUPS", "OVERVIEW_TILE", "AnomalyPanels", "select_panels"]

# Group name -> column title of the overview.
GROUPS = {
    "false_alarm": "false alarms: the normal items scored highest",
    "miss": "misses: the pathological items scored lowest",
    "random": "random sample",
}
OVERVIEW_TILE = 128  # tile side in overview.png, in pixels
PANELS_DIR = "panels"


def select_panels(
    scores: np.ndarray,
    labels: np.ndarray,
    false_alarms: int,
    misses: int,
    random: int,
    seed: int,
) -> dict[str, np.ndarray]:
    """Rows of each group of the module docstring: {"false_alarm", "miss", "random"} -> (n,) int.

    scores, labels (N,): one row per test item in index order.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    rows = np.arange(scores.shape[0])
    normal, pathological = rows[labels == 0], rows[labels == 1]
    # Stable sorts keep the lower row (= lower index) first among equal scores.
    chosen = {
        "false_alarm": normal[np.argsort(-scores[normal], kind="stable")][:false_alarms],
        "miss": pathological[np.argsort(scores[pathological], kind="stable")][:misses],
    }
    rest = np.setdiff1d(rows, np.concatenate(list(chosen.values())))
    rng = np.random.default_rng(seed)
    picked = rng.choice(rest, size=min(random, rest.size), replace=False) if rest.size else rest
    chosen["random"] = np.sort(picked.astype(np.int64))
    return chosen


class AnomalyPanels(Callback):
    """Test panels (module docstring) for the selection of `select_panels`.

    Args:
        enabled: False writes and logs nothing.
        false_alarms, misses, random: how many items of each group.
        seed: the random group's seed.
        output_dir: parent of `panels/`; None = the AnomalyMetrics callback's output_dir (beside
            metrics.json), and when that is None too, trainer.log_dir, else default_root_dir.

    Needs an AnomalyMetrics callback in the same trainer (its test predictions and tau are used)
    and a map-style test dataset whose item `index` is its position (the images are read back
    from it). After a test, `paths` lists the panel files, `overview` the overview's path.
    """

    def __init__(
        self,
        enabled: bool = True,
        false_alarms: int = 4,
        misses: int = 4,
        random: int = 4,
        seed: int = 0,
        output_dir: str | None = None,
    ) -> None:
        super().__init__()
        for name, n in (("false_alarms", false_alarms), ("misses", misses), ("random", random)):
            if n < 0:
                raise ValueError(f"panels: {name} must be >= 0; got {n}")
        self.enabled = enabled
        self.counts = {"false_alarm": false_alarms, "miss": misses, "random": random}
        self.seed = seed
        self.output_dir = output_dir
        self.paths: list[Path] = []
        self.overview: Path | None = None

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.enabled:
            _metrics_callback(trainer)  # fail before testing, not after

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # on_test_end runs after every callback's on_test_epoch_end, so the data are complete.
        self.paths, self.overview = [], None
        if not self.enabled:
            return
        metrics_cb = _metrics_callback(trainer)
        data = metrics_cb.results.get("test")
        # Next to metrics.json unless told otherwise (on every rank: log_dir is a collective).
        parent = self.output_dir if self.output_dir is not None else metrics_cb.output_dir
        out_dir = resolve_output_dir(trainer, parent) / PANELS_DIR
        if data is None or len(data) == 0 or not trainer.is_global_zero:
            return
        tau = metrics_cb.metrics["test"]["tau"]
        groups = select_panels(
            data.scores,
            data.labels,
            self.counts["false_alarm"],
            self.counts["miss"],
            self.counts["random"],
            self.seed,
        )
        if not any(len(rows) for rows in groups.values()):
            return
        dataset = _test_dataset(trainer)
        value_range = (float(data.maps.min()), float(data.maps.max()))
        out_dir.mkdir(parents=True, exist_ok=True)
        entries, panels, captions = [], [], []
        small: dict[str, list[np.ndarray]] = {g: [] for g in GROUPS}
        for group, rows in groups.items():
            for rank, r in enumerate(rows.tolist(), 1):
                title = _title(group, rank, data, r, tau)
                args = (_image_at(dataset, data, r), data.maps[r], data.gt_masks[r], tau, title)
                size = data.maps.shape[1]
                panel = _panel(*args, value_range, size)
                small[group].append(
                    _panel(*args, value_range, min(OVERVIEW_TILE, size), tile=OVERVIEW_TILE)
                )
                subject = re.sub(r"[^A-Za-z0-9_.-]", "_", str(data.subject[r]))
                name = f"{group}_{rank}_{int(data.index[r]):05d}_{subject}_s{int(data.slice[r])}"
                path = out_dir / f"{name}.png"
                Image.fromarray(panel).save(path)
                self.paths.append(path)
                panels.append(panel)
                captions.append(" | ".join(title))
                entries.append(_entry(group, rank, data, r, path.name))
        header = _header(tau, value_range, self.counts, self.seed)
        overview = overview_image([(GROUPS[g], small[g]) for g in GROUPS], header)
        self.overview = out_dir / "overview.png"
        Image.fromarray(overview).save(self.overview)
        report = {
            "tau": tau,
            "value_range": list(value_range),
            "seed": self.seed,
            "overview": self.overview.name,
            "panels": entries,
        }
        (out_dir / "panels.json").write_text(json.dumps(report, indent=2) + "\n")
        _log_to_wandb(trainer, panels, captions, overview)


def _log_to_wandb(
    trainer: L.Trainer, panels: list[np.ndarray], captions: list[str], overview: np.ndarray
) -> None:
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key="test/panels", images=panels, caption=captions)
            logger.log_image(key="test/panels_overview", images=[overview])


def _header(
    tau: float | None, value_range: tuple[float, float], counts: dict[str, int], seed: int
) -> list[str]:
    lo, hi = value_range
    tau_text = (
        "no tau (no pred_mask)"
        if tau is None
        else f"pred_mask = anomaly_map >= tau {tau:.4g} (green)"
    )
    return [
        f"tiles: image | gt_mask (red) | anomaly_map (jet, {lo:.3g} to {hi:.3g}) | {tau_text}",
        f"false alarms: the {counts['false_alarm']} normal test items with the highest scores; "
        f"misses: the {counts['miss']} pathological ones with the lowest; random: "
        f"{counts['random']} of the others (seed {seed})",
    ]


def _entry(group: str, rank: int, data: EvalData, r: int, file: str) -> dict[str, Any]:
    """panels.json's record of one panel."""
    return {
        "group": group,
        "rank": rank,
        "index": int(data.index[r]),
        "subject": str(data.subject[r]),
        "slice": int(data.slice[r]),
        "label": int(data.labels[r]),
        "score": float(data.scores[r]),
        "file": file,
    }


def _title(group: str, rank: int, data: EvalData, r: int, tau: float | None) -> list[str]:
    pred = None if tau is None else pathological(data.maps[r], tau)
    iou = None if pred is None else iou_score(pred, data.gt_masks[r])
    what = {"false_alarm": "false alarm", "miss": "miss", "random": "random"}[group]
    return [
        f"{what} {rank}: {data.subject[r]} slice {int(data.slice[r])}",
        f"label {int(data.labels[r])}  score {float(data.scores[r]):.3f}  "
        + ("" if tau is None else f"tau {tau:.3f}  ")
        + f"IoU {'-' if iou is None else f'{iou:.2f}'}",
    ]


def _image_at(dataset: Any, data: EvalData, r: int) -> torch.Tensor:
    """The test image of row r, (1, 3, H, W) in [0, 1]."""
    index = int(data.index[r])
    item = dataset[index]
    if int(item["index"]) != index:
        raise ValueError(
            f"AnomalyPanels: test dataset item {index} reports index {item['index']}; "
            "the item index must be its position in the dataset"
        )
    return denormalize(torch.as_tensor(item["image"], dtype=torch.float32))[None]


def _panel(
    image: torch.Tensor,
    anomaly_map: np.ndarray,
    gt_mask: np.ndarray,
    tau: float | None,
    title: list[str],
    value_range: tuple[float, float],
    size: int,
    tile: int | None = None,
) -> np.ndarray:
    """One panel with every array at `size` px (area / bilinear for the image and the map,
    nearest for gt_mask); pred_mask is taken on the resized map."""
    hw = (size, size)
    if tuple(image.shape[-2:]) != hw:
        image = F.interpolate(image, size=hw, mode="bilinear", align_corners=False, antialias=True)
    if anomaly_map.shape != hw:
        m = torch.from_numpy(anomaly_map)[None, None]
        anomaly_map = F.interpolate(m, size=hw, mode="area")[0, 0].numpy()
        g = torch.from_numpy(gt_mask)[None, None].float()
        gt_mask = F.interpolate(g, size=hw, mode="nearest-exact")[0, 0].numpy() > 0.5
    image_rgb = (image[0].permute(1, 2, 0).clamp(0, 1).numpy() * 255.0 + 0.5).astype(np.uint8)
    pred = None if tau is None else pathological(anomaly_map, tau)
    kwargs = {} if tile is None else {"min_tile": tile}
    return render_panel(image_rgb, anomaly_map, gt_mask, pred, title, value_range, **kwargs)


def _metrics_callback(trainer: L.Trainer) -> AnomalyMetrics:
    for cb in trainer.callbacks:
        if isinstance(cb, AnomalyMetrics):
            return cb
    raise ValueError(
        "AnomalyPanels needs an AnomalyMetrics callback in the trainer's callbacks "
        "(it draws the predictions AnomalyMetrics collects)"
    )


def _test_dataset(trainer: L.Trainer) -> Any:
    loaders = trainer.test_dataloaders
    loader = loaders[0] if isinstance(loaders, list | tuple) else loaders
    dataset = getattr(loader, "dataset", None)
    if dataset is None or not hasattr(dataset, "__getitem__"):
        raise ValueError(
            "AnomalyPanels needs a map-style test dataset (dataset[index] -> item dict) "
            "to read the images back"
        )
    return dataset
