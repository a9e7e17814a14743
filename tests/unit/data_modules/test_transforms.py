"""Tests for data_modules/transforms.py: normalisation, resize, seeded joint augmentation."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from data_modules.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    TrainAugmentation,
    denormalize,
    normalize,
    resize,
)


def _square_image(size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    # an off-centre bright square on black, and the gt_mask that equals it
    gt_mask = np.zeros((size, size), bool)
    gt_mask[10:30, 16:40] = True
    image = np.repeat(gt_mask[..., None].astype(np.float32), 3, axis=2)
    return image, gt_mask


def test_normalize_matches_hand_values_and_layout() -> None:
    image = np.zeros((2, 3, 3), np.float32)
    image[1, 2] = (0.5, 1.0, 0.0)
    out = normalize(image)
    assert out.shape == (3, 2, 3) and out.dtype == torch.float32
    expected = [(0.5 - 0.485) / 0.229, (1.0 - 0.456) / 0.224, (0.0 - 0.406) / 0.225]
    assert torch.allclose(out[:, 1, 2], torch.tensor(expected), atol=1e-6)
    assert torch.allclose(out[:, 0, 0], -torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD))


def test_denormalize_inverts_normalize_and_clamps() -> None:
    image = np.random.default_rng(0).random((5, 7, 3), dtype=np.float32)
    back = denormalize(normalize(image))
    assert torch.allclose(back, torch.from_numpy(image).permute(2, 0, 1), atol=1e-6)
    batch = torch.stack([normalize(image), torch.full((3, 5, 7), 10.0)])  # (2, 3, H, W)
    out = denormalize(batch)
    assert out.shape == (2, 3, 5, 7) and out.max() == 1.0 and out.min() >= 0.0


def test_resize_area_for_image_nearest_for_masks() -> None:
    image = np.arange(16, dtype=np.float32).reshape(4, 4, 1).repeat(3, axis=2) / 16
    mask = np.zeros((4, 4), bool)
    mask[:2, :2] = True
    mask[3, 3] = True
    small, masks = resize(image, 2, {"gt_mask": mask})
    # 2x2 block means, computed by hand: (0+1+4+5)/4 = 2.5, (2+3+6+7)/4 = 4.5, ...
    assert np.allclose(small[..., 0] * 16, [[2.5, 4.5], [10.5, 12.5]])
    assert masks["gt_mask"].dtype == bool and set(np.unique(masks["gt_mask"])) <= {False, True}
    assert masks["gt_mask"][0, 0] and not masks["gt_mask"][0, 1]
    big, masks_big = resize(image, (8, 6), {"foreground": mask})
    assert big.shape == (8, 6, 3) and masks_big["foreground"].shape == (8, 6)
    assert resize(image, 4)[1] == {}


def test_eval_transform_is_resize_only() -> None:
    image, gt_mask = _square_image(64)
    out, masks = EvalTransform(32)(image, {"gt_mask": gt_mask})
    ref, ref_masks = resize(image, 32, {"gt_mask": gt_mask})
    assert np.array_equal(out, ref) and np.array_equal(masks["gt_mask"], ref_masks["gt_mask"])


def test_same_seed_same_output_different_seed_differs() -> None:
    image = np.random.default_rng(1).random((64, 64, 3), dtype=np.float32)
    fg = np.zeros((64, 64), bool)
    fg[8:56, 12:50] = True
    aug = TrainAugmentation(64, p_elastic=1.0)
    a_img, a_masks = aug(image, {"foreground": fg}, seed=7)
    aug(image, {"foreground": fg}, seed=99)  # calls in between must not matter
    b_img, b_masks = TrainAugmentation(64, p_elastic=1.0)(image, {"foreground": fg}, seed=7)
    c_img, c_masks = aug(image, {"foreground": fg}, seed=8)
    assert np.array_equal(a_img, b_img) and np.array_equal(
        a_masks["foreground"], b_masks["foreground"]
    )
    assert not np.array_equal(a_img, c_img)
    assert not np.array_equal(a_masks["foreground"], c_masks["foreground"])


def test_global_seeds_do_not_matter() -> None:
    image = np.random.default_rng(2).random((48, 48, 3), dtype=np.float32)
    aug = TrainAugmentation(48, p_elastic=1.0)
    outs = []
    for global_seed in (0, 12345):
        np.random.seed(global_seed)
        random.seed(global_seed)
        torch.manual_seed(global_seed)
        outs.append(aug(image, {}, seed=3)[0])
    assert np.array_equal(outs[0], outs[1])


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_masks_move_with_the_image(seed: int) -> None:
    image, gt_mask = _square_image(64)
    aug = TrainAugmentation(64, rotate=20.0, translate=0.1, p_elastic=1.0)
    out, masks = aug(image, {"gt_mask": gt_mask, "foreground": gt_mask.copy()}, seed=seed)
    moved = masks["gt_mask"]
    assert out.shape == (64, 64, 3) and out.dtype == np.float32 and moved.dtype == bool
    assert not np.array_equal(moved, gt_mask)  # it did move
    assert np.array_equal(moved, masks["foreground"])  # every mask got the same warp
    # the mask covers the bright pixels: image (linear) and mask (nearest) differ only at edges
    assert out[..., 0][moved].mean() > 0.9 and out[..., 0][~moved].mean() < 0.05
    assert np.mean(np.abs(out[..., 0] - moved) > 0.5) < 0.02


def test_borders_are_filled_with_zero_in_image_and_masks() -> None:
    image = np.ones((64, 64, 3), np.float32)
    fg = np.ones((64, 64), bool)
    aug = TrainAugmentation(64, rotate=30.0, scale=(0.7, 0.7), translate=0.0, p_elastic=0.0)
    out, masks = aug(image, {"foreground": fg}, seed=0)
    corners = (slice(0, 3), slice(0, 3))  # a 0.7x shrink leaves the corners empty
    assert np.all(out[corners] == 0.0) and not masks["foreground"][corners].any()
    assert out[32, 32, 0] == 1.0 and masks["foreground"][32, 32]


def test_output_is_resized_to_image_size() -> None:
    image, gt_mask = _square_image(64)
    out, masks = TrainAugmentation(32)(image, {"gt_mask": gt_mask}, seed=0)
    assert out.shape == (32, 32, 3) and masks["gt_mask"].shape == (32, 32)
    assert out.min() >= 0.0 and out.max() <= 1.0
