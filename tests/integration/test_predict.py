"""`pathoscope predict` on synthetic BraTS volumes and ChestX-ray8 PNGs (issue 6).

One tiny model is trained once for the module (fast settings of model_contract.md) and saved with
`trainer.save_checkpoint`; variants of that checkpoint (another dataset, modality list or version)
are written by editing the saved dict, as a user's foreign checkpoint would differ.
"""

from __future__ import annotations

import csv
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from data_modules.brats import BraTSDataModule
from data_modules.chestxray8 import ChestXray8DataModule
from data_modules.errors import DataError
from pathoscope.app.predict.common import load_model
from pathoscope.app.predict.images import predict_images
from pathoscope.app.predict.montage import CAPTION, MIN_WIDTH, TILE
from pathoscope.app.predict.run import main
from pathoscope.app.predict.volumes import predict_volume
from pathoscope.checkpoint import CheckpointError
from pathoscope.exit_codes import EXIT_OK, EXIT_PARTIAL, EXIT_USAGE
from pathoscope.lightning_model import PathoScope
from pathoscope.torch_model import PathoScopeModel

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:Backbone. pretrained=False"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

MODEL_ARGS = {"network": {"pretrained": False, "hidden_dim": 64}, "bank": {"max_anchors": 256}}
TRAIN_STEPS = 100
TAU = 0.5
# Subjects of the synthetic set with a tumour in the training slice range (60..90); none is a
# training subject of the split below (checked in the fixture).
TUMOUR_SUBJECTS = ("BraTS20_Training_005", "BraTS20_Training_012")
# The three subjects with the largest in-range tumours, for the trained-vs-untrained comparison.
LESION_SUBJECTS = ("BraTS20_Training_007", "BraTS20_Training_013", "BraTS20_Training_015")


def _flair(root: Path, subject: str) -> Path:
    return root / subject / f"{subject}_flair.nii.gz"


def _datamodule(root: Path) -> BraTSDataModule:
    return BraTSDataModule(
        str(root),
        shots=4,
        image_size=64,
        n_test_healthy=10,
        n_test_tumorous=10,
        batch_size=4,
        steps_per_epoch=TRAIN_STEPS,
    )


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """64-px convolutions gain nothing from more threads; on a busy 2-core CI machine two threads
    per process ran this module about 3x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ckpt(brats_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PathoSCOPE checkpoint trained for TRAIN_STEPS steps on the synthetic BraTS set."""
    dm = _datamodule(brats_root)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PathoScope(**MODEL_ARGS)
        trainer = L.Trainer(
            max_steps=TRAIN_STEPS,
            accelerator="cpu",
            logger=False,
            enable_progress_bar=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            limit_val_batches=0,
        )
        trainer.fit(model, datamodule=dm)
    model.tau.fill_(TAU)  # what the metrics callback sets on validation
    path = tmp_path_factory.mktemp("ckpt") / "model.ckpt"
    trainer.save_checkpoint(path)
    assert not set(TUMOUR_SUBJECTS + LESION_SUBJECTS) & set(dm.train_subjects)
    return path


@pytest.fixture(scope="module")
def model(ckpt: Path) -> PathoScopeModel:
    return load_model(ckpt)


def _variant(ckpt: Path, out: Path, **changes: object) -> Path:
    """A copy of the checkpoint with `pathoscope` metadata fields changed."""
    data = torch.load(ckpt, map_location="cpu", weights_only=False)
    for key, value in changes.items():
        if key == "preprocessing":
            data["pathoscope"]["preprocessing"] = {**data["pathoscope"]["preprocessing"], **value}
        else:
            data["pathoscope"][key] = value
    torch.save(data, out)
    return out


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _save(data: np.ndarray, affine: np.ndarray, path: Path, zooms: tuple | None = None) -> Path:
    img = nib.Nifti1Image(data, affine)
    if zooms is not None:
        img.header.set_zooms(zooms)
    nib.save(img, str(path))
    return path


# ----------------------------------------------------------------------------- volumes
def test_volume_outputs_have_input_geometry(ckpt: Path, brats_root: Path, tmp_path: Path) -> None:
    src = _flair(brats_root, TUMOUR_SUBJECTS[1])
    out = tmp_path / "out"
    assert main(["--ckpt_path", str(ckpt), "--input", str(src), "--output", str(out)]) == 0
    ref = nib.load(str(src))
    amap_img = nib.load(str(out / "BraTS20_Training_012_flair_anomaly_map.nii.gz"))
    pred_img = nib.load(str(out / "BraTS20_Training_012_flair_pred_mask.nii.gz"))
    for img in (amap_img, pred_img):
        assert img.shape == ref.shape
        np.testing.assert_array_equal(img.affine, ref.affine)
        assert img.header.get_zooms() == ref.header.get_zooms()
        assert img.header["sform_code"] == ref.header["sform_code"]
    amap = np.asarray(amap_img.dataobj)
    pred = np.asarray(pred_img.dataobj)
    assert amap.dtype == np.float32 and pred.dtype == np.uint8
    # Only the training slice range (60..90, brain everywhere in it) is scored.
    assert not amap[:, :, :60].any() and not amap[:, :, 91:].any()
    assert (amap[:, :, 60:91].max(axis=(0, 1)) > 0).all()
    brain = np.asarray(ref.dataobj) > 0
    np.testing.assert_array_equal(pred.astype(bool), (amap > TAU) & brain)

    rows = _read_csv(out / "BraTS20_Training_012_flair_scores.csv")
    slices = [r for r in rows if r["level"] == "slice"]
    assert [int(r["slice"]) for r in slices] == list(range(60, 91))
    assert [int(r["input_index"]) for r in slices] == list(range(60, 91))  # LPS input
    scores = np.array([float(r["score"]) for r in slices])
    assert [r["pathological"] for r in slices] == [str(int(s > TAU)) for s in scores]
    (volume,) = [r for r in rows if r["level"] == "volume"]
    assert float(volume["score"]) == pytest.approx(scores.max(), rel=1e-5)
    # A slice score is the max of its map inside the brain (at the network size, here 64 = 64).
    k = 75
    assert scores[k - 60] == pytest.approx(amap[:, :, k][brain[:, :, k]].max(), abs=1e-5)
    (summary,) = _read_csv(out / "predictions.csv")
    assert summary["input"] == str(src) and float(summary["score"]) == float(volume["score"])
    # The montage: one tile per scored slice (31), 6 to a row, under a header.
    assert summary["montage"] == "BraTS20_Training_012_flair_montage.png"
    montage = np.asarray(Image.open(out / summary["montage"]))
    rows = 6  # ceil(31 / 6)
    assert 0 < montage.shape[0] - rows * (CAPTION + TILE) < 60  # the rest is the header
    assert montage.shape[1] == max(6 * TILE, MIN_WIDTH)


def test_predict_matches_the_evaluation_pipeline(model: PathoScopeModel, brats_root: Path) -> None:
    """Same preprocessing as training: the maps equal the model's on the datamodule's test items."""
    dm = _datamodule(brats_root)
    dm.setup("test")
    test = dm.test_dataset()
    subject = TUMOUR_SUBJECTS[1]
    items = [test[i] for i in range(len(test)) if test[i]["subject"] == subject]
    assert items
    result = predict_volume(model, _flair(brats_root, subject))
    images = torch.stack([it["image"] for it in items])
    foreground = torch.stack([it["foreground"] for it in items])
    with torch.no_grad():
        scores, maps = model(images, foreground)
    for it, s, m in zip(items, scores, maps, strict=True):
        k = it["slice"]
        assert result.slice_scores[result.slices.index(k)] == pytest.approx(float(s), abs=1e-5)
        np.testing.assert_allclose(result.anomaly_map[:, :, k], m[0].numpy(), atol=1e-5)


def test_predict_follows_the_checkpoints_intensity_norm(
    ckpt: Path, brats_root: Path, tmp_path: Path
) -> None:
    """A model trained on percentile-scaled volumes (the former default) is given percentile-scaled
    volumes: predict's maps equal the model's on the items of a percentile data module, and
    differ from those of the same weights under the median rule (the default, `ckpt`'s)."""
    assert load_model(ckpt).preprocessing["intensity_norm"] == "median"
    variant = _variant(ckpt, tmp_path / "p.ckpt", preprocessing={"intensity_norm": "percentile"})
    percentile = load_model(variant)
    dm = BraTSDataModule(**{**_datamodule(brats_root).hparams, "intensity_norm": "percentile"})
    dm.setup("test")
    test = dm.test_dataset()
    subject = TUMOUR_SUBJECTS[1]
    items = [test[i] for i in range(len(test)) if test[i]["subject"] == subject]
    assert items
    result = predict_volume(percentile, _flair(brats_root, subject))
    with torch.no_grad():
        _, maps = percentile(
            torch.stack([it["image"] for it in items]),
            torch.stack([it["foreground"] for it in items]),
        )
    for it, m in zip(items, maps, strict=True):
        np.testing.assert_allclose(result.anomaly_map[:, :, it["slice"]], m[0].numpy(), atol=1e-5)
    median = predict_volume(load_model(ckpt), _flair(brats_root, subject))
    k = items[0]["slice"]
    assert not np.allclose(median.anomaly_map[:, :, k], result.anomaly_map[:, :, k], atol=1e-4)


def test_trained_model_scores_tumour_above_normal_brain(
    model: PathoScopeModel, brats_root: Path
) -> None:
    """Mean map in the tumour minus mean map in normal brain (scored slices, all tumour subjects)
    grows with training: above 0 and above the untrained model's difference."""

    def tumour_minus_normal(m: PathoScopeModel) -> float:
        lesion, normal = [], []
        for subject in LESION_SUBJECTS:
            result = predict_volume(m, _flair(brats_root, subject))
            seg = np.asarray(nib.load(str(brats_root / subject / f"{subject}_seg.nii.gz")).dataobj)
            brain = np.asarray(nib.load(str(_flair(brats_root, subject))).dataobj) > 0
            amap = result.anomaly_map[:, :, result.slices]
            tumour = seg[:, :, result.slices] > 0
            lesion.append(amap[tumour])
            normal.append(amap[brain[:, :, result.slices] & ~tumour])
        return float(np.concatenate(lesion).mean() - np.concatenate(normal).mean())

    torch.manual_seed(0)  # the trained model's initial weights
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        untrained = PathoScopeModel(**MODEL_ARGS).eval()
    untrained.preprocessing = dict(model.preprocessing)
    trained_diff, untrained_diff = tumour_minus_normal(model), tumour_minus_normal(untrained)
    assert trained_diff > 0, (trained_diff, untrained_diff)
    assert trained_diff > untrained_diff, (trained_diff, untrained_diff)


def test_reoriented_volume_gives_the_same_map(ckpt: Path, brats_root: Path, tmp_path: Path) -> None:
    """The same physical image stored x-flipped and x/y-swapped: same map, own orientation."""
    src = nib.load(str(_flair(brats_root, TUMOUR_SUBJECTS[1])))
    data = np.asarray(src.dataobj)
    nx = data.shape[0]
    flip_x = np.array([[-1, 0, 0, nx - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    swap_xy = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    # voxel (i, j, k) of `moved` is voxel (nx-1-j, i, k) of the original: affine = A @ flip @ swap.
    moved = np.ascontiguousarray(np.flip(data, 0).transpose(1, 0, 2))
    moved_affine = src.affine @ flip_x @ swap_xy
    ijk = np.array([3, 10, 70, 1.0])
    np.testing.assert_allclose(
        moved_affine @ ijk, src.affine @ np.array([nx - 1 - 10, 3, 70, 1.0])
    )  # same physical point
    inputs = tmp_path / "in"
    inputs.mkdir()
    _save(data, src.affine, inputs / "a.nii.gz")
    _save(moved, moved_affine, inputs / "b.nii.gz")
    out = tmp_path / "out"
    assert main(["--ckpt_path", str(ckpt), "--input", str(inputs), "--output", str(out)]) == 0
    map_a = nib.load(str(out / "a_anomaly_map.nii.gz"))
    map_b = nib.load(str(out / "b_anomaly_map.nii.gz"))
    np.testing.assert_array_equal(map_b.affine, moved_affine)
    assert map_b.shape == moved.shape
    expected = np.flip(np.asarray(map_a.dataobj), 0).transpose(1, 0, 2)
    np.testing.assert_allclose(np.asarray(map_b.dataobj), expected, atol=1e-6)
    assert expected.max() > 0
    rows = {Path(r["input"]).name: float(r["score"]) for r in _read_csv(out / "predictions.csv")}
    assert rows["a.nii.gz"] == pytest.approx(rows["b.nii.gz"], abs=1e-6)


def test_far_spacing_and_slices_option(
    model: PathoScopeModel, brats_root: Path, tmp_path: Path
) -> None:
    src = nib.load(str(_flair(brats_root, TUMOUR_SUBJECTS[0])))
    data = np.asarray(src.dataobj)
    coarse = _save(data, src.affine @ np.diag([3.0, 3.0, 3.0, 1.0]), tmp_path / "c.nii.gz")
    result = predict_volume(model, coarse, slices=(62, 64))
    assert result.slices == [62, 63, 64]
    assert not result.anomaly_map[:, :, :62].any() and not result.anomaly_map[:, :, 65:].any()
    assert any("voxel spacing" in w for w in result.warnings)
    ok = predict_volume(model, _flair(brats_root, TUMOUR_SUBJECTS[0]), slices=(62, 64))
    assert ok.warnings == []
    # Far too much foreground (no zero background): warned.
    noisy = _save(data + 1, src.affine, tmp_path / "n.nii.gz")
    assert any("foreground" in w for w in predict_volume(model, noisy, slices=(62, 62)).warnings)
    with pytest.raises(DataError, match="the volume has 100"):
        predict_volume(model, coarse, slices=(90, 100))
    whole = predict_volume(model, _flair(brats_root, TUMOUR_SUBJECTS[0]), slices="all")
    brain_slices = np.flatnonzero((data > 0).any(axis=(0, 1))).tolist()
    assert whole.slices == brain_slices and len(brain_slices) > 31


def test_multi_modality_checkpoint_takes_subject_folder(
    ckpt: Path, brats_root: Path, tmp_path: Path
) -> None:
    multi = _variant(ckpt, tmp_path / "m.ckpt", preprocessing={"modality": ["flair", "t1", "t2"]})
    model3 = load_model(multi)
    subject = brats_root / TUMOUR_SUBJECTS[0]
    result = predict_volume(model3, subject, slices=(70, 71))
    assert result.name == TUMOUR_SUBJECTS[0] and result.anomaly_map.shape == (64, 64, 100)
    with pytest.raises(DataError, match="give the subject folder"):
        predict_volume(model3, _flair(brats_root, TUMOUR_SUBJECTS[0]))
    code = main(
        ["--ckpt_path", str(multi), "--input", str(subject / subject.name) + "_flair.nii.gz"]
        + ["--output", str(tmp_path / "o")]
    )
    assert code == EXIT_USAGE


# ----------------------------------------------------------------------------- bad input
def _cli(ckpt: Path, inp: Path, out: Path, *extra: str) -> list[str]:
    return ["--ckpt_path", str(ckpt), "--input", str(inp), "--output", str(out), *extra]


def test_bad_single_inputs_give_one_line_errors(
    ckpt: Path, brats_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = nib.load(str(_flair(brats_root, TUMOUR_SUBJECTS[0])))
    vol = np.asarray(src.dataobj)
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    flat = _save(vol[:, :, 70], np.eye(4), tmp_path / "flat.nii.gz")
    t1 = np.asarray(
        nib.load(str(brats_root / TUMOUR_SUBJECTS[0] / "BraTS20_Training_005_t1.nii.gz")).dataobj
    )
    four = _save(np.stack([vol, t1], axis=-1), src.affine, tmp_path / "four.nii.gz")
    fake = tmp_path / "fake.nii.gz"
    fake.write_bytes(b"\x00" * 100)
    with_nan = vol.astype(np.float32)
    with_nan[30, 30, 75] = np.nan  # one voxel, in a scored slice
    nan = _save(with_nan, src.affine, tmp_path / "nan.nii.gz")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = {
        text: "notes.txt: not a NIfTI volume",
        flat: "flat.nii.gz: expected a 3D volume, got shape (64, 64)",
        four: "four.nii.gz: expected a 3D volume, got shape (64, 64, 100, 2) (2 volumes): pass "
        "--channel",
        fake: "fake.nii.gz: cannot read NIfTI",
        nan: f"nan.nii.gz: 1 of {vol.size} voxels are not finite (NaN or infinity)",
        empty: "empty: empty folder",
        tmp_path / "missing.nii.gz": "missing.nii.gz: input does not exist",
    }
    for inp, message in cases.items():
        assert main(_cli(ckpt, inp, tmp_path / "out")) == EXIT_USAGE, inp
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err and err.startswith("pathoscope predict: error:")
    # --channel picks one volume of a 4D file: the same result as that volume alone.
    picked = predict_volume(load_model(ckpt), four, slices=(70, 72), channel=1)
    alone = _save(t1, src.affine, tmp_path / "t1.nii.gz")
    direct = predict_volume(load_model(ckpt), alone, slices=(70, 72))
    np.testing.assert_array_equal(picked.anomaly_map, direct.anomaly_map)
    with pytest.raises(DataError, match="--channel 2 out of range"):
        predict_volume(load_model(ckpt), four, slices=(70, 72), channel=2)


def test_bad_checkpoints(
    ckpt: Path, brats_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plain = tmp_path / "plain.ckpt"
    torch.save({}, plain)
    other_version = _variant(ckpt, tmp_path / "v99.ckpt", version=99)
    src = _flair(brats_root, TUMOUR_SUBJECTS[0])
    for bad, message in (
        (plain, "plain.ckpt: not a usable"),
        (other_version, "v99.ckpt: checkpoint version 99"),
    ):
        with pytest.raises(CheckpointError, match=message):
            load_model(bad)
        assert main(_cli(bad, src, tmp_path / "out")) == EXIT_USAGE
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_folder_skips_bad_file_and_keeps_outputs(
    ckpt: Path,
    brats_root: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A folder with a broken file: the others are written, the run exits 3 (done with inputs
    skipped) and both its last line and predictions.csv name the broken file and why."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    for subject in TUMOUR_SUBJECTS:
        shutil.copy(_flair(brats_root, subject), inputs / f"{subject}.nii.gz")
    (inputs / "broken.nii.gz").write_bytes(b"garbage")
    out = tmp_path / "out"
    assert main(_cli(ckpt, inputs, out, "--slices", "70:71", "--batch-size", "1")) == EXIT_PARTIAL
    assert "broken.nii.gz" in caplog.text
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("pathoscope predict: done, but 1 input(s) skipped: ")
    assert str(inputs / "broken.nii.gz") in last and str(out / "predictions.csv") in last
    rows = {Path(r["input"]).name: r for r in _read_csv(out / "predictions.csv")}
    assert sorted(rows) == sorted([f"{s}.nii.gz" for s in TUMOUR_SUBJECTS] + ["broken.nii.gz"])
    assert "broken.nii.gz: cannot read NIfTI" in rows.pop("broken.nii.gz")["skipped"]
    assert all(r["scored_slices"] == "2" and r["skipped"] == "" for r in rows.values())
    written = out / f"{TUMOUR_SUBJECTS[0]}_anomaly_map.nii.gz"
    before = written.read_bytes()
    # Other slices: the existing outputs are not replaced; nothing could be done, exit 2.
    assert main(_cli(ckpt, inputs, out, "--slices", "60:61")) == EXIT_USAGE
    assert written.read_bytes() == before
    assert main(_cli(ckpt, inputs, out, "--slices", "60:61", "--overwrite")) == EXIT_PARTIAL
    after = np.asarray(nib.load(str(written)).dataobj)
    assert after[:, :, 60:62].any() and not after[:, :, 70:72].any()
    # Outputs are never written into the input folder.
    assert main(_cli(ckpt, inputs, inputs / "o")) == EXIT_USAGE


def test_the_same_command_on_a_complete_folder_has_nothing_left_to_do(
    ckpt: Path, brats_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every input done by this checkpoint and these options: exit 0, a line saying so, nothing
    rewritten. Other options or another checkpoint find outputs they did not make: refused."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    for subject in TUMOUR_SUBJECTS:
        shutil.copy(_flair(brats_root, subject), inputs / f"{subject}.nii.gz")
    out = tmp_path / "out"
    args = _cli(ckpt, inputs, out, "--slices", "70:71")
    assert main(args) == EXIT_OK
    capsys.readouterr()
    files = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()}
    assert main(args) == EXIT_OK
    assert capsys.readouterr().out.strip() == (
        f"pathoscope predict: nothing left to do: the 2 input(s) are done in {out} by this "
        "checkpoint and options (pass --overwrite to redo them)"
    )
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()} == files
    other = _variant(ckpt, tmp_path / "other.ckpt", weights="another")
    for refused in (_cli(ckpt, inputs, out, "--slices", "70:72"), _cli(other, inputs, out)):
        assert main(refused) == EXIT_USAGE
        assert "exists, made for another input or by another checkpoint or options" in (
            capsys.readouterr().err
        )
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()} == files


# ----------------------------------------------------------------------------- images
def test_images_folder_overlays_and_csv(
    ckpt: Path, chestxray_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    chest = _variant(
        ckpt,
        tmp_path / "chest.ckpt",
        preprocessing={"dataset": "chestxray8", "foreground": "whole image"},
    )
    dm = ChestXray8DataModule(str(chestxray_root), shots=2, n_test=6, image_size=64)
    dm.setup("test")
    items = [dm.test_dataset()[i] for i in range(3)]
    inputs = tmp_path / "in"
    inputs.mkdir()
    for it in items:
        shutil.copy(chestxray_root / "images" / it["subject"], inputs / it["subject"])
    grey = np.asarray(Image.open(inputs / items[0]["subject"]).convert("L"))
    Image.fromarray(grey).save(inputs / "copy.jpg", quality=95)
    (inputs / "broken.png").write_bytes(b"not a png")
    (inputs / "readme.txt").write_text("hello")
    out = tmp_path / "out"
    assert main(_cli(chest, inputs, out)) == EXIT_PARTIAL  # a corrupt PNG is a skipped input
    assert "broken.png" in caplog.text and "readme.txt" in caplog.text
    rows = {r["input"]: r for r in _read_csv(out / "predictions.csv")}
    skipped = {Path(p).name: r["skipped"] for p, r in rows.items() if r["skipped"]}
    assert sorted(skipped) == ["broken.png", "readme.txt"] and "not a" in skipped["readme.txt"]
    rows = {p: r for p, r in rows.items() if not r["skipped"]}
    assert sorted(Path(p).name for p in rows) == sorted(
        ["copy.jpg", *(it["subject"] for it in items)]
    )
    model = load_model(chest)
    with torch.no_grad():
        scores, _ = model(torch.stack([it["image"] for it in items]))
    for it, s in zip(items, scores, strict=True):
        row = rows[str(inputs / it["subject"])]
        assert float(row["score"]) == pytest.approx(float(s), abs=1e-5)  # the training pipeline
        assert row["pathological"] == str(int(float(s) > TAU))
        png = np.asarray(Image.open(out / row["overlay"]))
        assert png.shape == (64, 128, 3)
    # The library returns the bad file's error in place, the others in order.
    results = predict_images(model, [inputs / "broken.png", inputs / items[0]["subject"]])
    assert isinstance(results[0], DataError) and "broken.png" in str(results[0])
    assert results[1].score == pytest.approx(float(scores[0]), abs=1e-5)
    # A BraTS checkpoint does not take images.
    assert main(_cli(ckpt, inputs / items[0]["subject"], tmp_path / "o2")) == EXIT_USAGE


def test_non_square_image_is_warned_and_rows_follow_replaced_outputs(
    ckpt: Path, chestxray_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A radiograph of another aspect ratio is squashed to the square network size as in
    training: the run says so. x.jpg and x.png share the overlay name: when x.png's overlay
    replaces x.jpg's (--overwrite), x.jpg's row goes too, never pointing at x.png's picture."""
    chest = _variant(ckpt, tmp_path / "chest.ckpt", preprocessing={"dataset": "chestxray8"})
    name = sorted((chestxray_root / "images").iterdir())[0]
    grey = np.asarray(Image.open(name).convert("L"))  # (64, 64)
    jpg_dir, png_dir = tmp_path / "jpg", tmp_path / "png"
    jpg_dir.mkdir()
    png_dir.mkdir()
    Image.fromarray(grey).save(jpg_dir / "x.jpg", quality=95)
    Image.fromarray(np.concatenate([grey, grey[:, :32]], axis=1)).save(png_dir / "x.png")
    out = tmp_path / "out"
    assert main(_cli(chest, jpg_dir, out)) == 0
    assert "not square" not in caplog.text
    (row,) = _read_csv(out / "predictions.csv")
    assert row["input"] == str(jpg_dir / "x.jpg") and row["overlay"] == "x_overlay.png"
    assert main(_cli(chest, png_dir / "x.png", out)) == EXIT_USAGE  # the overlay exists
    assert main(_cli(chest, png_dir / "x.png", out, "--overwrite")) == 0
    assert "x.png: 96 x 64 pixels (width x height) is not square" in caplog.text
    rows = _read_csv(out / "predictions.csv")
    assert [(r["input"], r["overlay"]) for r in rows] == [(str(png_dir / "x.png"), "x_overlay.png")]
    assert np.asarray(Image.open(out / "x_overlay.png")).shape == (64, 2 * 96, 3)


def test_tiny_image_is_warned(ckpt: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A 1 x 1 PNG is scored (enlarged to the network size, as any image) with a warning that
    says the map shows the enlargement; an image of the network size is not warned about."""
    chest = _variant(ckpt, tmp_path / "chest.ckpt", preprocessing={"dataset": "chestxray8"})
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(np.full((1, 1), 128, np.uint8)).save(inputs / "dot.png")
    Image.fromarray(np.full((64, 64), 128, np.uint8)).save(inputs / "full.png")
    assert main(_cli(chest, inputs, tmp_path / "out")) == EXIT_OK
    tiny = [r.getMessage() for r in caplog.records if "is tiny" in r.getMessage()]
    assert len(tiny) == 1 and tiny[0].startswith(f"{inputs / 'dot.png'}: 1 x 1 pixels"), tiny
    assert "at least 8 px" in tiny[0]


# ----------------------------------------------------------------------------- interruptions
def _subject_copies(brats_root: Path, folder: Path, n: int) -> dict[str, str]:
    """n volumes named v00.nii.gz ... in `folder`, copies of the tumour subjects in turn;
    returns {input path: subject}."""
    folder.mkdir()
    subjects = {}
    for i in range(n):
        subject = (TUMOUR_SUBJECTS + LESION_SUBJECTS)[i % 5]
        path = folder / f"v{i:02d}.nii.gz"
        shutil.copy(_flair(brats_root, subject), path)
        subjects[str(path)] = subject
    return subjects


def _assert_complete(out: Path, subjects: dict[str, str]) -> None:
    """One row per input; every file a row names is complete (the gzip stream is read to its
    end, which checks its CRC); copies of one subject have one score; nothing half-written."""
    rows = _read_csv(out / "predictions.csv")
    assert sorted(r["input"] for r in rows) == sorted(subjects)
    by_subject: dict[str, set[str]] = {}
    for r in rows:
        by_subject.setdefault(subjects[r["input"]], set()).add(r["score"])
        for key in ("anomaly_map", "pred_mask"):
            data = np.asarray(nib.load(str(out / r[key])).dataobj)
            assert data.shape == (64, 64, 100)
        scores = _read_csv(out / r["scores"])
        assert scores[-1]["level"] == "volume" and scores[-1]["score"] == r["score"]
    assert all(len(scores) == 1 for scores in by_subject.values()), by_subject
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_interrupted_folder_predict_completes_on_the_same_command(
    ckpt: Path, brats_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C while the third volume's map is being written: the first two are complete, with
    their rows; nothing of the third appears; the same command then does the rest."""
    import pathoscope.app.predict.run as run_module
    from pathoscope.app import cli

    subjects = _subject_copies(brats_root, tmp_path / "in", 5)
    out = tmp_path / "out"
    args = ["predict", *_cli(ckpt, tmp_path / "in", out, "--slices", "70:71")]
    real = run_module.write_volume_result
    calls = []

    def interrupted(result: object, folder: Path) -> dict[str, Path]:
        calls.append(folder)
        paths = real(result, folder)
        if len(calls) == 3:
            data = paths["anomaly_map"].read_bytes()
            paths["anomaly_map"].write_bytes(data[: len(data) // 2])  # half a gzip stream
            raise KeyboardInterrupt
        return paths

    monkeypatch.setattr(run_module, "write_volume_result", interrupted)
    assert cli.main(args) == 130
    first_two = dict(list(subjects.items())[:2])
    _assert_complete(out, first_two)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("v02")) == []
    monkeypatch.setattr(run_module, "write_volume_result", real)
    assert cli.main(args) == 0  # the same command: the three missing volumes
    _assert_complete(out, subjects)


@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGINT"), reason="needs POSIX signals")
def test_sigint_to_a_folder_predict_then_the_same_command(
    ckpt: Path, brats_root: Path, tmp_path: Path
) -> None:
    """A real Ctrl-C (SIGINT to the process) once the first volume's outputs appear, then the
    same command: complete outputs and a row for every input, none truncated."""
    import os
    import signal
    import subprocess
    import sys
    import time

    subjects = _subject_copies(brats_root, tmp_path / "in", 8)
    out = tmp_path / "out"
    args = _cli(ckpt, tmp_path / "in", out, "--slices", "all", "--batch-size", "1")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "pathoscope.app.cli", "predict", *args, "--device", "cpu"]
    # The child gets SIGINT's default action, so that Python installs its Ctrl-C handler even when
    # this suite runs as a shell's background job (`make test &`), which starts with SIGINT ignored.
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 240
    while not list(out.glob("*_anomaly_map.nii.gz")) and proc.poll() is None:
        assert time.monotonic() < deadline, "no output appeared"
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()[-2000:]
    done = _read_csv(out / "predictions.csv") if (out / "predictions.csv").exists() else []
    assert 0 < len(done) < len(subjects)  # interrupted halfway, finished inputs recorded
    assert main(args) == 0  # the same command, in-process
    _assert_complete(out, subjects)
