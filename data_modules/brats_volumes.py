"""BraTS2020 volumes on disk: finding a subject's files, reading NIfTI, normalising, slicing.

The training data module (brats.py) and `pathoscope predict` both prepare pixels with these, so
that new volumes are preprocessed exactly as the training slices were.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from data_modules.errors import DataError
from data_modules.transforms import resize

BRATS_DIRNAME = "MICCAI_BraTS2020_TrainingData"
CLIP_PERCENTILE = 99.5
NIFTI_SUFFIXES = (".nii.gz", ".nii")


def rel_name(path: Path) -> str:
    """`subject_folder/file` for messages."""
    return f"{path.parent.name}/{path.name}"


def load_volume(path: str | Path) -> np.ndarray:
    """A 3D NIfTI volume as float32 (H, W, D); DataError naming the file when it is not one."""
    path = Path(path)
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for bad headers
        raise DataError(f"{rel_name(path)}: cannot read NIfTI header ({exc})") from exc
    check_3d(path, img.shape)
    try:
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:  # truncated gzip: EOFError, OSError, zlib.error...
        raise DataError(f"{rel_name(path)}: cannot read the volume data ({exc})") from exc
    check_finite(path, data)
    return data.reshape(data.shape[:3])


def check_finite(path: Path, data: np.ndarray) -> None:
    """DataError naming the file and the count when voxels are NaN or infinite (they would make
    every normalised value and score NaN, or silently clip)."""
    bad = int(data.size - np.count_nonzero(np.isfinite(data)))
    if bad:
        raise DataError(
            f"{rel_name(path)}: {bad} of {data.size} voxels are not finite (NaN or infinity); "
            "expected finite intensities (replace them, e.g. by 0 outside the brain)"
        )


def check_3d(path: Path, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(H, W, D) of a NIfTI shape (trailing 1s dropped); DataError naming the file otherwise."""
    core = tuple(int(s) for s in shape)
    while len(core) > 3 and core[-1] == 1:  # (H, W, D, 1) is still one volume
        core = core[:-1]
    if len(core) != 3:
        raise DataError(f"{rel_name(path)}: expected a 3D volume, got shape {tuple(shape)}")
    return core[0], core[1], core[2]


INTENSITY_NORMS = ("percentile", "median")


def normalize_volume(volume: np.ndarray, method: str = "percentile") -> np.ndarray:
    """Scale the voxels > 0 to [0, 1] (float32, same shape).

    "percentile": divide by p99.5 of the brain voxels, clip at 1. "median" (ours): divide by twice
    the median of the brain voxels, clip at 1, so normal tissue lands at the same level whatever
    the lesion: a large hyperintense tumour moves p99.5 (by up to 40 % on FLAIR) and with it every
    normal voxel of its volume, but hardly moves the median.
    """
    brain = volume[volume > 0]
    if brain.size == 0:
        raise DataError("all voxels are zero")
    if method == "percentile":
        top = float(np.percentile(brain, CLIP_PERCENTILE))
    elif method == "median":
        top = 2.0 * float(np.median(brain))
    else:
        raise ValueError(f"intensity_norm must be one of {INTENSITY_NORMS}, got {method!r}")
    return (np.clip(volume, 0.0, top) / top).astype(np.float32)


def preprocess_slices(
    volumes: list[np.ndarray],
    slices: list[int],
    image_size: int,
    seg: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Normalised volumes (one per channel) -> resized axial slices.

    Returns `image` (N, S, S, C) float32, `foreground` (N, S, S) bool (any channel > 0) and, when
    `seg` (H, W, D) is given, `gt_mask` (N, S, S) bool (seg > 0). Axial slice k = vol[:, :, k].
    """
    out: dict[str, list[np.ndarray]] = {"image": [], "foreground": [], "gt_mask": []}
    for k in slices:
        image = np.stack([v[:, :, k] for v in volumes], axis=-1)  # (H, W, C)
        masks = {"foreground": image.max(axis=-1) > 0}
        if seg is not None:
            masks["gt_mask"] = seg[:, :, k] > 0
        image, masks = resize(image, image_size, masks)
        out["image"].append(image)
        for name, mask in masks.items():
            out[name].append(mask)
    return {name: np.stack(arrays) for name, arrays in out.items() if arrays}


def find_subject_file(folder: Path, key: str) -> Path:
    """`{folder}_{key}.nii[.gz]`, else the one file ending `_{key}.nii[.gz]`; DataError if none."""
    for suffix in NIFTI_SUFFIXES:
        path = folder / f"{folder.name}_{key}{suffix}"
        if path.is_file():
            return path
    matches = sorted(p for s in NIFTI_SUFFIXES for p in folder.glob(f"*_{key}{s}"))
    if len(matches) == 1:
        return matches[0]
    found = sorted(p.name for p in folder.iterdir())
    raise DataError(
        f"{folder.name}/{folder.name}_{key}.nii.gz: missing (expected "
        f"{folder.name}_{key}.nii or .nii.gz; the folder has {found})"
    )


def find_subject_dirs(root: str | Path) -> list[Path]:
    """Sorted subject folders under `root` (or its `MICCAI_BraTS2020_TrainingData` folder)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise DataError(f"{root}: BraTS root folder {what}")
    base = root / BRATS_DIRNAME if (root / BRATS_DIRNAME).is_dir() else root
    dirs = sorted(
        d
        for d in base.iterdir()
        if d.is_dir() and any(p.name.endswith(NIFTI_SUFFIXES) for p in d.iterdir())
    )
    if not dirs:
        raise DataError(
            f"{root}: no subject folders with .nii/.nii.gz files (expected {BRATS_DIRNAME}/"
            "BraTS20_Training_XXX/BraTS20_Training_XXX_flair.nii.gz ...)"
        )
    return dirs
