"""A synthetic BraTS2020 training set: `write_brats` writes
`MICCAI_BraTS2020_TrainingData/BraTS20_Training_XXX/BraTS20_Training_XXX_{flair,t1,t1ce,t2,seg}.nii.gz`.
A skull-stripped phantom brain (BraTS ships skull-stripped volumes, so everything outside the
brain is 0): per-subject ellipsoid shape, a thin sulcal CSF rim,
a folded grey-matter cortex, white matter, deep grey nuclei and lateral ventricles; four
modalities with plausible relative contrast, a smooth bias field and Rician-like noise. Tumours
carry BraTS labels 1 (necrotic / non-enhancing core), 2 (oedema) and 4 (enhancing ring); their
contrast varies per subject from obvious to subtle and they have their own mottled texture, so
a subtle tumour differs from normal tissue by texture as well as brightness. Subjects are of four
kinds with respect to `slice_range`: tumour straddling one end of the range (healthy and tumorous
slices in range), tumour covering the whole range (no healthy slice), tumour outside the range,
no tumour. The last subject ships a misnamed segmentation like real case 355.
"""

from __future__ import annotations

import gzip
import math
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from data_modules.errors import DataError
from data_modules.synthetic.noise import sigmoid, smooth_noise

BRATS_DIRNAME = "MICCAI_BraTS2020_TrainingData"
BRATS_MODALITIES = ("flair", "t1", "t1ce", "t2")
# Stand-in for real case 355's misnamed segmentation file.
MISNAMED_SEG = "W39_1998.09.19_Segm.nii.gz"
# BraTS / ITK volumes are stored in LPS: x and y flipped with respect to RAS.
BRATS_AFFINE = np.diag([-1.0, -1.0, 1.0, 1.0])

# Relative tissue intensities per modality (index 0 = background is never used).
# Columns: CSF, grey matter, white matter, necrotic core (1), oedema (2), enhancing tumour (4).
_TISSUE = {
    "t1": (0.30, 0.62, 0.85, 0.30, 0.52, 0.60),
    "t1ce": (0.30, 0.62, 0.85, 0.26, 0.50, 1.35),
    "t2": (1.40, 0.80, 0.55, 1.30, 1.12, 0.85),
    "flair": (0.25, 0.80, 0.62, 0.70, 1.38, 1.05),
}
_CSF, _GM, _WM, _NEC, _EDEMA, _ENH = range(6)


def save_nifti(array: np.ndarray, path: Path) -> None:
    """Write .nii.gz with a timestamp-free gzip header (byte-identical reruns)."""
    data = nib.Nifti1Image(array, BRATS_AFFINE).to_bytes()
    path.write_bytes(gzip.compress(data, compresslevel=1, mtime=0))


def _tumour_z_extent(
    kind: str, rng: np.random.Generator, slice_range: tuple[int, int], brain_z: tuple[int, int]
) -> tuple[float, float] | None:
    """First and last axial slice of the tumour for a subject of this kind (None: no tumour)."""
    lo, hi = slice_range
    n = hi - lo + 1
    if kind == "none":
        return None
    if kind == "covers":
        return lo - rng.uniform(2, 2 + 0.2 * n), hi + rng.uniform(2, 2 + 0.2 * n)
    if kind == "straddle":
        # One end of the range is tumorous, the other healthy (margin of 4 slices for the fuzzy edge).
        inside = rng.uniform(0.3, 0.65) * n
        length = rng.uniform(0.6, 1.1) * n
        if rng.random() < 0.5:
            return lo + inside - length, lo + inside
        return hi - inside, hi - inside + length
    # "outside": below the range if there is room in the brain, else above.
    room_below = (lo - 4) - (brain_z[0] + 2)
    room_above = (brain_z[1] - 2) - (hi + 4)
    if max(room_below, room_above) < 2:
        return None
    if room_below >= room_above:
        z1 = lo - 4 - rng.uniform(0, 0.3 * room_below)
        return max(brain_z[0] + 2.0, z1 - rng.uniform(0.5, 1.0) * room_below), z1
    z0 = hi + 4 + rng.uniform(0, 0.3 * room_above)
    return z0, min(brain_z[1] - 2.0, z0 + rng.uniform(0.5, 1.0) * room_above)


@dataclass(frozen=True)
class _Brain:
    """A phantom brain's ellipsoid: rotated normalised coordinates and the surface radius."""

    uu: np.ndarray  # (H, W, 1) left-right, in units of the semi-axis a
    vv: np.ndarray  # (H, W, 1) anterior-posterior, in units of b
    zz: np.ndarray  # (1, 1, D) axial, in units of the half-height
    r: np.ndarray  # (H, W, D), 1 on the (bumpy) brain surface
    mask: np.ndarray  # (H, W, D) bool, r < 1
    centre: tuple[float, float]  # (cu, cv) in normalised in-plane units
    axes: tuple[float, float]  # (a, b) in-plane semi-axes


def _brain_ellipsoid(
    rng: np.random.Generator, shape: tuple[int, int, int], slice_range: tuple[int, int]
) -> _Brain:
    """Per-subject size, centre, in-plane rotation and bumpy surface. Axially the brain is centred
    on the slice range with a half-height of ~2.3 ranges (real: slices ~5..145 of 155 around
    60..90), shrunk to fit the volume: the range always shows the mid-brain."""
    h, w, d = shape
    # Normalised coordinates: u (axis 0, left-right), v (axis 1, anterior-posterior), z (axial).
    u = np.linspace(-1.0, 1.0, h, dtype=np.float32)[:, None, None]
    v = np.linspace(-1.0, 1.0, w, dtype=np.float32)[None, :, None]
    z = np.linspace(-1.0, 1.0, d, dtype=np.float32)[None, None, :]
    a, b = rng.uniform(0.62, 0.74), rng.uniform(0.76, 0.88)
    cu, cv = rng.uniform(-0.04, 0.04, 2).tolist()
    lo, hi = slice_range
    mid = 0.5 * (lo + hi) + rng.uniform(-0.1, 0.1) * (hi - lo + 1)
    half = min(rng.uniform(2.1, 2.4) * (hi - lo + 1), 0.97 * min(mid, d - 1 - mid))
    half = max(half, 0.6 * (hi - lo + 1))
    cz, c = 2.0 * mid / (d - 1) - 1.0, 2.0 * half / (d - 1)  # in normalised z units
    # Python floats keep the float32 arrays float32 (NumPy 2 promotes with numpy float64 scalars).
    angle = math.radians(rng.uniform(-8.0, 8.0))
    cos_t, sin_t = math.cos(angle), math.sin(angle)
    uu = ((u - cu) * cos_t - (v - cv) * sin_t) / a  # (H, W, 1)
    vv = ((u - cu) * sin_t + (v - cv) * cos_t) / b
    zz = (z - cz) / c  # (1, 1, D)
    r = np.sqrt(uu**2 + vv**2 + zz**2)  # (H, W, D), 1 on the brain surface
    r = r + 0.025 * smooth_noise(rng, shape, 5)
    return _Brain(uu, vv, zz, r, r < 1.0, (cu, cv), (a, b))


def _tissue_fractions(
    rng: np.random.Generator, shape: tuple[int, int, int], brain: _Brain
) -> tuple[np.ndarray, np.ndarray]:
    """(csf_frac, gm_frac), each (H, W, D): soft boundaries = partial volume; white matter is the
    rest. max of sigmoids = sigmoid of max."""
    uu, vv, zz = brain.uu, brain.vv, brain.zz
    folds = 0.06 * smooth_noise(rng, shape, 14)  # gyri
    gm_frac = sigmoid((brain.r - 0.8 - folds) * 50.0)
    vent_scale = rng.uniform(0.7, 1.4)
    vent_arg = np.full(shape, -np.inf, dtype=np.float32)
    deep_arg = np.full(shape, -np.inf, dtype=np.float32)
    for side in (-1.0, 1.0):
        dv = ((uu - side * 0.11) / (0.06 * vent_scale)) ** 2 + (
            (vv + 0.05) / 0.32
        ) ** 2  # (H, W, 1)
        np.maximum(vent_arg, 1.0 - np.sqrt(dv + ((zz - 0.08) / 0.3) ** 2), out=vent_arg)
        dg = ((uu - side * 0.3) / 0.11) ** 2 + ((vv - 0.05) / 0.17) ** 2
        np.maximum(deep_arg, 1.0 - np.sqrt(dg + ((zz + 0.05) / 0.16) ** 2), out=deep_arg)
    # CSF: sulcal rim and lateral ventricles; grey matter: cortex and deep nuclei.
    csf_frac = sigmoid(np.maximum((brain.r - 0.955) * 100.0, vent_arg * 12.5))
    gm_frac = np.maximum(gm_frac, sigmoid(deep_arg * 10.0)) * (1.0 - csf_frac)
    return csf_frac, gm_frac


_Box = tuple[slice, slice, slice]


def _tumour_labels(
    rng: np.random.Generator,
    shape: tuple[int, int, int],
    brain: _Brain,
    z_extent: tuple[float, float],
) -> tuple[_Box, np.ndarray]:
    """The tumour's bounding box and its BraTS labels inside it (box-shaped uint8: 0, 1, 2, 4)."""
    h, w, d = shape
    (cu, cv), (a, b) = brain.centre, brain.axes
    z0, z1 = z_extent
    zc, hz = 0.5 * (z0 + z1), max(0.5 * (z1 - z0), 1.0)
    radius = rng.uniform(0.2, 0.42) * 0.5 * h  # oedema radius in pixels
    ang = rng.uniform(0.0, 2.0 * math.pi)
    rad = rng.uniform(0.0, 0.45)
    ci = (cu + rad * a * math.cos(ang) + 1.0) * 0.5 * (h - 1)
    cj = (cv + rad * b * math.sin(ang) + 1.0) * 0.5 * (w - 1)
    # Work inside the tumour's bounding box only (margin for the irregular outline).
    m = 1.25
    box = (
        slice(max(0, int(ci - m * radius)), min(h, int(ci + m * radius) + 2)),
        slice(max(0, int(cj - m * radius)), min(w, int(cj + m * radius) + 2)),
        slice(max(0, int(zc - m * hz)), min(d, int(zc + m * hz) + 2)),
    )
    ii = np.arange(box[0].start, box[0].stop, dtype=np.float32)[:, None, None]
    jj = np.arange(box[1].start, box[1].stop, dtype=np.float32)[None, :, None]
    kk = np.arange(box[2].start, box[2].stop, dtype=np.float32)[None, None, :]
    dist = np.sqrt(((ii - ci) / radius) ** 2 + ((jj - cj) / radius) ** 2 + ((kk - zc) / hz) ** 2)
    dist = dist + 0.12 * smooth_noise(rng, dist.shape, 6)  # irregular outline
    edema = (dist < 1.0) & brain.mask[box]
    seg_box = np.where(edema, 2, 0).astype(np.uint8)
    if rng.random() < 0.7:  # high-grade look: enhancing ring around a necrotic core
        core_out = rng.uniform(0.5, 0.7)
        seg_box[edema & (dist < core_out)] = 4
        seg_box[edema & (dist < core_out * rng.uniform(0.45, 0.7))] = 1
    else:  # low-grade look: non-enhancing core inside oedema
        seg_box[edema & (dist < rng.uniform(0.35, 0.55))] = 1
    return box, seg_box


def _modality_volumes(
    rng: np.random.Generator,
    shape: tuple[int, int, int],
    fractions: tuple[np.ndarray, np.ndarray],
    brain_mask: np.ndarray,
    tumour: tuple[_Box, np.ndarray] | None,
    contrast: float,
) -> dict[str, np.ndarray]:
    """{modality: (H, W, D) int16}: tissue intensities, the tumour (`tumour`: its box and labels,
    pulled towards the label's intensity by `contrast`), bias field, noise, scanner units."""
    csf_frac, gm_frac = fractions
    # Fine tissue texture times a smooth bias field (one coil: shared by the modalities).
    modulation = (1.0 + 0.03 * smooth_noise(rng, shape, 10)) * (
        1.0 + 0.08 * smooth_noise(rng, shape, 2)
    )
    noise_sigma = rng.uniform(0.01, 0.035)
    volumes: dict[str, np.ndarray] = {}
    for mod in BRATS_MODALITIES:
        t = _TISSUE[mod]
        # csf*t_csf + gm*t_gm + wm*t_wm with wm = 1 - csf - gm.
        img = csf_frac * (t[_CSF] - t[_WM])
        img += gm_frac * (t[_GM] - t[_WM])
        img += t[_WM]
        if tumour is not None:
            box, seg_box = tumour
            # Tumour intensity: towards the label's intensity by `contrast`, mottled texture.
            side = min(seg_box.shape[:2])
            texture = 1.0 + 0.14 * smooth_noise(rng, seg_box.shape, max(3, side // 3))
            texture += 0.08 * smooth_noise(rng, seg_box.shape, max(3, side * 2 // 3))  # grain
            target = np.select(
                [seg_box == 1, seg_box == 2, seg_box == 4], [t[_NEC], t[_EDEMA], t[_ENH]]
            ).astype(np.float32)
            base = img[box]
            img[box] = np.where(seg_box > 0, (base + contrast * (target - base)) * texture, base)
        img *= modulation
        img += noise_sigma * rng.standard_normal(shape, dtype=np.float32)
        np.abs(img, out=img)  # Rician-like magnitude
        img *= rng.uniform(300.0, 1500.0)  # arbitrary scanner units, as in real data
        img += 0.5  # + truncation below = rounding (values are >= 0)
        np.maximum(img, 1.0, out=img)  # > 0 everywhere in the brain: foreground = brain
        img *= brain_mask  # skull-stripped
        volumes[mod] = img.astype(np.int16)
    return volumes


def _brats_subject(
    rng: np.random.Generator,
    shape: tuple[int, int, int],
    slice_range: tuple[int, int],
    kind: str,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """One phantom subject: ({modality: (H, W, D) int16}, seg (H, W, D) uint8)."""
    d = shape[2]
    brain = _brain_ellipsoid(rng, shape, slice_range)
    fractions = _tissue_fractions(rng, shape, brain)
    # Brain z extent, to keep "outside" tumours inside the brain.
    zs = np.nonzero(brain.mask.any(axis=(0, 1)))[0]
    brain_z = (int(zs[0]), int(zs[-1])) if zs.size else (0, d - 1)
    seg = np.zeros(shape, dtype=np.uint8)
    z_extent = _tumour_z_extent(kind, rng, slice_range, brain_z)
    contrast = rng.uniform(0.25, 1.0)  # 1 = textbook contrast, 0.25 = subtle
    tumour = None
    if z_extent is not None:
        tumour = _tumour_labels(rng, shape, brain, z_extent)
        seg[tumour[0]] = tumour[1]
    return _modality_volumes(rng, shape, fractions, brain.mask, tumour, contrast), seg


def _brats_kinds(n_subjects: int, rng: np.random.Generator) -> list[str]:
    n_none = round(0.1 * n_subjects)
    n_outside = round(0.15 * n_subjects)
    n_covers = round(0.2 * n_subjects)
    n_straddle = n_subjects - n_none - n_outside - n_covers
    kinds = ["none"] * n_none + ["outside"] * n_outside + ["covers"] * n_covers
    kinds += ["straddle"] * n_straddle
    return [kinds[i] for i in rng.permutation(n_subjects)]


def write_brats(
    root: str | Path,
    n_subjects: int = 20,
    shape: tuple[int, int, int] = (240, 240, 155),
    seed: int = 0,
    slice_range: tuple[int, int] = (60, 90),
    misnamed: bool = True,
) -> Path:
    """Write a BraTS2020-style training set under `root`; returns the `MICCAI_BraTS2020_TrainingData`
    folder (which a BraTSDataModule accepts as `root`, as it accepts `root` itself).

    `shape` is (H, W, D) with axial slice k = vol[:, :, k]; `slice_range` (inclusive) is the range
    the tumours are placed relative to (it must fit in D). `misnamed=True` gives the last subject
    a misnamed segmentation file (skipped by the data module, like real case 355).
    """
    h, w, d = shape
    lo, hi = slice_range
    if not (0 <= lo <= hi < d):
        raise DataError(f"write_brats: slice_range {slice_range} does not fit depth {d}")
    if n_subjects < 1 or min(h, w) < 16:
        raise DataError(
            f"write_brats: need n_subjects >= 1 and H, W >= 16, got {n_subjects}, {shape}"
        )
    out = Path(root) / BRATS_DIRNAME
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 20])
    kinds = _brats_kinds(n_subjects, rng)
    for i, kind in enumerate(kinds):
        name = f"BraTS20_Training_{i + 1:03d}"
        sub_dir = out / name
        sub_dir.mkdir(exist_ok=True)
        volumes, seg = _brats_subject(
            np.random.default_rng([seed, 20, i]), shape, slice_range, kind
        )
        for mod, vol in volumes.items():
            save_nifti(vol, sub_dir / f"{name}_{mod}.nii.gz")
        bad_name = misnamed and i == n_subjects - 1
        save_nifti(seg, sub_dir / (MISNAMED_SEG if bad_name else f"{name}_seg.nii.gz"))
    return out
