"""Session fixtures shared by all tests: small synthetic datasets in the real on-disk formats.

`brats_root`: 20 BraTS2020-style subjects of 64 x 64 x 100 (default slice_range 60..90 fits;
subject 020 has a misnamed segmentation and is skipped by BraTSDataModule).
`anatomy_root`: the demo's set (`make-demo-data --kind anatomy`): 20 BraTS2020-style subjects of
128 x 128 x 100 whose brains come from the MNI152 template (written once, ~15 s).
`chestxray_root`: 60 ChestX-ray8-style PNGs of 64 x 64 (30 normal, 30 abnormal) with
Data_Entry_2017.csv, BBox_List_2017.csv and patient-disjoint split lists.
Both are written once per session; tests must treat them as read-only (copy them to change
them: see `brats_copy` / `chestxray_copy`).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from data_modules.synthetic import make_demo_data, write_brats, write_chestxray8

BRATS_SHAPE = (64, 64, 100)
BRATS_SUBJECTS = 20
CHEST_SIZE = 64
CHEST_NORMAL = 30
CHEST_ABNORMAL = 30


@pytest.fixture(scope="session")
def brats_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `MICCAI_BraTS2020_TrainingData` folder of a 20-subject synthetic set (read-only)."""
    return write_brats(
        tmp_path_factory.mktemp("brats"), n_subjects=BRATS_SUBJECTS, shape=BRATS_SHAPE, seed=0
    )


@pytest.fixture(scope="session")
def anatomy_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's realistic BraTS set, exactly as `make train` writes it (read-only)."""
    return make_demo_data("brats", tmp_path_factory.mktemp("anatomy"), kind="anatomy")


@pytest.fixture(scope="session")
def chestxray_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root of a 60-image synthetic ChestX-ray8 set (read-only)."""
    return write_chestxray8(
        tmp_path_factory.mktemp("chestxray8"),
        n_normal=CHEST_NORMAL,
        n_abnormal=CHEST_ABNORMAL,
        size=CHEST_SIZE,
        seed=0,
    )


@pytest.fixture
def brats_copy(brats_root: Path, tmp_path: Path) -> Callable[[], Path]:
    """Factory: a writable copy of `brats_root` (same folder name) under this test's tmp_path."""

    def make() -> Path:
        dst = tmp_path / "copy" / brats_root.name
        shutil.copytree(brats_root, dst)
        return dst

    return make


@pytest.fixture
def chestxray_copy(chestxray_root: Path, tmp_path: Path) -> Callable[[], Path]:
    """Factory: a writable copy of `chestxray_root` under this test's tmp_path."""

    def make() -> Path:
        dst = tmp_path / "chest_copy"
        shutil.copytree(chestxray_root, dst)
        return dst

    return make
