"""Tests for data_modules/visualize.py: outline drawing and the show-data grid PNG."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from data_modules.transforms import normalize
from data_modules.visualize import draw_outline, show_data_grid

S = 32  # tile size
RED = np.array([255, 0, 0], np.uint8)


def _square(top: int, left: int, side: int) -> np.ndarray:
    mask = np.zeros((S, S), bool)
    mask[top : top + side, left : left + side] = True
    return mask


def _grey(level: float) -> torch.Tensor:
    # a grey image with a little structure, normalised: (3, S, S)
    ramp = np.linspace(0.0, 0.3, S, dtype=np.float32)[None, :].repeat(S, axis=0)
    return normalize(np.repeat((level + ramp)[..., None], 3, axis=2))


def _fake_datamodule(n_train: int, n_test: int) -> SimpleNamespace:
    train = [
        {
            "image": _grey(0.2 + 0.05 * i),
            "lesion_image": _grey(0.3 + 0.05 * i),
            "lesion_mask": torch.from_numpy(_square(2 + i, 3 + 2 * i, 10)).float()[None],
            "foreground": torch.ones(1, S, S, dtype=torch.bool),
            "index": i,
        }
        for i in range(n_train)
    ]
    test = [
        {
            "image": _grey(0.1 + 0.05 * i),
            "gt_mask": torch.from_numpy(_square(5 + i, 20 - i, 8))[None],
            "foreground": torch.ones(1, S, S, dtype=torch.bool),
            "has_mask": True,
            "label": int(i % 2),
            "subject": f"s{i}",
            "slice": 0,
            "index": i,
        }
        for i in range(n_test)
    ]
    stages: list[str] = []
    return SimpleNamespace(
        train_dataset=lambda: train, test_dataset=lambda: test, setup=stages.append, stages=stages
    )


def _red(tile: np.ndarray) -> np.ndarray:
    return np.all(tile == RED, axis=-1)


def test_draw_outline_is_mask_minus_erosion() -> None:
    mask = _square(4, 6, 5)
    out = draw_outline(np.zeros((S, S, 3), np.uint8), mask, color=(0, 255, 0))
    expected = mask.copy()
    expected[5:8, 7:10] = False  # the 3x3 interior of a 5x5 square
    assert np.array_equal(np.all(out == (0, 255, 0), axis=-1), expected)
    assert expected.sum() == 16


def test_draw_outline_float_image_and_border() -> None:
    image = np.full((S, S, 3), 0.5, np.float32)
    mask = _square(0, 0, 4)  # in the corner: pixels on the image border are outline too
    out = draw_outline(image, mask)
    ring = mask.copy()
    ring[1:3, 1:3] = False  # only the inner 2x2 has all 8 neighbours inside the mask
    assert np.array_equal(np.all(out == (1.0, 0.0, 0.0), axis=-1), ring)
    assert np.all(out[~ring] == 0.5) and np.all(image == 0.5)  # input not modified


@pytest.mark.parametrize(("n_train", "n_test"), [(3, 4), (4, 2)])
def test_grid_layout_and_outlines(tmp_path: Path, n_train: int, n_test: int) -> None:
    dm = _fake_datamodule(n_train=5, n_test=7)
    path = show_data_grid(dm, tmp_path / "sub" / "grid.png", n_train=n_train, n_test=n_test)
    assert path == tmp_path / "sub" / "grid.png" and dm.stages == ["fit", "test"]
    grid = np.asarray(Image.open(path).convert("RGB"))
    n_cols = max(n_train, n_test)
    assert grid.shape == (3 * S, n_cols * S, 3)

    def tile(row: int, col: int) -> np.ndarray:
        return grid[row * S : (row + 1) * S, col * S : (col + 1) * S]

    black = np.zeros((S, S, 3), np.uint8)
    for c in range(n_cols):
        if c < n_train:
            item = dm.train_dataset()[c]
            assert not _red(tile(0, c)).any()  # plain training image, no outline
            expected = _red(draw_outline(black, item["lesion_mask"][0].numpy() > 0))
            assert np.array_equal(_red(tile(1, c)), expected)
            # away from the outline the tile shows the lesion image itself (grey, 0.3 + ...)
            grey = tile(1, c)[~expected, 0].astype(float) / 255
            assert grey.min() >= 0.3 + 0.05 * c - 0.01
        else:
            assert not tile(0, c).any() and not tile(1, c).any()  # empty tiles are black
        if c < n_test:
            # evenly spaced test items: linspace(0, 6, n_test)
            index = int(np.linspace(0, 6, n_test).round()[c])
            expected = _red(draw_outline(black, dm.test_dataset()[index]["gt_mask"][0].numpy()))
            assert np.array_equal(_red(tile(2, c)), expected)
            assert abs(tile(2, c)[0, 0, 1] / 255 - (0.1 + 0.05 * index)) < 0.01
        else:
            assert not tile(2, c).any()
