"""Images for `pathoscope predict`: PNG / JPEG files -> maps at their own size and overlays."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from data_modules.chestxray8 import load_grey_png
from data_modules.common import to_rgb
from data_modules.errors import DataError
from data_modules.transforms import normalize, resize
from data_modules.visualize import draw_outline
from pathoscope.app.predict.common import score_batch, size_warnings
from pathoscope.folded import inference_net
from pathoscope.postprocess import pathological, tau_value
from pathoscope.torch_model import PathoScopeModel

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# Training resizes square radiographs to image_size x image_size; an image whose height / width
# differs from 1 by more than this is squashed by the same resize, and predict says so.
ASPECT_TOLERANCE = 0.05


@dataclass
class ImageResult:
    """Predictions for one image at its own size (H, W)."""

    path: Path
    image: np.ndarray  # (H, W) grey [0, 1]
    anomaly_map: np.ndarray  # (H, W) float32
    score: float
    tau: float | None
    warnings: list[str] = field(default_factory=list)

    @property
    def pred_mask(self) -> np.ndarray | None:
        return None if self.tau is None else pathological(self.anomaly_map, self.tau)

    @property
    def pathological(self) -> bool | None:
        return None if self.tau is None else bool(pathological(self.score, self.tau))


def predict_images(
    model: PathoScopeModel,
    paths: Sequence[str | Path],
    batch_size: int = 16,
    net: nn.Module | None = None,
) -> list[ImageResult | DataError]:
    """Score images with the checkpoint's preprocessing; a bad file gives its DataError in place.

    Results are in the order of `paths`.
    """
    net = net or inference_net(model)
    size = int(model.preprocessing["image_size"])
    tau = tau_value(model.tau)
    results: list[ImageResult | DataError] = []
    for start in range(0, len(paths), batch_size):
        batch: list[ImageResult | DataError | None] = []  # None: scored below
        loaded: list[tuple[int, Path, np.ndarray]] = []
        for p in paths[start : start + batch_size]:
            try:
                grey = load_grey_png(p)  # (H, W) [0, 1], the training reader
            except DataError as err:
                batch.append(err)
                continue
            loaded.append((len(batch), Path(p), grey))
            batch.append(None)
        if loaded:
            images = torch.stack(
                [normalize(to_rgb(resize(grey[:, :, None], size)[0])) for _, _, grey in loaded]
            )  # (n, 3, S, S)
            fg = torch.ones(len(loaded), 1, size, size, dtype=torch.bool)  # whole image
            scores, maps = score_batch(net, images, fg, model.tau.device)
            for (i, p, grey), s, m in zip(loaded, scores, maps, strict=True):
                full, _ = resize(m[:, :, None], grey.shape)
                batch[i] = ImageResult(
                    p,
                    grey,
                    full.reshape(grey.shape),
                    float(s),
                    tau,
                    _aspect_warnings(p, grey, size) + size_warnings(str(p), grey.shape, size),
                )
        results.extend(r for r in batch if r is not None)
    return results


def _aspect_warnings(path: Path, grey: np.ndarray, size: int) -> list[str]:
    """A warning (also logged) when the image is not square: it is squashed to size x size."""
    h, w = grey.shape
    if abs(h / w - 1.0) <= ASPECT_TOLERANCE:
        return []
    text = (
        f"{path}: {w} x {h} pixels (width x height) is not square: it was resized to {size} x "
        f"{size} like the square training images, so its anatomy is squashed {max(h, w) / min(h, w):.2f}:1 "
        "and the map may be unreliable (crop or pad it to a square first)"
    )
    log.warning(text)
    return [text]


def overlay(result: ImageResult) -> np.ndarray:
    """(H, 2W, 3) uint8: the image with the pred_mask outline | the anomaly map over the image."""
    import matplotlib

    grey = np.repeat(result.image[:, :, None], 3, axis=2)
    left = grey if result.pred_mask is None else draw_outline(grey, result.pred_mask)
    heat = matplotlib.colormaps["jet"](np.clip(result.anomaly_map, 0.0, 1.0))[..., :3]
    right = 0.5 * grey + 0.5 * heat
    return (np.concatenate([left, right], axis=1) * 255.0).round().astype(np.uint8)


def image_output(path: Path, out_dir: Path) -> Path:
    return out_dir / f"{path.stem}_overlay.png"
