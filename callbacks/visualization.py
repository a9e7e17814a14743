"""HeatmapVisualizer: PNG overlays of anomaly maps for a seeded sample of test items.

It reuses what AnomalyMetrics collected (maps, gt_mask at the evaluation size, tau), so nothing is
collected twice; the images themselves are read back from the test dataset by `index`. One PNG
per item, `<output_dir>/heatmaps/<index>_<subject>_s<slice>.png`, laid out as (`render_heatmap`):

    title strip (TITLE_HEIGHT rows): subject, slice, label, score, IoU of pred_mask at tau
    tile 0: the image | tile 1: image + gt_mask outline (red) |
    tile 2: anomaly_map colour overlay + pred_mask outline at tau (green) + gt_mask outline (red)

Tiles are S x S pixels at the evaluation size S, enlarged by an integer factor (nearest) to at
least MIN_TILE pixels so small evaluation sizes stay readable.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import lightning as L
import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from PIL import Image, ImageDraw, ImageFont

from callbacks.metrics import AnomalyMetrics, EvalData, resolve_output_dir
from data_modules.transforms import denormalize
from data_modules.visualize import OUTLINE_COLOR, draw_outline
from pathoscope.metrics import iou_score

__all__ = [
    "GT_COLOR",
    "MIN_TILE",
    "PRED_COLOR",
    "TITLE_HEIGHT",
    "HeatmapVisualizer",
    "render_heatmap",
]

GT_COLOR = OUTLINE_COLOR  # (255, 0, 0), as in the show-data grid
PRED_COLOR = (0, 255, 0)
TITLE_HEIGHT = 30  # rows of the title strip (two lines of text)
MIN_TILE = 160  # smallest tile side in the PNG, in pixels
_OVERLAY_ALPHA = 0.5
_COLORMAP = "jet"


def render_heatmap(
    image_rgb: np.ndarray,
    anomaly_map: np.ndarray,
    gt_mask: np.ndarray,
    pred_mask: np.ndarray | None,
    title: list[str],
    value_range: tuple[float, float],
) -> np.ndarray:
    """The panel of the module docstring as uint8 (TITLE_HEIGHT + k*S, 3*k*S, 3).

    image_rgb (S, S, 3) uint8; anomaly_map (S, S) float, coloured over `value_range`;
    gt_mask / pred_mask (S, S) bool (pred_mask None: tau unknown, no outline); `title`: up to two
    lines. k = ceil(MIN_TILE / S).
    """
    lo, hi = value_range
    scaled = (
        np.clip((anomaly_map - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(anomaly_map)
    )
    colours = matplotlib.colormaps[_COLORMAP](scaled)[..., :3] * 255.0  # (S, S, 3)
    overlay = ((1.0 - _OVERLAY_ALPHA) * image_rgb + _OVERLAY_ALPHA * colours + 0.5).astype(np.uint8)
    if pred_mask is not None:
        overlay = draw_outline(overlay, pred_mask, PRED_COLOR)
    tiles = [
        image_rgb,
        draw_outline(image_rgb, gt_mask, GT_COLOR),
        draw_outline(overlay, gt_mask, GT_COLOR),  # gt last: it stays visible over pred
    ]
    k = math.ceil(MIN_TILE / image_rgb.shape[0])
    row = np.concatenate(tiles, axis=1).repeat(k, axis=0).repeat(k, axis=1)  # (k*S, 3*k*S, 3)
    strip = Image.new("RGB", (row.shape[1], TITLE_HEIGHT))
    draw = ImageDraw.Draw(strip)
    font = ImageFont.load_default()
    for i, line in enumerate(title[:2]):
        draw.text((3, 2 + 14 * i), line, fill=(255, 255, 255), font=font)
    return np.concatenate([np.asarray(strip), row], axis=0)


class HeatmapVisualizer(Callback):
    """Heatmap PNGs (module docstring) for `n_images` test items drawn with `seed`.

    Needs an AnomalyMetrics callback in the same trainer (its test predictions and tau are used)
    and a map-style test dataset whose item `index` is its position. Writes into
    `<output_dir>/heatmaps/` (output_dir None = trainer.log_dir, else default_root_dir); with a
    WandbLogger also logs the panels as `test/heatmaps`. `paths` lists the files of the last test.
    """

    def __init__(self, n_images: int = 8, seed: int = 0, output_dir: str | None = None) -> None:
        super().__init__()
        if n_images < 0:
            raise ValueError(f"n_images must be >= 0; got {n_images}")
        self.n_images = n_images
        self.seed = seed
        self.output_dir = output_dir
        self.paths: list[Path] = []

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _metrics_callback(trainer)  # fail before testing, not after

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # on_test_end runs after every callback's on_test_epoch_end, so the data are complete.
        self.paths = []
        metrics_cb = _metrics_callback(trainer)
        data = metrics_cb.results.get("test")
        out_dir = resolve_output_dir(trainer, self.output_dir) / "heatmaps"  # every rank
        if data is None or len(data) == 0 or self.n_images == 0 or not trainer.is_global_zero:
            return
        tau = metrics_cb.metrics["test"]["tau"]
        dataset = _test_dataset(trainer)
        rng = np.random.default_rng(self.seed)
        rows = np.sort(rng.choice(len(data), size=min(self.n_images, len(data)), replace=False))
        value_range = (float(data.maps.min()), float(data.maps.max()))
        out_dir.mkdir(parents=True, exist_ok=True)
        panels, captions = [], []
        for r in rows:
            panel, caption = self._panel(data, int(r), dataset, tau, value_range)
            name = re.sub(r"[^A-Za-z0-9_.-]", "_", str(data.subject[r]))
            path = out_dir / f"{int(data.index[r]):05d}_{name}_s{int(data.slice[r])}.png"
            Image.fromarray(panel).save(path)
            self.paths.append(path)
            panels.append(panel)
            captions.append(caption)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="test/heatmaps", images=panels, caption=captions)

    @staticmethod
    def _panel(
        data: EvalData,
        r: int,
        dataset: Any,
        tau: float | None,
        value_range: tuple[float, float],
    ) -> tuple[np.ndarray, str]:
        index = int(data.index[r])
        item = dataset[index]
        if int(item["index"]) != index:
            raise ValueError(
                f"HeatmapVisualizer: test dataset item {index} reports index {item['index']}; "
                "the item index must be its position in the dataset"
            )
        size = data.maps.shape[1:]
        image = denormalize(torch.as_tensor(item["image"], dtype=torch.float32))[None]
        if tuple(image.shape[-2:]) != size:
            image = F.interpolate(
                image, size=size, mode="bilinear", align_corners=False, antialias=True
            )
        image_rgb = (image[0].permute(1, 2, 0).clamp(0, 1).numpy() * 255.0 + 0.5).astype(np.uint8)
        gt_mask = data.gt_masks[r]
        pred_mask = None if tau is None else data.maps[r] >= tau
        iou = None if pred_mask is None else iou_score(pred_mask, gt_mask)
        iou_text = "-" if iou is None else f"{iou:.3f}"
        title = [
            f"{data.subject[r]} slice {int(data.slice[r])}",
            f"label {int(data.labels[r])} score {float(data.scores[r]):.3f} IoU {iou_text}",
        ]
        panel = render_heatmap(image_rgb, data.maps[r], gt_mask, pred_mask, title, value_range)
        return panel, " | ".join(title)


def _metrics_callback(trainer: L.Trainer) -> AnomalyMetrics:
    for cb in trainer.callbacks:
        if isinstance(cb, AnomalyMetrics):
            return cb
    raise ValueError(
        "HeatmapVisualizer needs an AnomalyMetrics callback in the trainer's callbacks "
        "(it draws the predictions AnomalyMetrics collects)"
    )


def _test_dataset(trainer: L.Trainer) -> Any:
    loaders = trainer.test_dataloaders
    loader = loaders[0] if isinstance(loaders, list | tuple) else loaders
    dataset = getattr(loader, "dataset", None)
    if dataset is None or not hasattr(dataset, "__getitem__"):
        raise ValueError(
            "HeatmapVisualizer needs a map-style test dataset (dataset[index] -> item dict) "
            "to read the images back"
        )
    return dataset
