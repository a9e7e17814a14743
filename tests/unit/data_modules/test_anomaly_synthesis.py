"""Tests for data_modules/anomaly_synthesis.py: Perlin lesion masks and texture blending."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_modules.anomaly_synthesis import (
    LesionSynthesizer,
    blend,
    grid_fraction,
    perlin_noise,
    procedural_texture,
)
from data_modules.errors import DataError

SIZE = 64


def _ellipse(size: int, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def _grey_brain(size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    # grey image (3 equal channels) with structure inside an elliptic foreground, 0 outside
    fg = _ellipse(size, size / 2, size / 2, size * 0.42, size * 0.36)
    yy, xx = np.mgrid[0:size, 0:size]
    grey = (0.45 + 0.2 * np.sin(xx / 3.0) * np.cos(yy / 5.0)) * fg
    return np.repeat(grey[..., None], 3, axis=2).astype(np.float32), fg


def _write_texture_folder(root: Path, colour: bool, constant: float | None = None) -> Path:
    # DTD-style layout: images/<class>/*.jpg (+ one .png), coloured random patterns
    rng = np.random.default_rng(0)
    for cls in ("banded", "dotted"):
        (root / "images" / cls).mkdir(parents=True)
        for i in range(2):
            if constant is not None:
                pixels = np.full((40, 50, 3), round(constant * 255), np.uint8)
            else:
                pixels = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
                if not colour:
                    pixels[..., 1:] = pixels[..., :1]
            suffix = ".png" if (cls, i) == ("dotted", 1) else ".jpg"
            Image.fromarray(pixels).save(root / "images" / cls / f"{cls}_{i}{suffix}")
    return root


def _reference_perlin(shape: tuple[int, int], res: tuple[int, int], seed: int) -> np.ndarray:
    # slow per-pixel Perlin noise with the same lattice gradients (drawn the same way)
    angles = np.random.default_rng(seed).uniform(0.0, 2.0 * np.pi, size=(res[0] + 1, res[1] + 1))
    out = np.zeros(shape)
    for i in range(shape[0]):
        for j in range(shape[1]):
            y, x = (i + 0.5) * res[0] / shape[0], (j + 0.5) * res[1] / shape[1]
            y0, x0 = min(int(y), res[0] - 1), min(int(x), res[1] - 1)
            fy, fx = y - y0, x - x0

            def dot(dy: int, dx: int, fy: float = fy, fx: float = fx, y0: int = y0, x0: int = x0):
                a = angles[y0 + dy, x0 + dx]
                return math.sin(a) * (fy - dy) + math.cos(a) * (fx - dx)

            def fade(t: float) -> float:
                return 6 * t**5 - 15 * t**4 + 10 * t**3

            u, v = fade(fx), fade(fy)
            top = dot(0, 0) * (1 - u) + dot(0, 1) * u
            bottom = dot(1, 0) * (1 - u) + dot(1, 1) * u
            out[i, j] = math.sqrt(2.0) * (top * (1 - v) + bottom * v)
    return out


@pytest.mark.parametrize(
    ("shape", "res"), [((16, 24), (2, 3)), ((20, 20), (3, 3)), ((8, 8), (1, 1))]
)
def test_perlin_noise_matches_slow_reference(shape: tuple[int, int], res: tuple[int, int]) -> None:
    fast = perlin_noise(shape, res, np.random.default_rng(5))
    assert fast.shape == shape and fast.dtype == np.float32
    assert np.allclose(fast, _reference_perlin(shape, res, 5), atol=1e-5)


def test_perlin_noise_range_and_determinism() -> None:
    a = perlin_noise((64, 64), (4, 8), np.random.default_rng(1))
    b = perlin_noise((64, 64), (4, 8), np.random.default_rng(1))
    c = perlin_noise((64, 64), (4, 8), np.random.default_rng(2))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.abs(a).max() <= 1.0 and a.std() > 0.1


def test_grid_fraction_hand_values() -> None:
    mask = np.zeros((8, 12), bool)
    mask[0:4, 0:4] = True  # full cell (0, 0)
    mask[4, 4:8] = True  # a quarter of cell (1, 1)
    expected = np.array([[1.0, 0.0, 0.0], [0.0, 0.25, 0.0]])
    assert np.array_equal(grid_fraction(mask, 4), expected)
    assert grid_fraction(np.ones((10, 9), bool), 4).shape == (2, 2)  # partial cells dropped


def test_blend_formula_by_hand() -> None:
    image = np.full((2, 2, 3), 0.2, np.float32)
    texture = np.full((2, 2), 0.9, np.float32)
    mask = np.array([[True, False], [False, True]])
    out = blend(image, texture, mask, 0.25)
    assert np.allclose(out[0, 0], 0.2 * 0.75 + 0.9 * 0.25) and np.allclose(out[0, 1], 0.2)


def test_lesion_inside_foreground_and_never_empty_on_grid() -> None:
    image, fg = _grey_brain()
    synth = LesionSynthesizer()
    for seed in range(150):
        x_p, lesion_mask = synth(image, fg, np.random.default_rng([0, seed]))
        assert lesion_mask.dtype == bool and lesion_mask.shape == fg.shape
        assert not (lesion_mask & ~fg).any()
        assert grid_fraction(lesion_mask, 8).max() >= 0.5
        assert np.array_equal(x_p[~lesion_mask], image[~lesion_mask])  # only the lesion changes
        assert x_p.dtype == np.float32 and x_p.min() >= 0.0 and x_p.max() <= 1.0


@pytest.mark.parametrize("min_fraction", [0.5, 1.0])
def test_small_foreground_still_gets_a_grid_cell(min_fraction: float) -> None:
    image, _ = _grey_brain()
    fg = _ellipse(SIZE, 40, 22, 12, 10)  # a small blob: one full 8x8 cell, a few partial ones
    synth = LesionSynthesizer(min_fraction=min_fraction)
    for seed in range(100):
        _, lesion_mask = synth(image, fg, np.random.default_rng(seed))
        assert not (lesion_mask & ~fg).any()
        assert grid_fraction(lesion_mask, 8).max() >= min_fraction


def test_foreground_without_a_full_enough_cell_is_an_error() -> None:
    image, _ = _grey_brain()
    fg = np.zeros((SIZE, SIZE), bool)
    fg[10:13, 10:13] = True  # 9 pixels: under half of any 8x8 cell
    with pytest.raises(DataError, match="no 8x8 cell"):
        LesionSynthesizer()(image, fg, np.random.default_rng(0))


def test_deterministic_by_rng() -> None:
    image, fg = _grey_brain()
    synth = LesionSynthesizer()
    a = synth(image, fg, np.random.default_rng(3))
    b = synth(image, fg, np.random.default_rng(3))
    c = synth(image, fg, np.random.default_rng(4))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


def test_beta_recovered_from_blend_lies_in_range(tmp_path: Path) -> None:
    # A constant texture standardises to 0, so the matched texture is the foreground mean mu
    # and inside the lesion x_p = (1 - beta) x + beta mu: beta = (x_p - x) / (mu - x).
    textures = _write_texture_folder(tmp_path, colour=False, constant=0.7)
    fg = np.zeros((SIZE, SIZE), bool)
    fg[4:60, 4:60] = True
    grey = np.where(fg, 0.2, 0.0)
    grey[4:60, 32:60] = 0.6  # two levels: mu = 0.4 inside the foreground
    image = np.repeat(grey[..., None], 3, axis=2).astype(np.float32)
    synth = LesionSynthesizer(textures=textures, brightness_std=0.0)  # no offset: the texture is mu
    betas = []
    for seed in range(200):
        x_p, lesion_mask = synth(image, fg, np.random.default_rng(seed))
        x, xp = image[..., 0][lesion_mask], x_p[..., 0][lesion_mask]
        beta = (xp - x) / (0.4 - x)
        assert np.allclose(beta, beta[0], atol=1e-4)  # one beta per image
        betas.append(beta[0])
    betas = np.array(betas)
    assert betas.min() >= 0.2 - 1e-4 and betas.max() <= 0.8 + 1e-4
    assert abs(betas.mean() - 0.5) < 0.03 and 0.07 < betas.std() < 0.13


def test_sample_beta_is_clipped() -> None:
    synth = LesionSynthesizer(beta_std=1.0)
    betas = np.array([synth.sample_beta(np.random.default_rng(s)) for s in range(200)])
    assert betas.min() == 0.2 and betas.max() == 0.8


def test_grey_input_keeps_three_equal_channels_with_colour_textures(tmp_path: Path) -> None:
    textures = _write_texture_folder(tmp_path, colour=True)
    image, fg = _grey_brain()
    synth = LesionSynthesizer(textures=textures)
    for seed in range(20):
        x_p, lesion_mask = synth(image, fg, np.random.default_rng(seed))
        assert np.array_equal(x_p[..., 0], x_p[..., 1]) and np.array_equal(x_p[..., 0], x_p[..., 2])
        assert np.abs(x_p - image)[lesion_mask].max() > 0.05  # a lesion was really drawn


def test_grey_input_keeps_equal_channels_with_procedural_textures() -> None:
    image, fg = _grey_brain()
    x_p, lesion_mask = LesionSynthesizer()(image, fg, np.random.default_rng(0))
    assert np.array_equal(x_p[..., 0], x_p[..., 2]) and not np.array_equal(x_p, image)


def test_texture_is_matched_to_foreground_statistics_per_channel() -> None:
    rng = np.random.default_rng(0)
    fg = _ellipse(SIZE, 32, 32, 26, 22)
    image = np.zeros((SIZE, SIZE, 3), np.float32)
    for c, (mean, std) in enumerate([(0.3, 0.05), (0.5, 0.1), (0.6, 0.02)]):
        image[..., c] = np.where(fg, rng.normal(mean, std, (SIZE, SIZE)), 0.0)
    texture = rng.random((40, 30)).astype(np.float32) * 5.0 + 3.0  # arbitrary scale
    matched = LesionSynthesizer.match_intensity(texture, image, fg)
    assert matched.shape == (40, 30, 3)
    for c in range(3):
        values = image[..., c][fg]
        assert abs(matched[..., c].mean() - values.mean()) < 0.01
        assert abs(matched[..., c].std() - values.std()) < 0.01


def test_procedural_textures_vary_with_rng() -> None:
    a = procedural_texture((48, 40), np.random.default_rng(0))
    b = procedural_texture((48, 40), np.random.default_rng(0))
    c = procedural_texture((48, 40), np.random.default_rng(1))
    assert a.shape == (48, 40) and np.isfinite(a).all()
    assert np.array_equal(a, b) and not np.allclose(a, c)
    assert abs(a.std() - 1.0) < 1e-3


def test_textures_from_folder_are_used(tmp_path: Path) -> None:
    textures = _write_texture_folder(tmp_path, colour=True)
    synth = LesionSynthesizer(textures=textures)
    assert len(synth.texture_files) == 4  # .jpg and .png, both classes
    tex = synth.texture((SIZE, SIZE), np.random.default_rng(0))
    assert tex.shape == (SIZE, SIZE) and tex.min() >= 0.0 and tex.max() <= 1.0


def test_missing_texture_folder_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="images/<class>/\\*.jpg"):
        LesionSynthesizer(textures=tmp_path / "dtd")
    (tmp_path / "empty" / "images" / "banded").mkdir(parents=True)
    with pytest.raises(DataError, match="no texture images"):
        LesionSynthesizer(textures=tmp_path / "empty")


def test_texture_contrast_and_brightness_vary_around_the_foreground() -> None:
    # The matched texture keeps the foreground's statistics on average, with a spread in contrast
    # and brightness (no one-directional "smoother" or "brighter" shortcut).
    texture = np.random.default_rng(0).uniform(-1, 1, size=(32, 32)).astype(np.float32)
    image = np.full((32, 32, 3), 0.5, np.float32)
    image[(np.arange(32) // 2) % 2 == 0] = 0.3  # row pairs: mean 0.4, std 0.1 (also subsampled)
    fg = np.ones((32, 32), bool)
    base = LesionSynthesizer.match_intensity(texture, image, fg)
    out = LesionSynthesizer.match_intensity(texture, image, fg, contrast=2.0, shift=1.0)
    assert np.isclose(base.mean(), 0.4, atol=1e-3) and np.isclose(base.std(), 0.1, atol=1e-3)
    assert np.isclose(out.mean(), 0.5, atol=1e-3) and np.isclose(out.std(), 0.2, atol=1e-3)
