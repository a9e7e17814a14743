"""Range checks of the data modules' and the lesion synthesis' numeric settings: refused at
construction (before any file is read), the message naming the setting."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest

from data_modules.anomaly_synthesis import LesionSynthesizer
from data_modules.brats import BraTSDataModule
from data_modules.chestxray8 import ChestXray8DataModule

ROOT = "/no/such/root"  # never read: the constructors check their arguments only
IMAGE_SIZE = "image_size (--data.image_size) must be an integer in [8, 1024],"

COMMON = [
    ("shots", 0, "shots must be >= 1, got 0"),
    ("seed", -1, "seed must be >= 0, got -1"),
    ("test_seed", -2, "test_seed must be >= 0, got -2"),
    ("image_size", 0, f"{IMAGE_SIZE} got 0: below 8 px the image holds no cell"),
    ("image_size", 7, f"{IMAGE_SIZE} got 7: below 8 px the image holds no cell"),
    ("image_size", 1025, f"{IMAGE_SIZE} got 1025: below 8 px"),
    ("image_size", 100000, f"{IMAGE_SIZE} got 100000: below 8 px"),
    ("image_size", 64.0, f"{IMAGE_SIZE} got 64.0"),
    ("batch_size", 0, "batch_size must be >= 1, got 0"),
    ("steps_per_epoch", 0, "steps_per_epoch must be >= 1, got 0"),
    ("num_workers", -1, "num_workers must be >= 0, got -1"),
    ("lesion_min_fraction", 0.0, "min_fraction must be in (0, 1], got 0.0"),
    ("intensity_lesions", 1.5, "intensity_lesions must be in [0, 1], got 1.5"),
]
BRATS = [
    ("n_test_healthy", -1, "n_test_healthy must be >= 0, got -1"),
    ("n_test_tumorous", -1, "n_test_tumorous must be >= 0, got -1"),
    ("slice_range", (5, 4), "slice_range must be (lo, hi) with 0 <= lo <= hi"),
]
CHEST = [
    ("n_test", 0, "n_test must be >= 1, got 0"),
    ("test_abnormal_fraction", 1.5, "test_abnormal_fraction must be in [0, 1], got 1.5"),
    ("test_abnormal_fraction", math.nan, "test_abnormal_fraction must be in [0, 1], got nan"),
    ("bbox_frame", 0, "bbox_frame must be >= 1, got 0"),
    ("view", "LATERAL", "view must be one of ('PA', 'AP')"),
]


@pytest.mark.parametrize(("name", "value", "message"), COMMON + BRATS)
def test_brats_data_module_refuses_out_of_range_settings(
    name: str, value: Any, message: str
) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        BraTSDataModule(ROOT, **{"shots": 2, name: value})


@pytest.mark.parametrize(("name", "value", "message"), COMMON + CHEST)
def test_chestxray8_data_module_refuses_out_of_range_settings(
    name: str, value: Any, message: str
) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        ChestXray8DataModule(ROOT, **{"shots": 2, name: value})


def test_defaults_and_edges_are_accepted(tmp_path: Path) -> None:
    BraTSDataModule(ROOT, shots=1, seed=0, n_test_healthy=0, intensity_lesions=1.0)
    for size in (8, 1024):  # the image_size bounds: one feature cell; what memory holds
        BraTSDataModule(ROOT, shots=1, image_size=size)
        ChestXray8DataModule(ROOT, shots=1, image_size=size)
    ChestXray8DataModule(ROOT, shots=1, test_abnormal_fraction=0.0, view=None)
    ChestXray8DataModule(ROOT, shots=1, test_abnormal_fraction=1.0, view="ap")


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("feature_stride", 0, "feature_stride must be >= 1, got 0"),
        ("min_fraction", 1.2, "min_fraction must be in (0, 1], got 1.2"),
        ("beta_mean", -0.1, "beta_mean must be in [0, 1], got -0.1"),
        ("beta_std", -0.1, "beta_std must be >= 0, got -0.1"),
        ("threshold", 1.0, "threshold must be in (-1, 1), got 1.0"),
        ("brightness_std", -1.0, "brightness_std must be >= 0, got -1.0"),
        ("intensity_lesions", -0.5, "intensity_lesions must be in [0, 1], got -0.5"),
        ("beta_range", (0.8, 0.2), "beta_range must be (lo, hi) with 0 <= lo <= hi <= 1"),
        ("beta_range", (0.2, 1.5), "beta_range must be (lo, hi) with 0 <= lo <= hi <= 1"),
        ("perlin_scale_range", (3, 3), "perlin_scale_range must be (lo, hi) with 0 <= lo < hi"),
        ("contrast_range", (0.0, 2.0), "contrast_range must be (lo, hi) with 0 < lo <= hi"),
        ("intensity_range", (4.0, 1.0), "intensity_range must be (lo, hi) with 0 < lo <= hi"),
    ],
)
def test_lesion_synthesizer_refuses_out_of_range_settings(
    name: str, value: Any, message: str
) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        LesionSynthesizer(**{name: value})
    LesionSynthesizer()  # the defaults lie inside
