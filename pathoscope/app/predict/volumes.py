"""Volumes for `pathoscope predict`: NIfTI files or subject folders -> maps in the input's space.

The array is reoriented to the training orientation (the axis codes of the training volumes, LPS
for BraTS), the axial slices in the training `slice_range` that hold any voxel > 0 are scored in
batches with the training code's preprocessing (`data_modules.brats_volumes`), and the results are
mapped back to the input's own orientation (pathoscope/app/predict/run.py describes the outputs).
"""

from __future__ import annotations

import argparse
import csv
import logging
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
from torch import nn
from tqdm import tqdm

from data_modules.brats_volumes import (
    check_finite,
    find_subject_file,
    load_volume,
    normalize_volume,
    preprocess_slices,
)
from data_modules.common import to_rgb
from data_modules.errors import DataError
from data_modules.transforms import normalize, resize
from pathoscope.app.predict.common import decision, no_bar, score_batch, size_warnings
from pathoscope.app.predict.montage import write_montage
from pathoscope.folded import inference_net
from pathoscope.postprocess import pathological, tau_value
from pathoscope.torch_model import PathoScopeModel

log = logging.getLogger(__name__)

VOLUME_SUFFIXES = (".nii.gz", ".nii")
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
    # The scored slices as the network saw them (training orientation), for the montage:
    slice_images: np.ndarray  # (n, X', Y') the first modality, normalised to [0, 1]
    slice_maps: np.ndarray  # (n, X', Y') float32 anomaly_map
    slice_foreground: np.ndarray  # (n, X', Y') bool
    warnings: list[str] = field(default_factory=list)

    @property
    def pathological(self) -> bool | None:
        return None if self.tau is None else bool(pathological(self.score, self.tau))


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
        check_finite(path, data)
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


def volume_name(path: Path) -> str:
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


def _read_volumes(files: list[Path], channel: int | None) -> tuple[list[np.ndarray], Any]:
    """The modalities' arrays and the first file's image (affine, header); one shape and affine."""
    raws, ref = [], None
    for f in files:
        data, img = _read_nifti(f, channel)
        if ref is None:
            ref = img
        elif data.shape != raws[0].shape or not np.allclose(img.affine, ref.affine, atol=1e-3):
            raise DataError(f"{f}: shape or affine differs from {files[0].name}")
        raws.append(data)
    assert ref is not None
    return raws, ref


def _to_training(
    raws: list[np.ndarray], ref: Any, axcodes: tuple[str, ...]
) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """Reorient to the training orientation (flips / axis permutation only, no resampling):
    (the orientation transform, the volumes, the voxel spacing in that orientation)."""
    to_train = ornt_transform(io_orientation(ref.affine), axcodes2ornt(axcodes))
    volumes = [np.ascontiguousarray(apply_orientation(v, to_train)) for v in raws]
    spacing = np.empty(3)
    for axis, (dest, _) in enumerate(to_train):
        spacing[int(dest)] = float(ref.header.get_zooms()[axis])
    return to_train, volumes, spacing


def _normalised(files: list[Path], volumes: list[np.ndarray], method: str) -> list[np.ndarray]:
    """Per volume and modality, as in training (checkpoints before the option: percentile)."""
    normed = []
    for f, v in zip(files, volumes, strict=True):
        try:
            normed.append(normalize_volume(v, method))
        except DataError as err:
            raise DataError(f"{f}: {err}") from None
    return normed


def _scored_slices(
    foreground: np.ndarray, slices: Slices, pre: dict[str, Any], first: Path
) -> tuple[int, int, list[int]]:
    """(lo, hi, the slices of lo..hi with a voxel > 0) in training orientation."""
    depth = foreground.shape[2]
    if slices is None:
        slices = tuple(pre.get("slice_range") or (0, depth - 1))
    lo, hi = (0, depth - 1) if slices == "all" else (int(slices[0]), int(slices[1]))
    if hi >= depth:
        raise DataError(
            f"{first}: slices {lo}..{hi} need {hi + 1} axial slices, the volume has {depth} "
            "(pass --slices A:B or --slices all)"
        )
    scored = [k for k in range(lo, hi + 1) if foreground[:, :, k].any()]
    if not scored:
        raise DataError(f"{first}: no voxel > 0 in axial slices {lo}..{hi}")
    return lo, hi, scored


def _score_slices(
    net: nn.Module,
    model: PathoScopeModel,
    normed: list[np.ndarray],
    scored: list[int],
    batch_size: int,
    bar: Any,
) -> tuple[np.ndarray, list[float]]:
    """Anomaly map (X', Y', Z') of the scored slices at the slice size, and their scores."""
    size = int(model.preprocessing["image_size"])
    amap = np.zeros(normed[0].shape, dtype=np.float32)
    scores: list[float] = []
    for start in range(0, len(scored), batch_size):
        ks = scored[start : start + batch_size]
        arrays = preprocess_slices(normed, ks, size)  # image (n, S, S, C), foreground (n, S, S)
        images = torch.stack([normalize(to_rgb(im)) for im in arrays["image"]])  # (n, 3, S, S)
        fg = torch.from_numpy(arrays["foreground"][:, None])  # (n, 1, S, S)
        batch_scores, maps = score_batch(net, images, fg, model.tau.device)
        scores.extend(batch_scores.tolist())
        for k, m in zip(ks, maps, strict=True):
            full, _ = resize(m[:, :, None], amap.shape[:2])
            amap[:, :, k] = full.reshape(amap.shape[:2])
        bar.update(len(ks))
    bar.close()
    return amap, scores


def _input_indices(to_train: np.ndarray, shape: tuple[int, ...], scored: list[int]) -> list[int]:
    """Slice k (training) lies along the input axis that maps to training axis 2."""
    src_axis = int(np.flatnonzero(to_train[:, 0] == 2)[0])
    flipped = to_train[src_axis, 1] < 0
    n_src = shape[src_axis]
    return [n_src - 1 - k if flipped else k for k in scored]


def predict_volume(
    model: PathoScopeModel,
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
    raws, ref = _read_volumes(files, channel)
    shape = raws[0].shape

    axcodes = tuple(pre.get("axcodes") or DEFAULT_AXCODES)
    to_train, volumes, spacing = _to_training(raws, ref, axcodes)
    foreground = np.max([v > 0 for v in volumes], axis=0)  # (X', Y', Z') training orientation
    lo, hi, scored = _scored_slices(foreground, slices, pre, files[0])
    warnings = _check_domain(spacing, float(foreground[:, :, lo : hi + 1].mean()), pre, str(path))
    for w in warnings:
        log.warning(w)
    warnings += size_warnings(f"{path} (axial slices)", volumes[0].shape, int(pre["image_size"]))

    normed = _normalised(files, volumes, str(pre.get("intensity_norm", "percentile")))
    bar = tqdm(total=len(scored), desc=path.name, unit="slice", disable=no_bar(progress))
    amap, scores = _score_slices(
        net or inference_net(model), model, normed, scored, batch_size, bar
    )
    tau = tau_value(model.tau)
    pred = None
    if tau is not None:
        in_range = np.zeros(amap.shape, dtype=bool)
        in_range[:, :, scored] = True
        pred = pathological(amap, tau) & foreground & in_range
    # Back to the input's orientation.
    to_input = ornt_transform(axcodes2ornt(axcodes), io_orientation(ref.affine))
    amap_in = np.ascontiguousarray(apply_orientation(amap, to_input))
    pred_in = None if pred is None else np.ascontiguousarray(apply_orientation(pred, to_input))
    assert amap_in.shape == shape, (amap_in.shape, shape)
    slice_scores = np.asarray(scores, dtype=np.float64)
    return VolumeResult(
        name=path.name if path.is_dir() else volume_name(path),
        source=files[0],
        anomaly_map=amap_in,
        pred_mask=pred_in,
        slices=scored,
        input_indices=_input_indices(to_train, shape, scored),
        slice_scores=slice_scores,
        score=float(slice_scores.max()),
        tau=tau,
        slice_images=np.moveaxis(normed[0][:, :, scored], -1, 0),
        slice_maps=np.moveaxis(amap[:, :, scored], -1, 0),
        slice_foreground=np.moveaxis(foreground[:, :, scored], -1, 0),
        warnings=warnings,
    )


def volume_outputs(name: str, out_dir: Path) -> dict[str, Path]:
    return {
        "anomaly_map": out_dir / f"{name}_anomaly_map.nii.gz",
        "pred_mask": out_dir / f"{name}_pred_mask.nii.gz",
        "scores": out_dir / f"{name}_scores.csv",
        "montage": out_dir / f"{name}_montage.png",
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
    """Write the NIfTI maps, the per-slice CSV and the montage; returns the written paths."""
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
            writer.writerow(["slice", k, i, f"{s:.6g}", decision(s, tau)])
        writer.writerow(["volume", "", "", f"{result.score:.6g}", decision(result.score, tau)])
    write_montage(
        paths["montage"],
        name=result.name,
        images=result.slice_images,
        maps=result.slice_maps,
        foreground=result.slice_foreground,
        slices=result.slices,
        scores=result.slice_scores,
        tau=tau,
    )
    return paths
