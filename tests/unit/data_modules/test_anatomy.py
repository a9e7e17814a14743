"""write_brats_anatomy: BraTS layout from MNI152 anatomy, tumour labels, mass effect, protocol."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from data_modules.brats import BraTSDataModule
from data_modules.errors import DataError
from data_modules.synthetic import (
    BRATS_DIRNAME,
    MISNAMED_SEG,
    anatomy,
    make_demo_data,
    mr_signal,
    variability,
)
from data_modules.synthetic.anatomy import mass_effect_shift, write_brats_anatomy

if importlib.util.find_spec("nilearn") is None:  # the template ships with it (never imported)
    pytest.skip("nilearn is not installed", allow_module_level=True)

MODS = ("flair", "t1", "t1ce", "t2")
SHAPE = (96, 96, 100)
N_SUBJECTS = 12


def _vol(folder: Path, key: str) -> np.ndarray:
    return np.asarray(nib.load(folder / f"{folder.name}_{key}.nii.gz").dataobj)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_brats_anatomy(tmp_path_factory.mktemp("anat"), n_subjects=N_SUBJECTS, shape=SHAPE)


@pytest.fixture(scope="module")
def subjects(root: Path) -> list[dict[str, np.ndarray]]:
    return [{k: _vol(d, k) for k in (*MODS, "seg")} for d in sorted(root.iterdir())]


def test_layout_dtypes_and_lps_affine(root: Path) -> None:
    assert root.name == BRATS_DIRNAME
    names = sorted(p.name for p in root.iterdir())
    assert names == [f"BraTS20_Training_{i:03d}" for i in range(1, N_SUBJECTS + 1)]
    for name in names:
        files = sorted(p.name for p in (root / name).iterdir())
        assert files == sorted(f"{name}_{k}.nii.gz" for k in (*MODS, "seg"))
    folder = root / names[0]
    for key in (*MODS, "seg"):
        img = nib.load(folder / f"{folder.name}_{key}.nii.gz")
        assert img.shape == SHAPE
        assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
        assert img.get_data_dtype() == (np.uint8 if key == "seg" else np.int16)


def test_skull_stripped_with_one_brain_in_all_modalities(subjects: list) -> None:
    for sub in subjects:
        brain = sub["flair"] > 0
        for mod in MODS:
            assert sub[mod].min() >= 0
            assert np.array_equal(sub[mod] > 0, brain)  # 0 outside, > 0 inside, same foreground
        assert not (sub["seg"] > 0)[~brain].any()
        assert 0.1 < brain.mean() < 0.5
        # Slices 60..90 show the mid-brain: a large brain section in every one.
        assert (brain[:, :, 60:91].mean(axis=(0, 1)) > 0.25).all()


def test_labels_are_brats_and_nested(subjects: list) -> None:
    grades = set()
    for sub in subjects:
        seg = sub["seg"]
        assert set(np.unique(seg).tolist()) <= {0, 1, 2, 4}
        if not seg.any():
            continue
        grades.add(frozenset(np.unique(seg).tolist()) - {0})
        brain = sub["flair"] > 0
        # Every core voxel (1, 4) has only tumour (or non-brain) 6-neighbours: oedema outermost.
        outside = ~ndimage.binary_erosion((seg > 0) | ~brain, border_value=1)
        assert not np.isin(seg[outside], [1, 4]).any()
        assert (seg == 2).any()
    assert {1, 2, 4} in grades  # a high-grade tumour among the 12 subjects


def test_same_arguments_give_identical_bytes(tmp_path: Path) -> None:
    kw = {"n_subjects": 2, "shape": (40, 40, 50), "slice_range": (25, 40), "seed": 3}
    a = write_brats_anatomy(tmp_path / "a", misnamed=True, **kw)
    b = write_brats_anatomy(tmp_path / "b", misnamed=True, **kw)
    files = sorted(a.rglob("*.nii.gz"))
    assert len(files) == 10 and (a / "BraTS20_Training_002" / MISNAMED_SEG).is_file()
    for f in files:
        assert f.read_bytes() == (b / f.relative_to(a)).read_bytes()


def test_subjects_differ(subjects: list) -> None:
    masks = [sub["flair"][:, :, 60:91] > 0 for sub in subjects[:4]]
    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            dice = 2 * (masks[i] & masks[j]).sum() / (masks[i].sum() + masks[j].sum())
            assert dice < 0.98  # pose and non-rigid warp: no two brains alike


def test_flair_oedema_brighter_than_normal_white_matter(subjects: list) -> None:
    ratios = []
    for sub in subjects:
        seg, flair, t1 = sub["seg"], sub["flair"].astype(float), sub["t1"].astype(float)
        if not (seg == 2).any():
            continue
        normal = (flair > 0) & ~ndimage.binary_dilation(seg > 0, iterations=3)
        wm = normal & (t1 > np.percentile(t1[normal], 80))  # WM is the brightest T1 tissue
        ratios.append(flair[seg == 2].mean() / flair[wm].mean())
    assert len(ratios) >= 5
    assert np.mean(ratios) > 1.1


def test_mass_effect_shift_by_hand() -> None:
    r = np.array([0.0, 5.0, 10.0, 16.0, 40.0])
    u = mass_effect_shift(r, radius=10.0, amplitude=3.0, decay=6.0)
    np.testing.assert_allclose(u, [0.0, 1.5, 3.0, 3.0 / math.e, 3.0 * math.exp(-5.0)], rtol=1e-5)
    dense = np.linspace(0.0, 60.0, 601)
    assert (np.diff(dense - mass_effect_shift(dense, 10.0, 3.0, 6.0)) > 0).all()  # no folding


def test_push_moves_sampling_towards_the_tumour() -> None:
    frame = anatomy._Frame.of(SHAPE, (60, 90))
    pose = anatomy._Pose(np.eye(3), np.zeros(3))
    box = (slice(0, SHAPE[0]), slice(0, SHAPE[1]), slice(0, SHAPE[2]))
    before = anatomy._source_coords(np.random.default_rng(0), frame, box, pose)
    after = before.copy()
    voxel = (40, 48, 75)  # deep right hemisphere, far from the brain surface
    p0 = np.array([frame.mm(a, v, v + 1)[0] for a, v in enumerate(voxel)], dtype=float)
    tumour = anatomy._Tumour(
        centre=p0 + [10.0, 0.0, 0.0],
        core=8.0,
        margin=4.0,
        grade="high",
        rim=3.0,
        lobes=0.2,
        contrast=1.0,
        necrosis_flair=1.0,
        push=3.0,
        decay=12.0,
    )
    anatomy._push_tissue(after, frame, box, pose, tumour)
    # At the tumour border (r = core + margin / 2 = 10 mm) tissue from 3 mm closer appears.
    np.testing.assert_allclose(after[:, 40, 48, 75] - before[:, 40, 48, 75], [3.0, 0, 0], atol=1e-4)
    assert np.array_equal(after[:, :, :, 10], before[:, :, :, 10])  # far away: untouched


def test_brats_data_module_split_counts(root: Path) -> None:
    dm = BraTSDataModule(
        str(root), shots=2, n_test_healthy=20, n_test_tumorous=40, image_size=32, batch_size=2
    )
    dm.setup("fit")
    info = dm.split.info
    assert (info["test_healthy"], info["test_tumorous"]) == (20, 40)
    assert info["usable_subjects"] == N_SUBJECTS and len(dm.split.train) == 2


def test_missing_nilearn_is_a_data_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "nilearn" else real(name, *a)
    )
    anatomy._template.cache_clear()
    try:
        with pytest.raises(DataError, match="pip install nilearn"):
            write_brats_anatomy(tmp_path, n_subjects=1, shape=(32, 32, 40), slice_range=(10, 20))
    finally:
        anatomy._template.cache_clear()


def test_make_demo_data_kind(tmp_path: Path) -> None:
    out = make_demo_data(
        "brats",
        tmp_path / "b",
        kind="anatomy",
        n_subjects=1,
        shape=(32, 32, 40),
        slice_range=(10, 20),
    )
    assert (out / "BraTS20_Training_001" / "BraTS20_Training_001_seg.nii.gz").is_file()
    with pytest.raises(DataError, match="brats only"):
        make_demo_data("chestxray8", tmp_path / "c", kind="anatomy")
    with pytest.raises(DataError, match="unknown kind"):
        make_demo_data("brats", tmp_path / "d", kind="mri")


# ----------------------------------------------------------------------------- anatomy-hard
def _ball_tissue(n: int = 72) -> dict[str, np.ndarray]:
    """A toy brain: WM ball, GM shell, a CSF 'ventricle' at the centre, no template detail."""
    r = np.linalg.norm(np.indices((n, n, n)) - (n - 1) / 2.0, axis=0)
    brain = (r < 30).astype(np.float32)
    csf = ((r < 5) * brain).astype(np.float32)
    wm = ((r >= 5) & (r < 22)).astype(np.float32)
    gm = brain - wm - csf
    return {"brain": brain, "csf": csf, "gm": gm, "wm": wm, "detail": np.zeros_like(brain), "r": r}


def test_hard_hyperintensities_lie_in_deep_white_matter_and_brighten_flair() -> None:
    tissue = _ball_tissue()
    r = tissue.pop("r")
    var = variability.draw_variability(np.random.default_rng(0), tissue)
    assert var.wmh.max() > 0.5  # some burden (caps beside the ventricle at least)
    assert var.wmh[tissue["wm"] == 0].max() == 0.0  # never outside white matter
    assert (
        var.wmh[r > 30 - 11].max() == 0.0
    )  # nor near the brain's edge (12 voxels, 1 for rounding)
    rng = np.random.default_rng(1)
    plain = mr_signal.modality(np.random.default_rng(1), "flair", tissue, None)
    hard = mr_signal.modality(rng, "flair", tissue, None, var)
    spots = var.wmh > 0.5
    assert spots.sum() > 20
    assert np.median(hard[spots]) > np.median(plain[spots]) * 1.05  # brighter than plain WM
    clear = (tissue["wm"] > 0) & (var.wmh == 0)
    assert abs(np.median(hard[clear]) / np.median(plain[clear]) - 1.0) < 0.05  # elsewhere alike


def test_hard_variant_is_reproducible_and_keeps_brats_labels(tmp_path: Path) -> None:
    kw = {"n_subjects": 3, "shape": (48, 48, 60), "slice_range": (28, 44), "seed": 2}
    a = write_brats_anatomy(tmp_path / "a", hard=True, **kw)
    b = make_demo_data("brats", tmp_path / "b", kind="anatomy-hard", **kw)
    plain = write_brats_anatomy(tmp_path / "p", **kw)
    for f in sorted(a.rglob("*.nii.gz")):
        assert f.read_bytes() == (b / f.relative_to(a)).read_bytes()
        if f.name.endswith("_seg.nii.gz"):
            seg = np.asarray(nib.load(f).dataobj)
            assert set(np.unique(seg)) <= {0, 1, 2, 4}
    tumour = [
        int((np.asarray(nib.load(folder / f"{folder.name}_seg.nii.gz").dataobj) > 0).sum())
        for root in (a, plain)
        for folder in sorted(root.iterdir())
    ]
    assert sum(tumour[:3]) < sum(tumour[3:])  # the same plan, smaller tumours
    flair = [_vol(root / "BraTS20_Training_001", "flair") for root in (a, plain)]
    assert not np.array_equal(flair[0], flair[1])
