"""`pathoscope predict`: anomaly maps for new NIfTI volumes and images with a trained checkpoint.

Everything that decides how pixels are prepared comes from the checkpoint (`model.preprocessing`,
saved from the training datamodule, and `model.tau`), and the preparation itself is the training
code: `data_modules.brats_volumes.load_volume / normalize_volume / preprocess_slices` for volumes,
`data_modules.chestxray8.load_grey_png` + `transforms.resize` for images. A BraTS checkpoint takes
volumes, a ChestX-ray8 checkpoint takes images.

Volumes (`.nii` / `.nii.gz`, or a subject folder `X/X_<modality>.nii.gz` for multi-modality
checkpoints): the array is reoriented to the training orientation (the axis codes of the training
volumes, LPS for BraTS), the axial slices in the training `slice_range` (inclusive; `--slices A:B`
or `all` to change it) that hold any voxel > 0 are scored in batches, and the results are mapped
back to the input's own orientation. Outputs per volume `<name>`:
  - `<name>_anomaly_map.nii.gz`: float32, the input's affine, header and 3D shape; each scored
    slice holds its anomaly map resized back to the slice size; other slices are 0.
  - `<name>_pred_mask.nii.gz`: uint8, 1 where anomaly_map > tau inside the foreground (voxels > 0)
    of scored slices.
  - `<name>_scores.csv`: one row per scored slice (`level=slice`: slice index in the training
    orientation, the same slice's index along the input array's axis, score, pathological) and a
    last row `level=volume` with the volume score.
  The slice score is the maximum of the slice's anomaly map inside the foreground (as in training
  and evaluation); the VOLUME SCORE is the maximum slice score over the scored slices, and a slice
  or volume is pathological when its score > tau.
Images (PNG / JPEG): `<stem>_overlay.png` (left: the image with the pred_mask outline in red,
right: the anomaly map blended over it) and one row each in `predictions.csv`.
`predictions.csv` has one row per processed input (score, decision, output files); a later run
into the same folder adds its rows. Slice scores are taken at the network size (image_size) and the
maps are resized back (area/bilinear), so a map's maximum can differ slightly from its score.
Warnings (logged and in `VolumeResult.warnings`) flag a voxel spacing more than 1.5x off the
training spacing, or a foreground fraction more than 2x off the training one (module constants).
A bad file inside a folder is reported and skipped; existing outputs are only replaced with
`--overwrite`; nothing is written inside the input folder. Slices without any voxel > 0 are not
scored.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
import torch
from nibabel.orientations import (
    apply_orientation,
    axcodes2ornt,
    io_orientation,
    ornt_transform,
)
from PIL import Image
from torch import Tensor, nn
from tqdm import tqdm

from data_modules.brats_volumes import (
    find_subject_file,
    load_volume,
    normalize_volume,
    preprocess_slices,
)
from data_modules.chestxray8 import load_grey_png
from data_modules.common import to_rgb
from data_modules.errors import DataError
from data_modules.transforms import normalize, resize
from data_modules.visualize import draw_outline
from pathoscope.inference import FoldedDetector
from pathoscope.model import PathoScope

log = logging.getLogger(__name__)

VOLUME_SUFFIXES = (".nii.gz", ".nii")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
VOLUME_DATASETS = ("brats",)
IMAGE_DATASETS = ("chestxray8",)
# Training orientation when the checkpoint does not store `axcodes`: BraTS/ITK volumes are stored
# LPS (affine diag(-1, -1, 1), as data_modules.synthetic.BRATS_AFFINE) and training reads the
# stored array as is.
DEFAULT_AXCODES = ("L", "P", "S")
# Reference values when the checkpoint does not store `voxel_spacing` / `foreground_fraction`:
# BraTS is resampled to 1 mm isotropic; a skull-stripped brain covers about 30% of a BraTS axial
# slice in the default range (60..90).
DEFAULT_SPACING_MM = (1.0, 1.0, 1.0)
DEFAULT_FOREGROUND_FRACTION = 0.3
# Warn when a voxel size or the foreground fraction differs from training by more than this factor.
SPACING_FACTOR = 1.5
FOREGROUND_FACTOR = 2.0
SUMMARY_CSV = "predictions.csv"  # one row per processed input, kept across runs


class CheckpointError(ValueError):
    """The checkpoint is not a usable PathoSCOPE checkpoint; the message names the file."""


# ----------------------------------------------------------------------------- model
def load_model(ckpt_path: str | Path, device: str = "cpu") -> PathoScope:
    """A trained PathoScope in eval mode on `device`; CheckpointError naming the file otherwise."""
    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        model = PathoScope.from_checkpoint(path, map_location="cpu")
    except Exception as exc:  # Lightning/torch raise many types for foreign files
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise CheckpointError(
            f"{path}: not a usable PathoSCOPE checkpoint (expected one written by "
            f"`pathoscope fit`): {reason}"
        ) from exc
    pre = model.preprocessing
    if pre.get("dataset") not in VOLUME_DATASETS + IMAGE_DATASETS or "image_size" not in pre:
        raise CheckpointError(
            f"{path}: the checkpoint stores no usable preprocessing settings (dataset "
            f"{pre.get('dataset')!r}; expected one of {VOLUME_DATASETS + IMAGE_DATASETS} and an "
            "image_size): was it trained with a datamodule?"
        )
    return model.to(device).eval()


def inference_net(model: PathoScope) -> nn.Module:
    """The folded graph (exact, fewer operations) when possible, else the model itself.

    Both map (image (B, 3, S, S), foreground (B, 1, S, S)) -> (score (B,), map (B, 1, S, S)).
    """
    if model.hparams.score_source == "discriminator":
        return FoldedDetector.from_model(model).to(model.device).eval()
    return model.eval()


def model_tau(model: PathoScope) -> float | None:
    """The checkpoint's image threshold, None when it was never set (no validation run)."""
    tau = float(model.tau)
    return None if math.isnan(tau) else tau


@torch.inference_mode()
def _run(
    net: nn.Module, images: Tensor, foreground: Tensor, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """images (n, 3, S, S), foreground (n, 1, S, S) -> scores (n,), anomaly maps (n, S, S)."""
    score, anomaly_map = net(images.to(device), foreground.to(device))
    return score.float().cpu().numpy(), anomaly_map[:, 0].float().cpu().numpy()


def _no_bar(progress: bool | None) -> bool | None:
    """tqdm's `disable`: None shows bars on terminals only."""
    return None if progress is None else not progress


# ----------------------------------------------------------------------------- volumes
@dataclass
class VolumeResult:
    """Predictions for one volume; arrays are in the input's orientation and 3D shape."""

    name: str
    source: Path  # the file whose affine and header the outputs carry
    anomaly_map: np.ndarray  # (X, Y, Z) float32
    pred_mask: np.ndarray | None  # (X, Y, Z) bool; None without tau
    slices: list[int]  # scored slices, training orientation
    input_indices: list[int]  # the same slices along the input array's slice axis
    slice_scores: np.ndarray  # (n,)
    score: float  # max of slice_scores
    tau: float | None
    warnings: list[str] = field(default_factory=list)

    @property
    def pathological(self) -> bool | None:
        return None if self.tau is None else bool(self.score > self.tau)


Slices = tuple[int, int] | Literal["all"] | None  # None: the training slice_range


def parse_slices(text: str) -> tuple[int, int] | Literal["all"]:
    """`A:B` (inclusive, like the training slice_range) -> (A, B); `all` -> "all"."""
    if text.strip().lower() == "all":
        return "all"
    parts = text.split(":")
    try:
        lo, hi = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected A:B (inclusive slice range, e.g. 60:90) or 'all', got {text!r}"
        ) from None
    if not 0 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"expected 0 <= A <= B in A:B, got {text!r}")
    return lo, hi


def _read_nifti(path: Path, channel: int | None) -> tuple[np.ndarray, Any]:
    """(X, Y, Z) float32 data and the nibabel image; 4D needs `channel` (DataError otherwise)."""
    try:
        img = nib.load(str(path))
    except Exception as exc:
        raise DataError(f"{path}: cannot read NIfTI header ({exc})") from exc
    shape = tuple(int(s) for s in img.shape)
    if len(shape) == 4 and shape[3] > 1:
        if channel is None:
            raise DataError(
                f"{path}: expected a 3D volume, got shape {shape} ({shape[3]} volumes): pass "
                f"--channel N (0..{shape[3] - 1}) to pick one"
            )
        if not 0 <= channel < shape[3]:
            raise DataError(
                f"{path}: --channel {channel} out of range for shape {shape} (0..{shape[3] - 1})"
            )
        try:
            data = np.asarray(img.dataobj[..., channel], dtype=np.float32)
        except Exception as exc:
            raise DataError(f"{path}: cannot read the volume data ({exc})") from exc
        return data, img
    return load_volume(path), img  # the training reader: 3D check, read errors


def volume_files(path: Path, modalities: Sequence[str]) -> list[Path]:
    """The files of one volume input: a NIfTI file (one modality) or a subject folder."""
    if path.is_dir():
        return [find_subject_file(path, m) for m in modalities]
    if len(modalities) > 1:
        raise DataError(
            f"{path}: the checkpoint uses the modalities {list(modalities)}: give the subject "
            f"folder holding <name>_{modalities[0]}.nii.gz ... instead of one file"
        )
    return [path]


def _volume_name(path: Path) -> str:
    name = path.name
    for suffix in VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _check_domain(
    spacing: np.ndarray, fraction: float, pre: dict[str, Any], where: str
) -> list[str]:
    """Warnings when the voxel size or foreground fraction is far from the training data's."""
    out = []
    ref_spacing = np.asarray(pre.get("voxel_spacing") or DEFAULT_SPACING_MM, dtype=float)
    ratio = spacing / ref_spacing
    if np.any(ratio > SPACING_FACTOR) or np.any(ratio < 1.0 / SPACING_FACTOR):
        out.append(
            f"{where}: voxel spacing {np.round(spacing, 3).tolist()} mm (training orientation) "
            f"is far from the training data's {ref_spacing.tolist()} mm; maps may be unreliable "
            "(resample the volume to the training spacing)"
        )
    ref_fraction = float(pre.get("foreground_fraction") or DEFAULT_FOREGROUND_FRACTION)
    if not ref_fraction / FOREGROUND_FACTOR <= fraction <= ref_fraction * FOREGROUND_FACTOR:
        out.append(
            f"{where}: {fraction:.0%} of the scored voxels are foreground (> 0), far from about "
            f"{ref_fraction:.0%} in training; is the volume skull-stripped with a zero background?"
        )
    return out


def predict_volume(
    model: PathoScope,
    path: str | Path,
    slices: Slices = None,
    channel: int | None = None,
    batch_size: int = 16,
    progress: bool | None = False,
    net: nn.Module | None = None,
) -> VolumeResult:
    """Score one volume (NIfTI file or subject folder) with the checkpoint's preprocessing.

    `slices`: None (the training slice_range), (A, B) inclusive, or "all".
    Returns the maps in the input's orientation (module docstring); DataError for bad input.
    """
    path = Path(path)
    pre = model.preprocessing
    files = volume_files(path, list(pre.get("modality") or ["flair"]))
    raws, ref = [], None
    for f in files:
        data, img = _read_nifti(f, channel)
        if ref is None:
            ref = img
        elif data.shape != raws[0].shape or not np.allclose(img.affine, ref.affine, atol=1e-3):
            raise DataError(f"{f}: shape or affine differs from {files[0].name}")
        raws.append(data)
    assert ref is not None
    shape = raws[0].shape

    # Reorient to the training orientation (flips / axis permutation only, no resampling).
    axcodes = tuple(pre.get("axcodes") or DEFAULT_AXCODES)
    to_train = ornt_transform(io_orientation(ref.affine), axcodes2ornt(axcodes))
    volumes = [np.ascontiguousarray(apply_orientation(v, to_train)) for v in raws]
    spacing = np.empty(3)
    for axis, (dest, _) in enumerate(to_train):
        spacing[int(dest)] = float(ref.header.get_zooms()[axis])
    depth = volumes[0].shape[2]
    if slices is None:
        slices = tuple(pre.get("slice_range") or (0, depth - 1))
    lo, hi = (0, depth - 1) if slices == "all" else (int(slices[0]), int(slices[1]))
    if hi >= depth:
        raise DataError(
            f"{files[0]}: slices {lo}..{hi} need {hi + 1} axial slices, the volume has {depth} "
            "(pass --slices A:B or --slices all)"
        )
    foreground = np.max([v > 0 for v in volumes], axis=0)  # (X', Y', Z') training orientation
    candidates = list(range(lo, hi + 1))
    scored = [k for k in candidates if foreground[:, :, k].any()]
    if not scored:
        raise DataError(f"{files[0]}: no voxel > 0 in axial slices {lo}..{hi}")
    warnings = _check_domain(spacing, float(foreground[:, :, lo : hi + 1].mean()), pre, str(path))
    for w in warnings:
        log.warning(w)

    normed = []
    for f, v in zip(files, volumes, strict=True):
        try:
            normed.append(normalize_volume(v))  # per volume and modality, as in training
        except DataError as err:
            raise DataError(f"{f}: {err}") from None

    # Score in batches; maps go back to the slice size (training orientation).
    net = net or inference_net(model)
    size = int(pre["image_size"])
    amap = np.zeros(volumes[0].shape, dtype=np.float32)
    scores = []
    bar = tqdm(total=len(scored), desc=path.name, unit="slice", disable=_no_bar(progress))
    for start in range(0, len(scored), batch_size):
        ks = scored[start : start + batch_size]
        arrays = preprocess_slices(normed, ks, size)  # image (n, S, S, C), foreground (n, S, S)
        images = torch.stack([normalize(to_rgb(im)) for im in arrays["image"]])  # (n, 3, S, S)
        fg = torch.from_numpy(arrays["foreground"][:, None])  # (n, 1, S, S)
        batch_scores, maps = _run(net, images, fg, model.device)
        scores.extend(batch_scores.tolist())
        for k, m in zip(ks, maps, strict=True):
            full, _ = resize(m[:, :, None], amap.shape[:2])
            amap[:, :, k] = full.reshape(amap.shape[:2])
        bar.update(len(ks))
    bar.close()

    tau = model_tau(model)
    pred = None
    if tau is not None:
        in_range = np.zeros(amap.shape, dtype=bool)
        in_range[:, :, scored] = True
        pred = (amap > tau) & foreground & in_range
    # Back to the input's orientation.
    to_input = ornt_transform(axcodes2ornt(axcodes), io_orientation(ref.affine))
    amap_in = np.ascontiguousarray(apply_orientation(amap, to_input))
    pred_in = None if pred is None else np.ascontiguousarray(apply_orientation(pred, to_input))
    assert amap_in.shape == shape, (amap_in.shape, shape)
    # Slice k (training) lies along the input axis that maps to training axis 2.
    src_axis = int(np.flatnonzero(to_train[:, 0] == 2)[0])
    flipped = to_train[src_axis, 1] < 0
    n_src = shape[src_axis]
    input_indices = [n_src - 1 - k if flipped else k for k in scored]
    slice_scores = np.asarray(scores, dtype=np.float64)
    return VolumeResult(
        name=path.name if path.is_dir() else _volume_name(path),
        source=files[0],
        anomaly_map=amap_in,
        pred_mask=pred_in,
        slices=scored,
        input_indices=input_indices,
        slice_scores=slice_scores,
        score=float(slice_scores.max()),
        tau=tau,
        warnings=warnings,
    )


def volume_outputs(name: str, out_dir: Path) -> dict[str, Path]:
    return {
        "anomaly_map": out_dir / f"{name}_anomaly_map.nii.gz",
        "pred_mask": out_dir / f"{name}_pred_mask.nii.gz",
        "scores": out_dir / f"{name}_scores.csv",
    }


def _save_like(array: np.ndarray, ref: Path, path: Path, dtype: type, descrip: str) -> None:
    """Save `array` with the affine and header of the NIfTI file `ref` (data type changed)."""
    img = nib.load(str(ref))
    header = img.header.copy()
    header.set_data_dtype(dtype)
    out = type(img)(array.astype(dtype), img.affine, header)
    out.header.set_slope_inter(1.0, 0.0)  # the input's scaling must not apply to the map
    top = float(array.max())
    out.header["cal_min"], out.header["cal_max"] = 0.0, top if top > 0 else 1.0  # viewer window
    out.header["descrip"] = descrip.encode()[:79]
    nib.save(out, str(path))


def write_volume_result(result: VolumeResult, out_dir: Path) -> dict[str, Path]:
    """Write the NIfTI maps and the per-slice CSV; returns the written paths."""
    paths = volume_outputs(result.name, out_dir)
    _save_like(result.anomaly_map, result.source, paths["anomaly_map"], np.float32, "anomaly_map")
    if result.pred_mask is not None:
        _save_like(result.pred_mask, result.source, paths["pred_mask"], np.uint8, "pred_mask")
    else:
        del paths["pred_mask"]
    tau = result.tau
    with open(paths["scores"], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["level", "slice", "input_index", "score", "pathological"])
        for k, i, s in zip(result.slices, result.input_indices, result.slice_scores, strict=True):
            writer.writerow(["slice", k, i, f"{s:.6g}", _decision(s, tau)])
        writer.writerow(["volume", "", "", f"{result.score:.6g}", _decision(result.score, tau)])
    return paths


def _decision(score: float, tau: float | None) -> str:
    return "" if tau is None else str(int(score > tau))


# ----------------------------------------------------------------------------- images
@dataclass
class ImageResult:
    """Predictions for one image at its own size (H, W)."""

    path: Path
    image: np.ndarray  # (H, W) grey [0, 1]
    anomaly_map: np.ndarray  # (H, W) float32
    score: float
    tau: float | None

    @property
    def pred_mask(self) -> np.ndarray | None:
        return None if self.tau is None else self.anomaly_map > self.tau

    @property
    def pathological(self) -> bool | None:
        return None if self.tau is None else bool(self.score > self.tau)


def predict_images(
    model: PathoScope,
    paths: Sequence[str | Path],
    batch_size: int = 16,
    net: nn.Module | None = None,
) -> list[ImageResult | DataError]:
    """Score images with the checkpoint's preprocessing; a bad file gives its DataError in place.

    Results are in the order of `paths`.
    """
    net = net or inference_net(model)
    size = int(model.preprocessing["image_size"])
    tau = model_tau(model)
    results: list[ImageResult | DataError] = []
    for start in range(0, len(paths), batch_size):
        batch: list[ImageResult | DataError | None] = []  # None: scored below
        loaded: list[tuple[int, Path, np.ndarray]] = []
        for p in paths[start : start + batch_size]:
            try:
                grey = load_grey_png(p)  # (H, W) [0, 1], the training reader
            except DataError as err:
                batch.append(err)
                continue
            loaded.append((len(batch), Path(p), grey))
            batch.append(None)
        if loaded:
            images = torch.stack(
                [normalize(to_rgb(resize(grey[:, :, None], size)[0])) for _, _, grey in loaded]
            )  # (n, 3, S, S)
            fg = torch.ones(len(loaded), 1, size, size, dtype=torch.bool)  # whole image
            scores, maps = _run(net, images, fg, model.device)
            for (i, p, grey), s, m in zip(loaded, scores, maps, strict=True):
                full, _ = resize(m[:, :, None], grey.shape)
                batch[i] = ImageResult(p, grey, full.reshape(grey.shape), float(s), tau)
        results.extend(r for r in batch if r is not None)
    return results


def overlay(result: ImageResult) -> np.ndarray:
    """(H, 2W, 3) uint8: the image with the pred_mask outline | the anomaly map over the image."""
    import matplotlib

    grey = np.repeat(result.image[:, :, None], 3, axis=2)
    left = grey if result.pred_mask is None else draw_outline(grey, result.pred_mask)
    heat = matplotlib.colormaps["jet"](np.clip(result.anomaly_map, 0.0, 1.0))[..., :3]
    right = 0.5 * grey + 0.5 * heat
    return (np.concatenate([left, right], axis=1) * 255.0).round().astype(np.uint8)


def image_output(path: Path, out_dir: Path) -> Path:
    return out_dir / f"{path.stem}_overlay.png"


# ----------------------------------------------------------------------------- runs
@dataclass
class PredictRun:
    """What `run_predict` did: the rows of predictions.csv and the inputs it skipped."""

    rows: list[dict[str, Any]]
    skipped: list[tuple[str, str]]  # (input, reason)
    warnings: list[str]


def _is_subject(folder: Path, modalities: Sequence[str]) -> bool:
    try:
        volume_files(folder, modalities)
    except DataError:
        return False
    return True


def collect_inputs(path: Path, pre: dict[str, Any]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Inputs under `path` for the checkpoint's kind, plus (entry, reason) for unusable entries.

    A single file or subject folder is one input; any other folder contributes its files and
    subject folders (sorted; hidden entries ignored). DataError when nothing is usable there.
    """
    volumes = pre["dataset"] in VOLUME_DATASETS
    modalities = list(pre.get("modality") or ["flair"])
    kind = "NIfTI volume (.nii, .nii.gz)" if volumes else "image (.png, .jpg, .jpeg)"
    if not path.exists():
        raise DataError(f"{path}: input does not exist")
    if path.is_file() or (volumes and _is_subject(path, modalities)):
        _check_kind(path, volumes, modalities, kind)
        return [path], []
    entries = sorted(p for p in path.iterdir() if not p.name.startswith("."))
    if not entries:
        raise DataError(f"{path}: empty folder (expected {kind} files)")
    inputs, skipped = [], []
    for entry in entries:
        try:
            _check_kind(entry, volumes, modalities, kind)
            inputs.append(entry)
        except DataError as err:
            skipped.append((str(entry), str(err)))
    if not inputs:
        raise DataError(
            f"{path}: no usable input: expected {kind} files"
            + (" or subject folders" if volumes else "")
            + f" ({len(entries)} entries, e.g. {skipped[0][1]})"
        )
    return inputs, skipped


def _check_kind(path: Path, volumes: bool, modalities: Sequence[str], kind: str) -> None:
    if path.is_dir():
        if volumes and _is_subject(path, modalities):
            return
        what = f"a subject folder with <name>_{modalities[0]}.nii.gz" if volumes else "a file"
        raise DataError(f"{path}: not {what}")
    name = path.name.lower()
    if name.endswith(VOLUME_SUFFIXES + IMAGE_SUFFIXES):
        if name.endswith(VOLUME_SUFFIXES) == volumes:
            if volumes:
                volume_files(path, modalities)  # one file cannot serve several modalities
            return
        raise DataError(
            f"{path}: this checkpoint was trained on "
            f"{'volumes' if volumes else 'images'}: expected a {kind}"
        )
    raise DataError(f"{path}: not a {kind}")


def _output_name(entry: Path) -> str:
    return entry.stem if entry.name.lower().endswith(IMAGE_SUFFIXES) else _volume_name(entry)


def run_predict(
    ckpt_path: str | Path,
    input_path: str | Path,
    output: str | Path,
    slices: Slices = None,
    channel: int | None = None,
    batch_size: int = 16,
    overwrite: bool = False,
    device: str = "cpu",
    progress: bool | None = None,
) -> PredictRun:
    """Everything `pathoscope predict` does (module docstring).

    Fatal problems raise DataError / CheckpointError: a bad checkpoint, a bad single input (file
    or subject folder), an empty folder, or a folder where no input could be processed. Inside a
    folder, bad inputs are reported (logging) and skipped. `predictions.csv` gains the rows of
    this run (rows of earlier runs for other inputs are kept).
    """
    model = load_model(ckpt_path, device)
    pre = model.preprocessing
    input_path, out_dir = Path(input_path).expanduser(), Path(output).expanduser()
    if input_path.is_dir() and (
        out_dir.resolve() == input_path.resolve() or input_path.resolve() in out_dir.parents
    ):
        raise DataError(f"{out_dir}: the output folder must not be inside the input {input_path}")
    inputs, skipped = collect_inputs(input_path, pre)
    single = inputs == [input_path]
    volumes = pre["dataset"] in VOLUME_DATASETS

    def fail(entry: Path, err: DataError) -> None:
        if single:
            raise err
        skipped.append((str(entry), str(err)))

    # Each input's outputs: duplicates and existing files are skipped, never overwritten.
    planned: dict[str, Path] = {}
    todo = []
    for entry in inputs:
        name = _output_name(entry)
        outs = (
            list(volume_outputs(name, out_dir).values())
            if volumes
            else [image_output(entry, out_dir)]
        )
        if name in planned:
            fail(entry, DataError(f"{entry}: output name {name!r} also used by {planned[name]}"))
        elif not overwrite and (existing := [p for p in outs if p.exists()]):
            fail(entry, DataError(f"{existing[0]}: exists (pass --overwrite to replace it)"))
        else:
            planned[name] = entry
            todo.append(entry)
    if todo:
        out_dir.mkdir(parents=True, exist_ok=True)
    tau = model_tau(model)
    if tau is None:
        log.warning("the checkpoint has no tau (no validation run): no pred_mask, no decisions")

    net = inference_net(model)
    rows: list[dict[str, Any]] = []
    warnings: list[str] = []
    if volumes:
        bar_off = True if len(todo) < 2 else _no_bar(progress)
        for entry in tqdm(todo, desc="volumes", unit="volume", disable=bar_off):
            try:
                result = predict_volume(
                    model, entry, slices, channel, batch_size, progress=progress, net=net
                )
            except DataError as err:
                fail(entry, err)
                continue
            paths = write_volume_result(result, out_dir)
            warnings.extend(result.warnings)
            rows.append(
                {
                    "input": str(entry),
                    "score": f"{result.score:.6g}",
                    "pathological": _decision(result.score, tau),
                    "scored_slices": len(result.slices),
                    **{k: p.name for k, p in paths.items()},
                }
            )
    else:
        for entry, result in zip(todo, predict_images(model, todo, batch_size, net), strict=True):
            if isinstance(result, DataError):
                fail(entry, result)
                continue
            out = image_output(entry, out_dir)
            Image.fromarray(overlay(result)).save(out)
            rows.append(
                {
                    "input": str(entry),
                    "score": f"{result.score:.6g}",
                    "pathological": _decision(result.score, tau),
                    "overlay": out.name,
                }
            )
    for _, reason in skipped:
        log.warning("skipped %s", reason)
    if not rows:
        first = f": {skipped[0][1]}" if skipped else ""
        raise DataError(
            f"{input_path}: no input could be processed ({len(skipped)} skipped){first}"
        )
    _update_summary(out_dir / SUMMARY_CSV, rows)
    return PredictRun(rows, skipped, warnings)


def _update_summary(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write `rows` to predictions.csv, keeping earlier rows of other inputs."""
    old: list[dict[str, Any]] = []
    if path.is_file():
        with open(path, newline="") as f:
            old = list(csv.DictReader(f))
    new_inputs = {r["input"] for r in rows}
    merged = [r for r in old if r.get("input") not in new_inputs] + rows
    fields = list(dict.fromkeys(k for r in merged for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(merged)


# ----------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pathoscope predict",
        description=(
            "Anomaly maps for NIfTI volumes (a file, a subject folder, a folder of them) or "
            "PNG/JPEG images (a file or a folder) with the preprocessing stored in the checkpoint."
        ),
    )
    parser.add_argument("--ckpt_path", required=True, help="checkpoint written by pathoscope fit")
    parser.add_argument("--input", required=True, help="volume, subject folder, image or folder")
    parser.add_argument("--output", required=True, help="output folder (created)")
    parser.add_argument(
        "--slices",
        type=parse_slices,
        default=None,
        help="axial slices A:B, inclusive, in the training orientation, or 'all' "
        "(default: the training slice_range)",
    )
    parser.add_argument(
        "--channel", type=int, default=None, help="volume index N of 4D NIfTI inputs"
    )
    parser.add_argument("--batch-size", type=int, default=16, help="slices/images per batch")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda if any"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """`pathoscope predict ...`: 0 when at least one input was processed, 1 on an error."""
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        if device == "cuda" and not torch.cuda.is_available():
            raise DataError("--device cuda: no CUDA device is available (use --device cpu)")
        if args.batch_size < 1:
            raise DataError(f"--batch-size must be >= 1, got {args.batch_size}")
        run = run_predict(
            args.ckpt_path,
            args.input,
            args.output,
            slices=args.slices,
            channel=args.channel,
            batch_size=args.batch_size,
            overwrite=args.overwrite,
            device=device,
        )
    except (DataError, CheckpointError, OSError) as err:
        print(f"pathoscope predict: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    print(
        f"pathoscope predict: {len(run.rows)} input(s) written to {args.output}"
        + (f", {len(run.skipped)} skipped" if run.skipped else "")
    )
    return 0
