"""What predict and export share: the checkpoint as a ready model, batch scoring, decisions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from pathoscope.checkpoint import CheckpointError
from pathoscope.checkpoint import load_model as load_checkpoint_model
from pathoscope.postprocess import pathological
from pathoscope.torch_model import PathoScopeModel

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
