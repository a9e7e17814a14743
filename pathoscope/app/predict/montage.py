"""The montage PNG `pathoscope predict` writes beside a volume's NIfTI outputs.

One tile per scored axial slice, in slice order, row by row (at most MAX_COLUMNS a row), each
the slice as the network sees it (training orientation: rows along the array's first axis),
resized to TILE px: the first modality in grey with the anomaly map blended over it inside the
foreground (jet over the scored slices' smallest to largest map value), the pred_mask outline
(map >= tau inside the foreground) in green, and a caption with the slice index and its score,
in red when the slice is pathological (score >= tau). A header gives the volume, its score and
decision, tau and the colour range.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from callbacks.visualization import colour_map, text_strip
from data_modules.visualize import draw_outline
from pathoscope.postprocess import pathological

TILE = 128  # tile side in pixels
MAX_COLUMNS = 8
MIN_WIDTH = 640  # the header's room, in pixels
CAPTION = 18  # rows of a tile's caption
PRED_COLOR = (0, 255, 0)


def _resize(stack: np.ndarray, mode: str) -> np.ndarray:
    """(n, H, W) -> (n, TILE, TILE) float32."""
    t = torch.from_numpy(np.ascontiguousarray(stack, dtype=np.float32))[:, None]
    return F.interpolate(t, size=(TILE, TILE), mode=mode)[:, 0].numpy()


def montage_image(
    name: str,
    images: np.ndarray,
    maps: np.ndarray,
    foreground: np.ndarray,
    slices: list[int],
    scores: np.ndarray,
    tau: float | None,
) -> np.ndarray:
    """The montage of the module docstring, uint8 (H, W, 3).

    images (n, H, W) grey in [0, 1]; maps (n, H, W) float; foreground (n, H, W) bool; slices and
    scores (n,): the scored slices in training orientation.
    """
    n = len(slices)
    lo, hi = float(maps.min()), float(maps.max())
    greys = _resize(images, "area").clip(0.0, 1.0)
    heat = _resize(maps, "bilinear")
    fg = _resize(foreground.astype(np.float32), "nearest") > 0.5
    columns = min(MAX_COLUMNS, max(1, math.ceil(math.sqrt(n))))
    rows = math.ceil(n / columns)
    width = max(columns * TILE, MIN_WIDTH)
    canvas = np.zeros((rows * (TILE + CAPTION), width, 3), np.uint8)
    for i in range(n):
        grey = np.repeat(greys[i][..., None] * 255.0, 3, axis=2)
        mixed = np.where(fg[i][..., None], 0.5 * grey + 0.5 * colour_map(heat[i], (lo, hi)), grey)
        tile = (mixed + 0.5).astype(np.uint8)
        if tau is not None:
            tile = draw_outline(tile, pathological(heat[i], tau) & fg[i], PRED_COLOR)
        flagged = tau is not None and bool(pathological(scores[i], tau))
        colour = (255, 80, 80) if flagged else (255, 255, 255)
        caption = text_strip([f"{slices[i]}: {scores[i]:.3f}"], TILE, CAPTION, colour)
        r, c = divmod(i, columns)
        y, x = r * (TILE + CAPTION), c * TILE
        canvas[y : y + CAPTION, x : x + TILE] = caption
        canvas[y + CAPTION : y + CAPTION + TILE, x : x + TILE] = tile
    volume_score = float(np.max(scores))
    decision = (
        "" if tau is None else (" pathological" if pathological(volume_score, tau) else " normal")
    )
    header = [
        f"{name}: volume score {volume_score:.4g}{decision}; tau "
        + ("none" if tau is None else f"{tau:.4g}"),
        f"slice: score (red >= tau); map jet {lo:.3g} to {hi:.3g}; pred_mask green",
    ]
    return np.concatenate([text_strip(header, canvas.shape[1]), canvas], axis=0)


def write_montage(path: Path, **kwargs: object) -> Path:
    """`montage_image(**kwargs)` saved as PNG at `path`."""
    Image.fromarray(montage_image(**kwargs)).save(path)  # type: ignore[arg-type]
    return path
