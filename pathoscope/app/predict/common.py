"""What predict and export share: the checkpoint as a ready model, batch scoring, decisions."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from data_modules.common import MIN_IMAGE_SIZE
from pathoscope.checkpoint import CheckpointError
from pathoscope.checkpoint import load_model as load_checkpoint_model
from pathoscope.feature_grid import FEATURE_STRIDE
from pathoscope.postprocess import pathological
from pathoscope.torch_model import PathoScopeModel

log = logging.getLogger(__name__)

VOLUME_DATASETS = ("brats",)
IMAGE_DATASETS = ("chestxray8",)


def load_model(ckpt_path: str | Path, device: str = "cpu") -> PathoScopeModel:
    """A trained torch model in eval mode on `device`, with the preprocessing settings predict
    needs; CheckpointError naming the file otherwise."""
    model = load_checkpoint_model(ckpt_path, device)
    pre = model.preprocessing
    if pre.get("dataset") not in VOLUME_DATASETS + IMAGE_DATASETS or "image_size" not in pre:
        raise CheckpointError(
            f"{Path(ckpt_path).expanduser()}: the checkpoint stores no usable preprocessing "
            f"settings (dataset {pre.get('dataset')!r}; expected one of "
            f"{VOLUME_DATASETS + IMAGE_DATASETS} and an image_size): was it trained with a "
            "datamodule?"
        )
    return model


@torch.inference_mode()
def score_batch(
    net: nn.Module, images: Tensor, foreground: Tensor, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """images (n, 3, S, S), foreground (n, 1, S, S) -> scores (n,), anomaly maps (n, S, S)."""
    score, anomaly_map = net(images.to(device), foreground.to(device))
    return score.float().cpu().numpy(), anomaly_map[:, 0].float().cpu().numpy()


def decision(score: float, tau: float | None) -> str:
    """ "1" when pathological (`pathological`: score >= tau), "0" when not, "" without tau."""
    return "" if tau is None else str(int(pathological(score, tau)))


def no_bar(progress: bool | None) -> bool | None:
    """tqdm's `disable`: None shows bars on terminals only."""
    return None if progress is None else not progress


def size_warnings(where: str, shape: tuple[int, ...], size: int) -> list[str]:
    """A warning (also logged) when an image or slice of `shape` (H, W, ...) is tiny: a side
    shorter than the smallest image_size training takes, or than the network's feature grid has
    cells at `size`. Enlarged to size x size, its map then shows the enlargement, not the image."""
    h, w = shape[:2]
    grid = size // FEATURE_STRIDE
    least = max(MIN_IMAGE_SIZE, grid)
    if min(h, w) >= least:
        return []
    text = (
        f"{where}: {w} x {h} pixels (width x height) is tiny: it was enlarged to {size} x {size} "
        f"like the training images, and a side needs at least {least} px ({MIN_IMAGE_SIZE} px, "
        f"the smallest image_size, and a pixel per cell of the {grid} x {grid} feature grid), "
        "so the map may show the enlargement rather than the image (give it at full resolution)"
    )
    log.warning(text)
    return [text]
