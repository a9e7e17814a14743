"""Synthetic dataset writers: real on-disk formats, phantom content, determinism."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from data_modules.errors import DataError
from data_modules.synthetic import (
    BRATS_DIRNAME,
    MISNAMED_SEG,
    make_demo_data,
    smooth_noise,
    write_brats,
    write_chestxray8,
)
from data_modules.synthetic.chestxray8 import _chest_image

MODS = ("flair", "t1", "t1ce", "t2")


def _vol(folder: Path, key: str) -> np.ndarray:
    return np.asarray(nib.load(folder / f"{folder.name}_{key}.nii.gz").dataobj)


def test_smooth_noise_shape_scale_and_smoothness() -> None:
    rng = np.random.default_rng(0)
    noise = smooth_noise(rng, (40, 30, 20), 4)
    assert noise.shape == (40, 30, 20) and noise.dtype == np.float32
    assert 0.8 < noise.std() < 1.2
    # Band-limited: neighbours are far more alike than white noise (mean |diff| ~ 1.13 std).
    assert np.abs(np.diff(noise, axis=0)).mean() < 0.3
    assert smooth_noise(np.random.default_rng(1), (16, 16), 3).shape == (16, 16)


def test_write_brats_layout_dtypes_and_affine(tmp_path: Path) -> None:
    out = write_brats(tmp_path, n_subjects=4, shape=(32, 32, 40), slice_range=(10, 25), seed=3)
    assert out == tmp_path / BRATS_DIRNAME
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"BraTS20_Training_{i:03d}" for i in range(1, 5)]
    for i, name in enumerate(names):
        files = sorted(p.name for p in (out / name).iterdir())
        seg_name = MISNAMED_SEG if i == 3 else f"{name}_seg.nii.gz"  # last one misnamed
        assert files == sorted([f"{name}_{m}.nii.gz" for m in MODS] + [seg_name])
    folder = out / names[0]
    img = nib.load(folder / f"{names[0]}_flair.nii.gz")
    assert img.shape == (32, 32, 40)
    np.testing.assert_array_equal(img.affine, np.diag([-1.0, -1.0, 1.0, 1.0]))
    assert img.get_data_dtype() == np.int16
    assert nib.load(folder / f"{names[0]}_seg.nii.gz").get_data_dtype() == np.uint8
    # Skull-stripped: the same brain (voxels > 0) in every modality, zero outside.
    brains = [_vol(folder, m) > 0 for m in MODS]
    assert all(np.array_equal(brains[0], b) for b in brains[1:])
    assert 0.1 < brains[0].mean() < 0.5
    seg = _vol(folder, "seg")
    assert set(np.unique(seg)) <= {0, 1, 2, 4}
    assert not (seg > 0)[~brains[0]].any()  # tumour only inside the brain


def test_write_brats_is_deterministic_by_seed(tmp_path: Path) -> None:
    kw = {"n_subjects": 2, "shape": (24, 24, 30), "slice_range": (10, 20)}
    a = write_brats(tmp_path / "a", seed=1, **kw)
    b = write_brats(tmp_path / "b", seed=1, **kw)
    c = write_brats(tmp_path / "c", seed=2, **kw)
    for f in sorted(a.rglob("*.nii.gz")):
        rel = f.relative_to(a)
        assert f.read_bytes() == (b / rel).read_bytes()  # byte-identical (no gzip timestamp)
    rel = Path("BraTS20_Training_001/BraTS20_Training_001_flair.nii.gz")
    assert (a / rel).read_bytes() != (c / rel).read_bytes()


def test_write_brats_rejects_slice_range_outside_depth(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not fit depth 50"):
        write_brats(tmp_path, n_subjects=1, shape=(32, 32, 50), slice_range=(40, 60))


def test_brats_fixture_has_the_subject_kinds_and_labels(brats_root: Path) -> None:
    """Healthy and tumorous in-range slices, tumours outside the range, labels 1/2/4."""
    kinds = {"none": 0, "outside": 0, "covers": 0, "straddle": 0}
    labels: set[int] = set()
    for folder in sorted(brats_root.iterdir())[:-1]:  # the last one has the misnamed seg
        seg = _vol(folder, "seg")
        labels |= set(np.unique(seg).tolist())
        in_range = (seg[:, :, 60:91] > 0).any(axis=(0, 1))  # 31 slices
        if not seg.any():
            kinds["none"] += 1
        elif not in_range.any():
            kinds["outside"] += 1
        elif in_range.all():
            kinds["covers"] += 1
        else:
            kinds["straddle"] += 1
    assert labels == {0, 1, 2, 4}
    assert all(n >= 1 for n in kinds.values()), kinds
    assert (brats_root / "BraTS20_Training_020" / MISNAMED_SEG).is_file()


def test_brats_relative_contrast_and_tumour_texture(brats_root: Path) -> None:
    """FLAIR oedema brighter than normal brain, T1ce ring enhancing, T2 CSF bright; the tumour's
    texture (high-pass residual) is rougher than normal tissue."""
    from scipy.ndimage import binary_erosion, gaussian_filter

    checked = 0
    for folder in sorted(brats_root.iterdir())[:-1]:
        seg = _vol(folder, "seg")
        vols = {m: _vol(folder, m).astype(np.float64) for m in MODS}
        brain = vols["flair"] > 0
        normal = brain & (seg == 0)
        # CSF is dark in FLAIR and bright in T2: the T2/FLAIR ratio spreads far more than noise.
        ratio = vols["t2"][normal] / vols["flair"][normal]
        assert np.percentile(ratio, 99) > 2.0 * np.median(ratio)
        if not (seg == 2).sum() > 50:
            continue
        flair = vols["flair"]
        assert np.median(flair[seg == 2]) > np.median(flair[normal])
        if (seg == 4).sum() > 20:
            t1ce = vols["t1ce"]
            assert np.median(t1ce[seg == 4]) > np.median(t1ce[normal])
        residual = np.abs(flair - gaussian_filter(flair, 1.0))
        tumour_in = binary_erosion(seg == 2, iterations=1)
        normal_in = binary_erosion(normal, iterations=2)
        if tumour_in.sum() > 20:
            rough_t = np.median(residual[tumour_in] / flair[tumour_in])
            rough_n = np.median(residual[normal_in] / flair[normal_in])
            assert rough_t > rough_n
            checked += 1
    assert checked >= 5


def test_write_chestxray8_formats(tmp_path: Path) -> None:
    root = write_chestxray8(tmp_path, n_normal=12, n_abnormal=12, size=48, seed=0)
    header = (root / "Data_Entry_2017.csv").read_text().splitlines()[0]
    assert header == (
        "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
        "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],"
    )
    bbox_header = (root / "BBox_List_2017.csv").read_text().splitlines()[0]
    assert bbox_header == "Image Index,Finding Label,Bbox [x,y,w,h],,,"
    with open(root / "Data_Entry_2017.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 24
    assert sum(r["Finding Labels"] == "No Finding" for r in rows) == 12
    assert {r["View Position"] for r in rows} <= {"PA", "AP"}
    # Split lists: every image once, patients disjoint.
    train = (root / "train_val_list.txt").read_text().split()
    test = (root / "test_list.txt").read_text().split()
    assert sorted(train + test) == sorted(r["Image Index"] for r in rows)
    patient = {r["Image Index"]: r["Patient ID"] for r in rows}
    assert not {patient[n] for n in train} & {patient[n] for n in test}
    # Gender is a property of the patient.
    gender: dict[str, set[str]] = {}
    for r in rows:
        gender.setdefault(r["Patient ID"], set()).add(r["Patient Gender"])
    assert all(len(g) == 1 for g in gender.values())
    # Boxes: only abnormal images, inside the 1024-pixel frame.
    labels = {r["Image Index"]: r["Finding Labels"] for r in rows}
    with open(root / "BBox_List_2017.csv", newline="") as f:
        reader = csv.reader(f)
        next(reader)
        boxes = list(reader)
    assert boxes
    for name, finding, x, y, w, h, *_ in boxes:
        assert labels[name] != "No Finding" and finding in labels[name].split("|")
        x, y, w, h = map(float, (x, y, w, h))
        assert x >= 0 and y >= 0 and w > 0 and h > 0 and x + w <= 1024.001 and y + h <= 1024.001
    # PNG modes: 8-bit grey plus one RGBA, one RGB and one 16-bit image; all size x size.
    modes = {}
    for png in sorted((root / "images").glob("*.png")):
        with Image.open(png) as im:
            modes[png.name] = im.mode
            assert im.size == (48, 48)
    assert set(modes.values()) == {"L", "RGBA", "RGB", "I;16"}


def test_write_chestxray8_deterministic(tmp_path: Path) -> None:
    a = write_chestxray8(tmp_path / "a", n_normal=4, n_abnormal=4, size=32, seed=5)
    b = write_chestxray8(tmp_path / "b", n_normal=4, n_abnormal=4, size=32, seed=5)
    for f in sorted(a.rglob("*")):
        if f.is_file():
            assert f.read_bytes() == (b / f.relative_to(a)).read_bytes(), f.name


@pytest.mark.parametrize("finding", ["Nodule", "Mass", "Effusion", "Infiltration", "Atelectasis"])
def test_chest_findings_are_opacities_inside_their_box(finding: str) -> None:
    """The same image with and without a finding differs only inside (around) the box, brighter."""
    size = 128
    for seed in range(3):
        clean, _ = _chest_image(np.random.default_rng(seed), size, [])
        sick, boxes = _chest_image(np.random.default_rng(seed), size, [finding])
        ((name, (x, y, w, h)),) = boxes
        assert name == finding
        diff = sick - clean
        inside = np.zeros((size, size), dtype=bool)
        x0, y0 = max(int(x * size), 0), max(int(y * size), 0)
        inside[y0 : int(np.ceil((y + h) * size)), x0 : int(np.ceil((x + w) * size))] = True
        assert diff[inside].mean() > 0.01
        assert np.abs(diff[~inside]).mean() < 0.2 * diff[inside].mean()


def test_make_demo_data(tmp_path: Path) -> None:
    out = make_demo_data("brats", tmp_path / "b", n_subjects=2, shape=(24, 24, 100))
    assert out.name == BRATS_DIRNAME and len(list(out.iterdir())) == 2
    out = make_demo_data("chestxray8", tmp_path / "c", n_normal=2, n_abnormal=2, size=32)
    assert (out / "Data_Entry_2017.csv").is_file() and len(list((out / "images").iterdir())) == 4
    with pytest.raises(DataError, match="unknown dataset 'mvtec'"):
        make_demo_data("mvtec", tmp_path / "x")
