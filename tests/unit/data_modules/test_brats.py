"""BraTSDataModule: split protocol, preprocessing, items, determinism, cache and bad input."""

from __future__ import annotations

import gzip
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from data_modules.brats import BraTSDataModule, normalize_volume
from data_modules.errors import DataError
from data_modules.transforms import denormalize
from pathoscope.batches import TrainBatch

SMALL = {"n_test_healthy": 30, "n_test_tumorous": 40, "image_size": 64, "batch_size": 4}
SUBJECT = "BraTS20_Training_{:03d}".format


def _dm(root: Path, shots: int = 2, **kw: object) -> BraTSDataModule:
    dm = BraTSDataModule(str(root), shots=shots, **{**SMALL, **kw})  # type: ignore[arg-type]
    dm.setup("fit")
    return dm


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
    }


def _load(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def _file(root: Path, subject: str, key: str) -> Path:
    return root / subject / f"{subject}_{key}.nii.gz"


def _strict_ready(root: Path) -> Path:
    """Give the copy's subject 020 its correct seg name, so strict=True only trips on the test's
    own damage."""
    (root / SUBJECT(20) / "W39_1998.09.19_Segm.nii.gz").rename(_file(root, SUBJECT(20), "seg"))
    return root


def _save(array: np.ndarray, path: Path) -> None:
    nib.save(nib.Nifti1Image(array, np.diag([-1.0, -1.0, 1.0, 1.0])), path)


@pytest.fixture(scope="module")
def dm0(brats_root: Path) -> BraTSDataModule:
    """shots=2, seed=0 on the session dataset (read-only use)."""
    return _dm(brats_root)


# ----------------------------------------------------------------------------- split protocol
def test_split_equals_the_expected_list_and_depends_on_seed(
    dm0: BraTSDataModule, brats_root: Path
) -> None:
    # Fixed by the synthetic set of conftest.py (write_brats seed 0): update if the writer changes.
    assert dm0.train_subjects == [SUBJECT(1), SUBJECT(16)]
    assert [s.slice for s in dm0.split.train] == [75, 80]
    assert dm0.test_subjects == [SUBJECT(i) for i in (8, 10, 12, 18, 19)]
    other = _dm(brats_root, seed=1)
    assert other.train_subjects == [SUBJECT(9), SUBJECT(11)]
    assert other.train_subjects != dm0.train_subjects


def test_test_pool_is_fixed_across_seeds_and_shots_and_disjoint(
    dm0: BraTSDataModule, brats_root: Path
) -> None:
    test_items = [(s.subject, s.slice) for s in dm0.split.test]
    for seed, shots in ((1, 2), (2, 4), (3, 1)):
        dm = _dm(brats_root, shots=shots, seed=seed)
        assert dm.test_subjects == dm0.test_subjects
        assert [(s.subject, s.slice) for s in dm.split.test] == test_items
        assert len(dm.train_subjects) == shots == len(set(dm.train_subjects))
        assert not set(dm.train_subjects) & set(dm.test_subjects)
        assert {s.subject for s in dm.val_dataset().samples} <= set(dm.train_subjects)
    assert _dm(brats_root, test_seed=1).test_subjects != dm0.test_subjects


def test_test_counts_labels_and_masks_match_the_files(
    dm0: BraTSDataModule, brats_root: Path
) -> None:
    test = dm0.split.test
    assert sum(s.label == 0 for s in test) == 30 and sum(s.label == 1 for s in test) == 40
    assert len({(s.subject, s.slice) for s in test}) == 70  # no duplicates
    segs = {s: _load(_file(brats_root, s, "seg")) for s in dm0.test_subjects}
    for s in test:
        gt = segs[s.subject][:, :, s.slice] > 0  # 64 x 64 = image_size: no resize
        np.testing.assert_array_equal(s.gt_mask, gt)
        assert s.label == int(gt.any()) and s.has_mask
        assert 60 <= s.slice <= 90


def test_slice_range_is_inclusive_and_training_slices_are_healthy(brats_root: Path) -> None:
    """Training + validation slices of each training subject = its healthy slices in 60..90."""
    dm = _dm(brats_root, shots=12, n_test_healthy=5, n_test_tumorous=5)
    val_slices: dict[str, list[int]] = {}
    n_val = 0
    for k, train in enumerate(dm.split.train):
        others = [s.slice for s in dm.split.val_normal[k]]
        val_slices[train.subject] = sorted([train.slice, *others])
        n_val += len(others) or 2  # a subject without others gets 2 augmented copies
    full = 0
    for subject, slices in val_slices.items():
        seg = _load(_file(brats_root, subject, "seg"))
        healthy = [k for k in range(60, 91) if not seg[:, :, k].any()]
        assert slices == healthy
        full += len(healthy) == 31
    assert full >= 1  # a tumour-free range: all 31 slices, both ends included
    assert len(dm.val_dataset()) == 2 * n_val


def test_custom_slice_range(brats_root: Path) -> None:
    dm = _dm(brats_root, slice_range=(70, 72), n_test_healthy=3, n_test_tumorous=3)
    assert {s.slice for s in dm.split.test + dm.split.train} <= {70, 71, 72}


# ----------------------------------------------------------------------------- preprocessing
def test_per_volume_normalisation_matches_a_reference(brats_root: Path) -> None:
    dm = _dm(brats_root, intensity_norm="percentile")  # the former default, still offered
    for sample in dm.split.train + dm.split.test[:3]:
        vol = _load(_file(brats_root, sample.subject, "flair")).astype(np.float64)
        top = np.percentile(vol[vol > 0], 99.5)
        expected = np.clip(vol[:, :, sample.slice], 0, top) / top
        assert sample.image.shape == (64, 64, 1)
        np.testing.assert_allclose(sample.image[:, :, 0], expected, atol=1e-5)
        np.testing.assert_array_equal(sample.foreground, vol[:, :, sample.slice] > 0)


def test_median_normalisation_matches_a_reference(brats_root: Path) -> None:
    dm = _dm(brats_root, intensity_norm="median")
    assert dm.preprocessing()["intensity_norm"] == "median"
    for sample in dm.split.train + dm.split.test[:3]:
        vol = _load(_file(brats_root, sample.subject, "flair")).astype(np.float64)
        top = 2.0 * np.median(vol[vol > 0])
        expected = np.clip(vol[:, :, sample.slice], 0, top) / top
        np.testing.assert_allclose(sample.image[:, :, 0], expected, atol=1e-5)


def test_median_normalisation_ignores_a_bright_lesion() -> None:
    """A lesion of 3 % of the brain at 3x the tissue level moves p99.5 (and with it every normal
    voxel) but leaves the median scaling of the normal tissue unchanged."""
    rng = np.random.default_rng(0)
    tissue = rng.uniform(100.0, 200.0, size=(20, 20, 25)).astype(np.float32)
    lesioned = tissue.copy()
    lesioned[:5, :5, :12] = 450.0  # 300 of 10,000 voxels
    normal = np.ones(tissue.shape, bool)
    normal[:5, :5, :12] = False
    for method, moves in (("percentile", True), ("median", False)):
        a = normalize_volume(tissue, method)[normal]
        b = normalize_volume(lesioned, method)[normal]
        ratio = float(np.median(b) / np.median(a))
        assert (ratio < 0.8) if moves else (abs(ratio - 1.0) < 0.02), (method, ratio)
    with pytest.raises(ValueError, match="intensity_norm"):
        normalize_volume(tissue, "zscore")
    with pytest.raises(ValueError, match="intensity_norm"):
        _dm(Path("."), intensity_norm="zscore")


def test_resize_and_three_modalities(brats_root: Path) -> None:
    dm = _dm(brats_root, modality=["flair", "t1ce", "t2"], image_size=32)
    sample = dm.split.test[0]
    assert sample.image.shape == (32, 32, 3) and sample.gt_mask.shape == (32, 32)
    flair = _load(_file(brats_root, sample.subject, "flair"))[:, :, sample.slice].astype(float)
    t2 = _load(_file(brats_root, sample.subject, "t2"))[:, :, sample.slice].astype(float)
    # Channels are the modalities in order (64 -> 32 by 2x2 area averaging, up to the scale).
    assert (
        np.corrcoef(
            sample.image[:, :, 0].ravel(), flair.reshape(32, 2, 32, 2).mean((1, 3)).ravel()
        )[0, 1]
        > 0.99
    )
    assert (
        np.corrcoef(sample.image[:, :, 2].ravel(), t2.reshape(32, 2, 32, 2).mean((1, 3)).ravel())[
            0, 1
        ]
        > 0.99
    )
    item = dm.test_dataset()[0]
    assert item["image"].shape == (3, 32, 32)
    rgb = denormalize(item["image"])
    assert not torch.allclose(rgb[0], rgb[2], atol=1e-3)
    assert set(np.unique(sample.gt_mask)) <= {False, True}  # nearest: still a bool mask
    with pytest.raises(ValueError, match="modality"):
        BraTSDataModule(str(brats_root), shots=2, modality=["flair", "t1"])


def test_preprocessing_description(dm0: BraTSDataModule) -> None:
    info = dm0.preprocessing()
    assert info["dataset"] == "brats" and info["modality"] == ["flair"]
    assert info["slice_range"] == [60, 90] and info["image_size"] == 64
    assert info["intensity_norm"] == "median"  # the default
    assert "median" in str(info["normalization"]) and "vol[:, :, k]" in str(info["orientation"])


def _flair(root: Path, subject: str) -> Path:
    return root / subject / f"{subject}_flair.nii.gz"


def test_preprocessing_records_training_geometry(brats_root: Path) -> None:
    """axcodes / voxel spacing from the training subjects' headers, and the foreground fraction of
    their healthy in-range slices, worked out here from the raw files (resizing changes it < 0.02)."""
    dm = BraTSDataModule(
        str(brats_root), shots=2, image_size=64, n_test_healthy=6, n_test_tumorous=6
    )
    assert "axcodes" not in dm.preprocessing()  # no split yet: nothing to read
    dm.setup("fit")
    info = dm.preprocessing()
    assert info["axcodes"] == ["L", "P", "S"]  # synthetic BraTS: the LPS affine diag(-1, -1, 1)
    assert info["voxel_spacing"] == [1.0, 1.0, 1.0]
    samples = [*dm.split.train, *(s for group in dm.split.val_normal for s in group)]
    expected = np.mean(
        [
            (
                np.asarray(nib.load(str(_flair(brats_root, s.subject))).dataobj)[:, :, s.slice] > 0
            ).mean()
            for s in samples
        ]
    )
    assert abs(info["foreground_fraction"] - expected) < 0.02


# ----------------------------------------------------------------------------- items and loaders
def test_item_keys_dtypes_and_shapes(dm0: BraTSDataModule) -> None:
    item = dm0.test_dataset()[5]
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
    assert item["gt_mask"].shape == (1, 64, 64) and item["gt_mask"].dtype == torch.bool
    assert item["foreground"].shape == (1, 64, 64) and item["foreground"].dtype == torch.bool
    assert isinstance(item["has_mask"], bool) and isinstance(item["label"], int)
    assert (
        isinstance(item["subject"], str) and isinstance(item["slice"], int) and item["index"] == 5
    )
    rgb = denormalize(item["image"])
    assert torch.allclose(rgb[0], rgb[1], atol=1e-6) and torch.allclose(rgb[1], rgb[2], atol=1e-6)
    train = dm0.train_dataset()[3]
    assert set(train) == {"image", "lesion_image", "lesion_mask", "foreground", "index"}
    assert train["image"].shape == train["lesion_image"].shape == (3, 64, 64)
    assert train["lesion_mask"].dtype == torch.float32 and train["lesion_mask"].shape == (1, 64, 64)
    assert set(train["lesion_mask"].unique().tolist()) == {0.0, 1.0}
    assert not bool((train["lesion_mask"].bool() & ~train["foreground"]).any())
    assert train["index"] == 3 % 2


def test_validation_split(dm0: BraTSDataModule) -> None:
    val = dm0.val_dataset().samples
    normal, lesion = val[0::2], val[1::2]
    assert len(normal) == len(lesion) > 0
    assert all(s.label == 0 and not s.gt_mask.any() and s.has_mask for s in normal)
    assert all(s.label == 1 and s.gt_mask.any() and s.has_mask for s in lesion)
    assert all(not (s.gt_mask & ~s.foreground).any() for s in lesion)
    train_slices = {(s.subject, s.slice) for s in dm0.split.train}
    assert not {(s.subject, s.slice) for s in normal} & train_slices
    # Deterministic: a second module gives the same validation images.
    again = BraTSDataModule(dm0.root, shots=2, **SMALL)  # type: ignore[arg-type]
    again.setup()
    np.testing.assert_array_equal(again.val_dataset().samples[1].image, val[1].image)


def test_epoch_length_does_not_depend_on_shots(brats_root: Path) -> None:
    for shots in (1, 4):
        dm = BraTSDataModule(str(brats_root), shots=shots, steps_per_epoch=3, **SMALL)
        dm.setup()
        assert len(dm.train_dataset()) == 12
        assert len(dm.train_dataloader()) == 3


def _batches(dm: BraTSDataModule, epoch: int) -> list[TrainBatch]:
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)  # type: ignore[union-attr]
    return list(loader)


def test_same_seed_same_batches_whatever_num_workers(brats_root: Path) -> None:
    kw = {**SMALL, "steps_per_epoch": 2, "batch_size": 3}
    a = BraTSDataModule(str(brats_root), shots=2, num_workers=0, **kw)  # type: ignore[arg-type]
    b = BraTSDataModule(str(brats_root), shots=2, num_workers=2, **kw)  # type: ignore[arg-type]
    a.setup()
    b.setup()
    for epoch in (0, 1):
        for x, y in zip(_batches(a, epoch), _batches(b, epoch), strict=True):
            for name, value in vars(x).items():
                other = getattr(y, name)
                assert (value is None and other is None) or torch.equal(value, other), name
    e0, e1 = _batches(a, 0)[0], _batches(a, 1)[0]
    assert not torch.equal(e0.image, e1.image)  # a new epoch brings new augmentations


def test_anchor_images(dm0: BraTSDataModule) -> None:
    out = dm0.anchor_images(copies=2, seed=0)
    assert out.image.shape == (6, 3, 64, 64) and out.foreground.shape == (6, 1, 64, 64)
    assert out.foreground.dtype == torch.bool
    raw = dm0.split.train[1]
    expected = np.repeat(raw.image, 3, axis=2)
    np.testing.assert_allclose(
        denormalize(out.image[1]).permute(1, 2, 0).numpy(), expected, atol=1e-5
    )
    assert not torch.equal(out.image[2], out.image[0])  # augmented copy of image 0
    assert torch.equal(dm0.anchor_images(copies=2, seed=0).image, out.image)
    assert not torch.equal(dm0.anchor_images(copies=2, seed=1).image[2:], out.image[2:])


# ----------------------------------------------------------------------------- root, cache, files
def test_root_may_be_parent_or_uncompressed(
    brats_copy: Callable[[], Path], dm0: BraTSDataModule
) -> None:
    root = brats_copy()
    assert _dm(root.parent).train_subjects == dm0.train_subjects
    for f in sorted(root.rglob("*.nii.gz")):  # the Kaggle copy ships plain .nii files
        f.with_suffix("").write_bytes(gzip.decompress(f.read_bytes()))
        f.unlink()
    dm = _dm(root)
    assert dm.train_subjects == dm0.train_subjects
    np.testing.assert_array_equal(dm.split.test[7].image, dm0.split.test[7].image)


def test_nothing_is_written_into_the_root_and_cache_works(brats_root: Path, tmp_path: Path) -> None:
    before = _snapshot(brats_root)
    cache = tmp_path / "cache"
    first = _dm(brats_root, cache_dir=str(cache))
    entries = sorted(p.name for p in cache.iterdir())
    assert entries and all(p.endswith(".npz") for p in entries)
    second = _dm(brats_root, cache_dir=str(cache))  # from the cache
    assert sorted(p.name for p in cache.iterdir()) == entries
    assert second.train_subjects == first.train_subjects
    for a, b in zip(first.split.test, second.split.test, strict=True):
        np.testing.assert_array_equal(a.image, b.image)
    _dm(brats_root, cache_dir=str(cache), image_size=32)  # another key: new entries
    assert len(list(cache.iterdir())) > len(entries)
    assert _snapshot(brats_root) == before


def test_cache_dir_inside_root_is_refused(brats_root: Path) -> None:
    before = _snapshot(brats_root)
    with pytest.raises(DataError, match="inside the data root"):
        _dm(brats_root, cache_dir=str(brats_root / "cache"))
    assert _snapshot(brats_root) == before


# ----------------------------------------------------------------------------- bad input
def test_missing_root() -> None:
    with pytest.raises(DataError, match="does_not_exist: BraTS root folder does not exist"):
        _dm(Path("/tmp/does_not_exist"))


def test_misnamed_seg_is_reported_and_skipped(
    brats_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        dm = _dm(brats_root, shots=4, seed=5)
    assert "BraTS20_Training_020/BraTS20_Training_020_seg.nii.gz: missing" in caplog.text
    assert "W39_1998.09.19_Segm.nii.gz" in caplog.text  # says what the folder has
    assert SUBJECT(20) not in dm.train_subjects + dm.test_subjects
    # Recorded with the reason, for metrics.json and summary.md (found when scanning).
    (reason,) = dm.split.info["skipped_subjects"].values()
    assert (
        list(dm.split.info["skipped_subjects"]) == [SUBJECT(20)] and "seg.nii.gz: missing" in reason
    )
    with pytest.raises(DataError, match="BraTS20_Training_020_seg.nii.gz: missing"):
        _dm(brats_root, strict=True)


def test_missing_modality(brats_copy: Callable[[], Path], caplog: pytest.LogCaptureFixture) -> None:
    root = _strict_ready(brats_copy())
    _file(root, SUBJECT(3), "t1ce").unlink()
    dm = _dm(root)  # flair only: subject 3 is fine
    with caplog.at_level(logging.WARNING):
        dm = _dm(root, modality=["flair", "t1ce", "t2"])
    assert "BraTS20_Training_003/BraTS20_Training_003_t1ce.nii.gz: missing" in caplog.text
    assert SUBJECT(3) not in dm.train_subjects + dm.test_subjects
    with pytest.raises(DataError, match="BraTS20_Training_003_t1ce.nii.gz: missing"):
        _dm(root, modality=["flair", "t1ce", "t2"], strict=True)


def test_truncated_and_unreadable_volumes(
    brats_copy: Callable[[], Path], dm0: BraTSDataModule, caplog: pytest.LogCaptureFixture
) -> None:
    root = _strict_ready(brats_copy())
    victim = dm0.train_subjects[0]  # loaded in full by the clean split
    path = _file(root, victim, "flair")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])  # truncated gzip stream, header intact
    with pytest.raises(DataError, match=f"{victim}_flair.nii.gz: cannot read the volume data"):
        _dm(root, strict=True)
    with caplog.at_level(logging.WARNING):
        dm = _dm(root)
    assert f"{victim}_flair.nii.gz: cannot read the volume data" in caplog.text
    assert victim not in dm.train_subjects + dm.test_subjects and len(dm.train_subjects) == 2
    assert dm.test_subjects == dm0.test_subjects  # only the victim's place changed
    # Not a NIfTI file at all.
    shutil.rmtree(root / victim)
    _file(root, SUBJECT(2), "flair").write_bytes(b"not a nifti file")
    with pytest.raises(
        DataError, match=r"BraTS20_Training_002_flair.nii.gz: cannot read NIfTI header"
    ):
        _dm(root, strict=True)


def test_shape_mismatch_and_4d_volume(brats_copy: Callable[[], Path]) -> None:
    root = _strict_ready(brats_copy())
    seg = _load(_file(root, SUBJECT(4), "seg"))
    _save(seg[:60], _file(root, SUBJECT(4), "seg"))
    with pytest.raises(
        DataError,
        match=r"BraTS20_Training_004_seg.nii.gz: shape \(60, 64, 100\) does not match "
        r".*BraTS20_Training_004_flair.nii.gz shape \(64, 64, 100\)",
    ):
        _dm(root, strict=True)
    shutil.rmtree(root / SUBJECT(4))
    flair = _load(_file(root, SUBJECT(5), "flair"))
    _save(np.stack([flair, flair], axis=-1), _file(root, SUBJECT(5), "flair"))
    with pytest.raises(
        DataError,
        match=r"BraTS20_Training_005_flair.nii.gz: expected a 3D volume, got shape \(64, 64, 100, 2\)",
    ):
        _dm(root, strict=True)


def test_all_zero_volume(
    brats_copy: Callable[[], Path], dm0: BraTSDataModule, caplog: pytest.LogCaptureFixture
) -> None:
    root = _strict_ready(brats_copy())
    victim = dm0.test_subjects[0]
    path = _file(root, victim, "flair")
    _save(np.zeros_like(_load(path)), path)
    with pytest.raises(DataError, match=f"{victim}_flair.nii.gz: all voxels are zero"):
        _dm(root, strict=True)
    with caplog.at_level(logging.WARNING):
        dm = _dm(root)
    assert f"{victim}_flair.nii.gz: all voxels are zero" in caplog.text
    assert victim not in dm.test_subjects


def test_non_finite_voxels(
    brats_copy: Callable[[], Path], dm0: BraTSDataModule, caplog: pytest.LogCaptureFixture
) -> None:
    """One NaN voxel would make the subject's every normalised value NaN: the subject is reported
    (file and count) and skipped, or stops a strict run."""
    root = _strict_ready(brats_copy())
    victim = dm0.train_subjects[0]
    path = _file(root, victim, "flair")
    data = _load(path).astype(np.float32)
    data[10, 10, 70] = np.nan
    _save(data, path)
    message = f"{victim}_flair.nii.gz: 1 of {data.size} voxels are not finite"
    with pytest.raises(DataError, match=message):
        _dm(root, strict=True)
    with caplog.at_level(logging.WARNING):
        dm = _dm(root)
    assert message in caplog.text
    assert victim not in dm.train_subjects + dm.test_subjects and len(dm.train_subjects) == 2
    # Found when its volume was read in full (after the selection): recorded too.
    assert message in dm.split.info["skipped_subjects"][victim]


def test_seg_labels_outside_brats_are_named(
    brats_copy: Callable[[], Path], dm0: BraTSDataModule, caplog: pytest.LogCaptureFixture
) -> None:
    """A seg with labels 3 and 255 in the used slices: a warning naming the file and the labels
    (the subject stays, every label > 0 is tumour), or a DataError under strict."""
    root = _strict_ready(brats_copy())
    victim = dm0.test_subjects[0]
    path = _file(root, victim, "seg")
    seg = _load(path).astype(np.int16)
    seg[5, 5, 70], seg[6, 6, 75] = 3, 255
    _save(seg, path)
    message = f"{victim}_seg.nii.gz: labels 3, 255 in slices 60..90 are not BraTS labels"
    with pytest.raises(DataError, match=message):
        _dm(root, strict=True)
    with caplog.at_level(logging.WARNING):
        dm = _dm(root)
    assert message in caplog.text
    assert victim in dm.test_subjects


def test_slice_range_beyond_depth(brats_root: Path) -> None:
    with pytest.raises(DataError, match="needs at least 121 axial slices, the volume has 100"):
        _dm(brats_root, slice_range=(60, 120), strict=True)
    with pytest.raises(DataError, match="none of the 20 subject folders is usable"):
        _dm(brats_root, slice_range=(60, 120))


def test_too_many_shots_or_test_slices(brats_root: Path) -> None:
    with pytest.raises(DataError, match="fewer than shots=40"):
        _dm(brats_root, shots=40)
    with pytest.raises(DataError, match=r"not enough test data: 19 usable subjects .* 5000 normal"):
        _dm(brats_root, n_test_healthy=5000)
