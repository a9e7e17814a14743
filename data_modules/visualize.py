"""Show-data grid: training images, their synthetic lesions, test images, for a check by eye.

Layout (deterministic, no margins; every tile is one image at its own pixel size S):
    row 0: training images x_n               (n_train tiles)
    row 1: the same with a synthetic lesion x_p, lesion_mask outline in red
    row 2: test images, gt_mask outline in red (n_test tiles, evenly spaced over the test set)
The PNG is max(n_train, n_test) * S wide and 3 * S high (for n_train, n_test > 0); empty tiles
are black.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from data_modules.transforms import denormalize

OUTLINE_COLOR = (255, 0, 0)


def draw_outline(
    image_rgb: np.ndarray, mask: np.ndarray, color: tuple[int, int, int] = OUTLINE_COLOR
) -> np.ndarray:
    """Copy of `image_rgb` (H, W, 3) with the outline of `mask` (H, W) bool painted in `color`.

    Outline = mask minus its 3x3 erosion (mask pixels on the image border count as outline).
    `color` is 0-255; for a float image it is written as color / 255.
    """
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or mask.shape != image_rgb.shape[:2]:
        raise ValueError(
            f"expected image (H, W, 3) and mask (H, W), got {image_rgb.shape} and {mask.shape}"
        )
    mask = np.asarray(mask, dtype=bool)
    outline = mask & ~ndimage.binary_erosion(mask, np.ones((3, 3), bool), border_value=0)
    out = image_rgb.copy()
    scale = 1.0 if np.issubdtype(out.dtype, np.integer) else 1.0 / 255.0
    out[outline] = np.asarray(color, dtype=np.float64) * scale
    return out


def show_data_grid(
    datamodule: Any, out_path: str | Path, n_train: int = 4, n_test: int = 4
) -> Path:
    """Write the grid described in the module docstring to `out_path` (PNG); returns the path.

    Uses `datamodule.setup("fit")` / `setup("test")`, `train_dataset()[i]` for i < n_train and
    `test_dataset()[i]` at evenly spaced i (item dicts as in docs/batch_contract.md).
    """
    datamodule.setup("fit")
    datamodule.setup("test")
    train, test = datamodule.train_dataset(), datamodule.test_dataset()
    n_train, n_test = min(n_train, len(train)), min(n_test, len(test))
    train_items = [train[i] for i in range(n_train)]
    test_idx = np.linspace(0, len(test) - 1, n_test).round().astype(int) if n_test else []
    test_items = [test[int(i)] for i in test_idx]

    rows = [
        [_to_rgb(item["image"]) for item in train_items],
        [
            draw_outline(_to_rgb(item["lesion_image"]), _to_mask(item["lesion_mask"]))
            for item in train_items
        ],
        [draw_outline(_to_rgb(item["image"]), _to_mask(item["gt_mask"])) for item in test_items],
    ]
    tiles = [tile for row in rows for tile in row]
    if not tiles:
        raise ValueError("show_data_grid: the datamodule has no training or test items to show")
    size_h, size_w = tiles[0].shape[:2]
    n_cols = max(n_train, n_test)
    grid = np.zeros((3 * size_h, n_cols * size_w, 3), np.uint8)
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            if tile.shape[:2] != (size_h, size_w):
                raise ValueError(
                    f"show_data_grid: all images must share one size, got {tile.shape[:2]} "
                    f"and {(size_h, size_w)}"
                )
            grid[r * size_h : (r + 1) * size_h, c * size_w : (c + 1) * size_w] = tile

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(out_path)
    return out_path


def _to_rgb(image: torch.Tensor | np.ndarray) -> np.ndarray:
    # (3, H, W) ImageNet-normalised -> (H, W, 3) uint8
    rgb = denormalize(torch.as_tensor(image, dtype=torch.float32)).permute(1, 2, 0).numpy()
    return (rgb * 255.0 + 0.5).astype(np.uint8)


def _to_mask(mask: torch.Tensor | np.ndarray) -> np.ndarray:
    # (1, H, W) or (H, W), bool or {0, 1} float -> (H, W) bool
    array = mask.numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    return array.reshape(array.shape[-2:]) > 0.5
