"""ChestXray8DataModule: patient-disjoint split, box masks, PNG modes, items and bad input."""

from __future__ import annotations

import csv
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_modules.chestxray8 import ChestXray8DataModule, load_grey_png
from data_modules.errors import DataError
from data_modules.transforms import denormalize

SMALL = {"n_test": 12, "image_size": 64, "batch_size": 4}


def _dm(root: Path, shots: int = 2, **kw: object) -> ChestXray8DataModule:
    dm = ChestXray8DataModule(str(root), shots=shots, **{**SMALL, **kw})  # type: ignore[arg-type]
    dm.setup("fit")
    return dm


def _rows(root: Path) -> dict[str, dict[str, str]]:
    with open(root / "Data_Entry_2017.csv", newline="") as f:
        return {r["Image Index"]: r for r in csv.DictReader(f)}


def _boxes(root: Path) -> dict[str, list[tuple[float, ...]]]:
    out: dict[str, list[tuple[float, ...]]] = {}
    with open(root / "BBox_List_2017.csv", newline="") as f:
        reader = csv.reader(f)
        next(reader)
        for row in reader:
            out.setdefault(row[0], []).append(tuple(float(v) for v in row[2:6]))
    return out


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
    }


@pytest.fixture(scope="module")
def dm0(chestxray_root: Path) -> ChestXray8DataModule:
    return _dm(chestxray_root)


# ----------------------------------------------------------------------------- split protocol
def test_split_equals_the_expected_list_and_depends_on_seed(
    dm0: ChestXray8DataModule, chestxray_root: Path
) -> None:
    # Fixed by the synthetic set of conftest.py (write_chestxray8 seed 0): update if it changes.
    assert dm0.train_subjects == ["18", "19"]
    assert [s.subject for s in dm0.split.train] == ["00000018_000.png", "00000019_001.png"]
    other = _dm(chestxray_root, seed=1)
    assert other.train_subjects == ["22", "5"]
    assert [s.subject for s in other.split.test] == [s.subject for s in dm0.split.test]


def test_patients_disjoint_and_training_is_normal_pa(
    dm0: ChestXray8DataModule, chestxray_root: Path
) -> None:
    rows = _rows(chestxray_root)
    test_list = set((chestxray_root / "test_list.txt").read_text().split())
    for seed, shots in ((0, 2), (1, 3), (2, 4)):
        dm = _dm(chestxray_root, shots=shots, seed=seed)
        train_patients = {rows[s.subject]["Patient ID"] for s in dm.split.train}
        test_patients = {rows[s.subject]["Patient ID"] for s in dm.split.test}
        val_patients = {rows[s.subject]["Patient ID"] for s in dm.val_dataset().samples}
        assert len(train_patients) == shots  # K distinct patients
        assert not train_patients & test_patients and not val_patients & test_patients
        assert val_patients <= train_patients
        assert not train_patients & set(dm.test_subjects)
        assert all(s.subject in test_list for s in dm.split.test)
        for s in dm.split.train:
            assert rows[s.subject]["Finding Labels"] == "No Finding"
            assert rows[s.subject]["View Position"] == "PA"


def test_test_set_counts_and_masks(dm0: ChestXray8DataModule, chestxray_root: Path) -> None:
    rows, boxes = _rows(chestxray_root), _boxes(chestxray_root)
    test = dm0.split.test
    assert sum(s.label == 0 for s in test) == 6 and sum(s.label == 1 for s in test) == 6
    for s in test:
        assert s.label == int(rows[s.subject]["Finding Labels"] != "No Finding")
        assert s.foreground.all() and s.slice == 0
        if s.label == 0:
            assert s.has_mask and not s.gt_mask.any()
        else:
            assert s.has_mask == (s.subject in boxes)
            assert s.gt_mask.any() == (s.subject in boxes)
    assert any(s.label == 1 and not s.has_mask for s in test)
    assert any(s.label == 1 and s.has_mask for s in test)


@pytest.mark.parametrize("image_size", [64, 32])
def test_box_mask_is_scaled_from_the_1024_frame(chestxray_root: Path, image_size: int) -> None:
    """PNGs are 64 px: a box (x, y, w, h) in the 1024 frame covers x*64/1024 ... at the PNG size,
    then is resized (nearest) to image_size."""
    boxes = _boxes(chestxray_root)
    dm = _dm(chestxray_root, image_size=image_size)
    boxed = [s for s in dm.split.test if s.subject in boxes]
    assert boxed
    for s in boxed:
        ref = np.zeros((64, 64), dtype=bool)
        for x, y, w, h in boxes[s.subject]:
            f = 64 / 1024
            ref[
                int(np.floor(y * f)) : int(np.ceil((y + h) * f)),
                int(np.floor(x * f)) : int(np.ceil((x + w) * f)),
            ] = True
        step = 64 // image_size
        np.testing.assert_array_equal(s.gt_mask, ref[::step, ::step])


def test_split_without_lists_is_patient_disjoint(chestxray_copy: Callable[[], Path]) -> None:
    root = chestxray_copy()
    (root / "train_val_list.txt").unlink()
    (root / "test_list.txt").unlink()
    rows = _rows(root)
    a = _dm(root, seed=0)
    b = _dm(root, seed=1)
    assert [s.subject for s in a.split.test] == [s.subject for s in b.split.test]
    for dm in (a, b):
        test_patients = {rows[s.subject]["Patient ID"] for s in dm.split.test}
        assert test_patients <= set(dm.test_subjects)
        assert not set(dm.train_subjects) & set(dm.test_subjects)
    c = _dm(root, test_seed=3)
    assert [s.subject for s in c.split.test] != [s.subject for s in a.split.test]


def test_view_filter_and_nested_image_folders(
    chestxray_copy: Callable[[], Path], dm0: ChestXray8DataModule
) -> None:
    root = chestxray_copy()
    rows = _rows(root)
    # The tarball layout: images_001/images/*.png
    (root / "images_001").mkdir()
    shutil.move(root / "images", root / "images_001" / "images")
    dm = _dm(root)
    assert dm.train_subjects == dm0.train_subjects
    assert [s.subject for s in dm.split.test] == [s.subject for s in dm0.split.test]
    everything = _dm(root, view=None, n_test=14)
    views = {
        rows[s.subject]["View Position"] for s in everything.split.test + everything.split.train
    }
    assert everything.split.info["images"] == 60 and dm.split.info["images"] == 53
    assert views <= {"PA", "AP"}


# ----------------------------------------------------------------------------- images and items
def test_png_modes_become_one_grey_channel(tmp_path: Path) -> None:
    grey = np.linspace(0, 1, 16 * 16, dtype=np.float32).reshape(16, 16)
    g8 = np.rint(grey * 255).astype(np.uint8)
    Image.fromarray(g8).save(tmp_path / "l.png")
    Image.fromarray(np.rint(grey * 65535).astype(np.uint16)).save(tmp_path / "i16.png")
    Image.fromarray(np.stack([g8] * 3, -1)).save(tmp_path / "rgb.png")
    Image.fromarray(np.stack([g8] * 3 + [np.full_like(g8, 128)], -1)).save(tmp_path / "rgba.png")
    with Image.open(tmp_path / "i16.png") as im:
        assert im.mode.startswith("I")
    for name in ("l", "i16", "rgb", "rgba"):
        out = load_grey_png(tmp_path / f"{name}.png")
        assert out.shape == (16, 16) and out.dtype == np.float32
        np.testing.assert_allclose(out, grey, atol=1 / 255 + 1e-6, err_msg=name)
    # A coloured pixel: ITU-R 601 luma.
    Image.fromarray(np.full((2, 2, 3), (255, 0, 0), np.uint8)).save(tmp_path / "red.png")
    np.testing.assert_allclose(load_grey_png(tmp_path / "red.png"), 76 / 255, atol=1 / 255)


def test_item_keys_dtypes_and_grey_channels(dm0: ChestXray8DataModule) -> None:
    item = dm0.test_dataset()[3]
    assert set(item) == {
        "image",
        "gt_mask",
        "foreground",
        "has_mask",
        "label",
        "subject",
        "slice",
        "index",
    }
    assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
    assert item["gt_mask"].dtype == torch.bool and item["foreground"].all()
    assert item["slice"] == 0 and item["index"] == 3 and item["subject"].endswith(".png")
    rgb = denormalize(item["image"])
    assert torch.allclose(rgb[0], rgb[2], atol=1e-6)
    train = dm0.train_dataset()[0]
    assert train["lesion_mask"].shape == (1, 64, 64) and train["lesion_mask"].sum() > 0
    lesion = denormalize(train["lesion_image"])
    assert torch.allclose(lesion[0], lesion[1], atol=1e-5)  # synthetic lesions stay grey
    out = dm0.anchor_images(copies=1)
    assert out["image"].shape == (4, 3, 64, 64) and out["foreground"].shape == (4, 1, 64, 64)
    info = dm0.preprocessing()
    assert info["dataset"] == "chestxray8" and info["view"] == "PA" and info["image_size"] == 64


def test_epoch_length_and_loaders(chestxray_root: Path) -> None:
    for shots in (1, 3):
        dm = _dm(chestxray_root, shots=shots, steps_per_epoch=2)
        assert len(dm.train_dataset()) == 8 and len(dm.train_dataloader()) == 2
        batch = next(iter(dm.test_dataloader()))
        assert batch["image"].shape == (4, 3, 64, 64) and len(batch["subject"]) == 4


def test_nothing_is_written_into_the_root(chestxray_root: Path) -> None:
    before = _snapshot(chestxray_root)
    dm = _dm(chestxray_root)
    next(iter(dm.train_dataloader()))
    assert _snapshot(chestxray_root) == before


# ----------------------------------------------------------------------------- bad input
def test_missing_root() -> None:
    with pytest.raises(DataError, match="nowhere_chest: ChestX-ray8 root folder does not exist"):
        _dm(Path("/tmp/nowhere_chest"))


def test_csv_without_expected_columns(chestxray_copy: Callable[[], Path]) -> None:
    root = chestxray_copy()
    text = (root / "Data_Entry_2017.csv").read_text()
    (root / "Data_Entry_2017.csv").write_text(text.replace("Patient ID", "PatientID", 1))
    with pytest.raises(DataError, match=r"Data_Entry_2017.csv: missing columns \['Patient ID'\]"):
        _dm(root)
    (root / "Data_Entry_2017.csv").write_text(text)
    bbox = (root / "BBox_List_2017.csv").read_text()
    (root / "BBox_List_2017.csv").write_text(bbox.replace("Bbox [x", "Box x", 1))
    with pytest.raises(DataError, match=r"BBox_List_2017.csv: missing columns \['Bbox \[x'\]"):
        _dm(root)


def test_too_many_shots_or_test_images(chestxray_root: Path) -> None:
    with pytest.raises(
        DataError, match=r"only \d+ training patients with a normal image .* fewer than shots=30"
    ):
        _dm(chestxray_root, shots=30)
    with pytest.raises(
        DataError,
        match=r"6 normal and 10 abnormal images .* n_test=100 .* lower n_test \(at most 12\)",
    ):
        _dm(chestxray_root, n_test=100)


def test_unreadable_png(
    chestxray_copy: Callable[[], Path], dm0: ChestXray8DataModule, caplog: pytest.LogCaptureFixture
) -> None:
    root = chestxray_copy()
    victim = dm0.split.test[0].subject
    (root / "images" / victim).write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match=f"{victim}: cannot read PNG image"):
        _dm(root, strict=True)
    with caplog.at_level(logging.WARNING):
        dm = _dm(root)
    assert f"{victim}: cannot read PNG image" in caplog.text
    assert victim not in {s.subject for s in dm.split.test}
    assert len(dm.split.test) == 12  # another test image took its place
    assert list(dm.split.info["skipped_images"]) == [victim]  # for metrics.json, with why
    assert "cannot read PNG image" in dm.split.info["skipped_images"][victim]
