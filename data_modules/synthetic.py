"""Writers of small synthetic datasets in exactly the real datasets' on-disk formats.

They let the whole framework (data modules, training, CLI, tests) run where neither BraTS2020 nor
ChestX-ray8 exists and nothing can be downloaded. Everything is deterministic by `seed` (the files
are byte-identical for the same arguments: gzip headers carry no timestamp).

* `write_brats`: `MICCAI_BraTS2020_TrainingData/BraTS20_Training_XXX/BraTS20_Training_XXX_
  {flair,t1,t1ce,t2,seg}.nii.gz`. A skull-stripped phantom brain (BraTS ships skull-stripped
  volumes, so everything outside the brain is 0): per-subject ellipsoid shape, a thin sulcal CSF rim,
  a folded grey-matter cortex, white matter, deep grey nuclei and lateral ventricles; four
  modalities with plausible relative contrast, a smooth bias field and Rician-like noise. Tumours
  carry BraTS labels 1 (necrotic / non-enhancing core), 2 (oedema) and 4 (enhancing ring); their
  contrast varies per subject from obvious to subtle and they have their own mottled texture, so
  a subtle tumour differs from normal tissue by texture as well as brightness. Subjects are of four
  kinds with respect to `slice_range`: tumour straddling one end of the range (healthy and tumorous
  slices in range), tumour covering the whole range (no healthy slice), tumour outside the range,
  no tumour. The last subject ships a misnamed segmentation like real case 355.
* `write_chestxray8`: `images/*.png`, `Data_Entry_2017.csv` and `BBox_List_2017.csv` with the
  real headers, `train_val_list.txt` / `test_list.txt` (patient-disjoint). Chest-like grey images
  (lungs, mediastinum, heart, ribs, clavicles, diaphragm) with findings (nodule, mass, effusion,
  cardiomegaly, infiltration, atelectasis, pneumothorax); about half of the abnormal images get
  boxes. Boxes are written in the 1024-pixel frame of the released PNGs, as the real list is.
  Three images exercise the other PNG modes (16-bit, RGB, RGBA).
"""

from __future__ import annotations

import csv
import gzip
import math
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from PIL import Image

from data_modules.errors import DataError

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

CHEST_DATA_ENTRY_COLUMNS = (
    "Image Index",
    "Finding Labels",
    "Follow-up #",
    "Patient ID",
    "Patient Age",
    "Patient Gender",
    "View Position",
    "OriginalImage[Width",
    "Height]",
    "OriginalImagePixelSpacing[x",
    "y]",
)
CHEST_BBOX_COLUMNS = ("Image Index", "Finding Label", "Bbox [x", "y", "w", "h]")
# Box coordinates of the real BBox_List_2017.csv refer to the released 1024 x 1024 PNGs.
CHEST_BBOX_FRAME = 1024
_CHEST_FINDINGS = (
    "Nodule",
    "Mass",
    "Effusion",
    "Cardiomegaly",
    "Infiltration",
    "Atelectasis",
    "Pneumothorax",
)


# ----------------------------------------------------------------------------- helpers
def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) weights interpolating n_in grid values to n_out samples (smoothstep, C1)."""
    pos = np.linspace(0.0, n_in - 1.0, n_out)
    lo = np.clip(np.floor(pos).astype(int), 0, n_in - 2)
    t = pos - lo
    t = t * t * (3.0 - 2.0 * t)  # smoothstep: no creases at grid points
    mat = np.zeros((n_out, n_in), dtype=np.float32)
    mat[np.arange(n_out), lo] = 1.0 - t
    mat[np.arange(n_out), lo + 1] += t
    return mat


def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], cells: int) -> np.ndarray:
    """Band-limited float32 noise of `shape` (2D or 3D), about `cells` random values per axis, std ~1.

    Separable interpolation of a coarse Gaussian grid as contiguous matrix products: cheap even
    for 240 x 240 x 155 volumes.
    """
    grid = tuple(max(2, min(cells, s) + 1) for s in shape)
    out = rng.standard_normal(grid).astype(np.float32)
    # Expand the last axis first and axis 0 last, so the one big product is a single 2D GEMM.
    for axis in reversed(range(len(shape))):
        mat = _interp_matrix(shape[axis], out.shape[axis])  # (n_out, n_in)
        moved = np.moveaxis(out, axis, 0)
        out = np.moveaxis(
            (mat @ moved.reshape(moved.shape[0], -1)).reshape(-1, *moved.shape[1:]), 0, axis
        )
    out = np.ascontiguousarray(out)
    sub = out[(slice(None, None, 3),) * out.ndim]  # std on a subsample: same answer, cheaper
    return out / max(float(sub.std()), 1e-6)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _save_nifti(array: np.ndarray, path: Path) -> None:
    """Write .nii.gz with a timestamp-free gzip header (byte-identical reruns)."""
    data = nib.Nifti1Image(array, BRATS_AFFINE).to_bytes()
    path.write_bytes(gzip.compress(data, compresslevel=1, mtime=0))


# ----------------------------------------------------------------------------- BraTS
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


def _brats_subject(
    rng: np.random.Generator,
    shape: tuple[int, int, int],
    slice_range: tuple[int, int],
    kind: str,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """One phantom subject: ({modality: (H, W, D) int16}, seg (H, W, D) uint8)."""
    h, w, d = shape
    # Normalised coordinates: u (axis 0, left-right), v (axis 1, anterior-posterior), z (axial).
    u = np.linspace(-1.0, 1.0, h, dtype=np.float32)[:, None, None]
    v = np.linspace(-1.0, 1.0, w, dtype=np.float32)[None, :, None]
    z = np.linspace(-1.0, 1.0, d, dtype=np.float32)[None, None, :]

    # Brain ellipsoid: per-subject size, centre, in-plane rotation, bumpy surface. Axially it is
    # centred on the slice range with a half-height of ~2.3 ranges (real: slices ~5..145 of 155
    # around 60..90), shrunk to fit the volume: the range always shows the mid-brain.
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
    brain = r < 1.0

    # Tissue fractions (soft boundaries = partial volume). max of sigmoids = sigmoid of max.
    folds = 0.06 * smooth_noise(rng, shape, 14)  # gyri
    gm_frac = _sigmoid((r - 0.8 - folds) * 50.0)
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
    csf_frac = _sigmoid(np.maximum((r - 0.955) * 100.0, vent_arg * 12.5))
    gm_frac = np.maximum(gm_frac, _sigmoid(deep_arg * 10.0)) * (1.0 - csf_frac)

    # Brain z extent, to keep "outside" tumours inside the brain.
    zs = np.nonzero(brain.any(axis=(0, 1)))[0]
    brain_z = (int(zs[0]), int(zs[-1])) if zs.size else (0, d - 1)

    seg = np.zeros(shape, dtype=np.uint8)
    z_extent = _tumour_z_extent(kind, rng, slice_range, brain_z)
    contrast = rng.uniform(0.25, 1.0)  # 1 = textbook contrast, 0.25 = subtle
    box: tuple[slice, slice, slice] | None = None
    if z_extent is not None:
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
        dist = np.sqrt(
            ((ii - ci) / radius) ** 2 + ((jj - cj) / radius) ** 2 + ((kk - zc) / hz) ** 2
        )
        dist = dist + 0.12 * smooth_noise(rng, dist.shape, 6)  # irregular outline
        edema = (dist < 1.0) & brain[box]
        seg_box = np.where(edema, 2, 0).astype(np.uint8)
        if rng.random() < 0.7:  # high-grade look: enhancing ring around a necrotic core
            core_out = rng.uniform(0.5, 0.7)
            seg_box[edema & (dist < core_out)] = 4
            seg_box[edema & (dist < core_out * rng.uniform(0.45, 0.7))] = 1
        else:  # low-grade look: non-enhancing core inside oedema
            seg_box[edema & (dist < rng.uniform(0.35, 0.55))] = 1
        seg[box] = seg_box

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
        if box is not None:
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
        img *= brain  # skull-stripped
        volumes[mod] = img.astype(np.int16)
    return volumes, seg


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
            _save_nifti(vol, sub_dir / f"{name}_{mod}.nii.gz")
        bad_name = misnamed and i == n_subjects - 1
        _save_nifti(seg, sub_dir / (MISNAMED_SEG if bad_name else f"{name}_seg.nii.gz"))
    return out


# ----------------------------------------------------------------------------- ChestX-ray8
def _chest_image(
    rng: np.random.Generator, size: int, findings: list[str]
) -> tuple[np.ndarray, list[tuple[str, tuple[float, float, float, float]]]]:
    """One chest-like radiograph (size, size) float in [0, 1] and its finding boxes (x, y, w, h)."""
    y = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None]
    x = np.linspace(0.0, 1.0, size, dtype=np.float32)[None, :]
    dx, dy = rng.uniform(-0.03, 0.03, 2)
    xc = 0.5 + dx
    # Torso: soft tissue, air outside.
    torso = _sigmoid((1.0 - np.sqrt(((x - xc) / 0.47) ** 2 + ((y - 0.6 - dy) / 0.62) ** 2)) / 0.03)
    img = 0.06 + 0.38 * torso
    # Lungs: two tall ellipses, dark, with vessel texture denser near the hila.
    lung_w, lung_h = rng.uniform(0.15, 0.19), rng.uniform(0.3, 0.36)
    lung_cy = 0.47 + dy
    lungs = np.zeros((size, size), dtype=np.float32)
    centres = []
    for side in (-1.0, 1.0):
        lx = xc + side * rng.uniform(0.19, 0.22)
        centres.append(lx)
        dist = np.sqrt(((x - lx) / lung_w) ** 2 + ((y - lung_cy) / lung_h) ** 2)
        lungs = np.maximum(lungs, _sigmoid((1.0 - dist) / 0.04))
    vessels = np.clip(smooth_noise(rng, (size, size), max(6, size // 6)), 0, None)
    hilum = np.exp(-(((np.abs(x - xc) - 0.1) / 0.12) ** 2 + ((y - lung_cy) / 0.2) ** 2))
    img = img - lungs * (0.25 - 0.05 * vessels * (0.4 + hilum))
    # Mediastinum + spine, heart (image right = patient's left), diaphragm, clavicles, ribs.
    img = img + 0.25 * _sigmoid((0.06 - np.abs(x - xc)) / 0.015) * (y > 0.12)
    heart_r = rng.uniform(0.11, 0.14) * (1.45 if "Cardiomegaly" in findings else 1.0)
    heart_x, heart_y = xc + 0.06, lung_cy + 0.17
    heart = _sigmoid(
        (1.0 - np.sqrt(((x - heart_x) / heart_r) ** 2 + ((y - heart_y) / (0.8 * heart_r)) ** 2))
        / 0.05
    )
    img = img + 0.28 * heart * (1.0 - 0.5 * (1.0 - lungs))
    dome = lung_cy + lung_h * 0.85 - 0.08 * np.cos((x - xc) * 6.0)
    img = img + 0.2 * _sigmoid((y - dome) / 0.015) * torso
    for side in (-1.0, 1.0):
        clav = np.abs(y - (0.16 + dy + 0.12 * side * (x - xc))) < 0.012
        img = img + 0.12 * (clav & (np.abs(x - xc - side * 0.17) < 0.16))
    spacing = rng.uniform(0.055, 0.07)
    curve = (y - 0.18 - dy - 0.9 * (np.abs(x - xc) - 0.2) ** 2) % spacing
    img = img + 0.06 * (curve < 0.3 * spacing) * lungs

    boxes: list[tuple[str, tuple[float, float, float, float]]] = []
    strength = rng.uniform(0.35, 1.0)  # obvious to subtle
    # Contrast and noise from their own stream: the findings change nothing else in the image.
    post = np.random.default_rng(rng.integers(2**32))
    for finding in findings:
        side = centres[int(rng.integers(2))]
        px = side + rng.uniform(-0.5, 0.5) * lung_w
        py = lung_cy + rng.uniform(-0.5, 0.6) * lung_h
        if finding in ("Nodule", "Mass"):
            rad = rng.uniform(0.02, 0.035) if finding == "Nodule" else rng.uniform(0.06, 0.1)
            blob = _sigmoid((1.0 - np.sqrt((x - px) ** 2 + (y - py) ** 2) / rad) / 0.1)
            img = img + 0.3 * strength * blob
            box = (px - rad, py - rad, 2 * rad, 2 * rad)
        elif finding == "Effusion":
            top = lung_cy + lung_h * rng.uniform(0.3, 0.6)
            region = (np.abs(x - side) < lung_w) & (y > top + 0.05 * ((x - side) / lung_w) ** 2)
            img = img + 0.25 * strength * region * lungs
            box = (side - lung_w, top, 2 * lung_w, lung_cy + lung_h - top)
        elif finding == "Cardiomegaly":
            box = (heart_x - heart_r, heart_y - 0.8 * heart_r, 2 * heart_r, 1.6 * heart_r)
        elif finding == "Pneumothorax":
            apex = (
                np.sqrt(
                    ((x - side) / lung_w) ** 2
                    + ((y - lung_cy + 0.6 * lung_h) / (0.5 * lung_h)) ** 2
                )
                < 1
            )
            img = np.where(
                apex & (lungs > 0.5), img - 0.05 * strength - 0.05 * vessels * lungs, img
            )
            box = (side - lung_w, lung_cy - 1.1 * lung_h, 2 * lung_w, lung_h)
        else:  # Infiltration / Atelectasis: cloudy opacity shaped by noise
            rad = rng.uniform(0.06, 0.1)
            cloud = np.exp(
                -((x - px) ** 2 + ((y - py) / (0.6 if finding == "Atelectasis" else 1.0)) ** 2)
                / rad**2
            )
            cloud = cloud * np.clip(1.0 + 0.6 * smooth_noise(rng, (size, size), 8), 0, None)
            img = img + 0.22 * strength * np.clip(cloud, 0, 1) * lungs
            box = (px - rad, py - rad, 2 * rad, 2 * rad)
        boxes.append((finding, box))
    gamma = post.uniform(0.85, 1.15)
    img = np.clip(img, 0.0, 1.0) ** gamma
    img = img + post.uniform(0.005, 0.02) * post.standard_normal((size, size)).astype(np.float32)
    return np.clip(img, 0.0, 1.0).astype(np.float32), boxes


def _save_png(grey: np.ndarray, path: Path, mode: str) -> None:
    """Write a grey [0, 1] image as an 8-bit L, 16-bit, RGB or RGBA PNG."""
    if mode == "I;16":
        Image.fromarray(np.rint(grey * 65535).astype(np.uint16)).save(path)
        return
    g8 = np.rint(grey * 255).astype(np.uint8)
    if mode == "RGB":
        g8 = np.stack([g8] * 3, axis=-1)
    elif mode == "RGBA":
        g8 = np.stack([g8] * 3 + [np.full_like(g8, 255)], axis=-1)
    Image.fromarray(g8).save(path)


def write_chestxray8(
    root: str | Path,
    n_normal: int = 40,
    n_abnormal: int = 40,
    size: int = 256,
    seed: int = 0,
    boxed_fraction: float = 0.5,
    ap_fraction: float = 0.1,
    test_fraction: float = 0.35,
    mixed_modes: bool = True,
) -> Path:
    """Write a ChestX-ray8-style dataset into `root` (returned): `images/*.png` (size x size),
    `Data_Entry_2017.csv`, `BBox_List_2017.csv`, `train_val_list.txt`, `test_list.txt`.

    Patients have 1-3 images (follow-ups); `ap_fraction` of the images are AP views, the rest PA;
    `test_fraction` of the patients form the patient-disjoint test list; `boxed_fraction` of the
    abnormal images get boxes. With `mixed_modes`, images 2, 3, 4 are RGBA, RGB and 16-bit PNGs.
    """
    if n_normal < 1 or n_abnormal < 0 or size < 16:
        raise DataError(
            f"write_chestxray8: need n_normal >= 1 and size >= 16, got {n_normal}, {size}"
        )
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 8])
    total = n_normal + n_abnormal
    abnormal = np.zeros(total, dtype=bool)
    abnormal[rng.permutation(total)[:n_abnormal]] = True
    # Group consecutive images into patients of 1-3 follow-ups.
    patient_of: list[int] = []
    follow_up: list[int] = []
    pid = 0
    while len(patient_of) < total:
        pid += 1
        for fu in range(int(rng.integers(1, 4))):
            if len(patient_of) < total:
                patient_of.append(pid)
                follow_up.append(fu)
    patients = sorted(set(patient_of))
    gender = {p: ("M" if rng.random() < 0.5 else "F") for p in patients}
    age = {p: int(rng.integers(18, 85)) for p in patients}
    n_test_patients = max(1, round(test_fraction * len(patients)))
    test_patients = set(rng.permutation(patients)[:n_test_patients].tolist())

    modes = {1: "RGBA", 2: "RGB", 3: "I;16"} if mixed_modes else {}
    entries, bbox_rows, train_list, test_list = [], [], [], []
    for i in range(total):
        img_rng = np.random.default_rng([seed, 8, i])
        name = f"{patient_of[i]:08d}_{follow_up[i]:03d}.png"
        findings: list[str] = []
        if abnormal[i]:
            n_find = 1 + int(img_rng.random() < 0.3)
            findings = [str(f) for f in img_rng.choice(_CHEST_FINDINGS, n_find, replace=False)]
        grey, boxes = _chest_image(img_rng, size, findings)
        _save_png(grey, root / "images" / name, modes.get(i, "L"))
        if findings and img_rng.random() < boxed_fraction:
            for finding, (bx, by, bw, bh) in boxes:
                # Normalised -> 1024-pixel frame, clipped to the image.
                x0, y0 = max(bx, 0.0), max(by, 0.0)
                x1, y1 = min(bx + bw, 1.0), min(by + bh, 1.0)
                vals = [v * CHEST_BBOX_FRAME for v in (x0, y0, x1 - x0, y1 - y0)]
                bbox_rows.append([name, finding, *(f"{v:.6f}" for v in vals), "", "", ""])
        view = "AP" if img_rng.random() < ap_fraction else "PA"
        orig_w, orig_h = int(img_rng.integers(2000, 3000)), int(img_rng.integers(2000, 3000))
        entries.append(
            [
                name,
                "|".join(findings) if findings else "No Finding",
                follow_up[i],
                patient_of[i],
                age[patient_of[i]] + follow_up[i],
                gender[patient_of[i]],
                view,
                orig_w,
                orig_h,
                0.143,
                0.143,
                "",
            ]
        )
        (test_list if patient_of[i] in test_patients else train_list).append(name)

    with open(root / "Data_Entry_2017.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*CHEST_DATA_ENTRY_COLUMNS, ""])  # the real header ends with a comma
        writer.writerows(entries)
    with open(root / "BBox_List_2017.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*CHEST_BBOX_COLUMNS, "", "", ""])
        writer.writerows(bbox_rows)
    (root / "train_val_list.txt").write_text("".join(n + "\n" for n in train_list))
    (root / "test_list.txt").write_text("".join(n + "\n" for n in test_list))
    return root


def toy_texture_images(
    rng: np.random.Generator,
    n: int,
    kind: str = "stripes",
    anomalous: bool = False,
    size: int = 64,
    amplitude: float = 0.15,
) -> tuple[np.ndarray, np.ndarray]:
    """Toy images whose anomalies differ by structure or texture, never by mean intensity.

    kind "stripes": horizontal grey stripes (random phase, period 7-9 px); an anomaly is a square
    patch of the same stripes turned by 90 degrees. kind "mottle": smooth grey "tissue"; an anomaly
    is a square patch with extra zero-mean texture of contrast `amplitude`. Returns (n, S, S)
    float32 images in [0, 1] and (n, S, S) bool anomaly masks (empty unless `anomalous`).
    """
    if kind not in ("stripes", "mottle"):
        raise ValueError(f"toy_texture_images: kind must be 'stripes' or 'mottle', got {kind!r}")
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    images, masks = [], []
    for _ in range(n):
        phase, period = rng.uniform(0, 2 * np.pi), rng.uniform(7, 9)
        if kind == "mottle":
            image = 0.5 + 0.15 * smooth_noise(rng, (size, size), 4)
        else:
            image = 0.5 + 0.2 * np.sin(2 * np.pi * yy / period + phase)
        mask = np.zeros((size, size), bool)
        if anomalous:
            side = int(rng.integers(size // 4, size * 3 // 8 + 1))
            i, j = rng.integers(size // 16, size - side - size // 16, size=2)
            mask[i : i + side, j : j + side] = True
            if kind == "mottle":
                texture = smooth_noise(rng, (size, size), 16)
                texture = (texture - texture[mask].mean()) / texture[mask].std()
                image = np.where(mask, image + amplitude * texture, image)
            else:
                image = np.where(mask, 0.5 + 0.2 * np.sin(2 * np.pi * xx / period + phase), image)
        image = image + 0.02 * rng.standard_normal((size, size))
        images.append(np.clip(image, 0.0, 1.0).astype(np.float32))
        masks.append(mask)
    return np.stack(images), np.stack(masks)


def toy_tensors(images: np.ndarray) -> Any:
    """(n, S, S) grey toy images in [0, 1] -> (n, 3, S, S) ImageNet-normalised tensor."""
    import torch  # lazy: writing datasets needs no torch

    from data_modules.transforms import normalize

    return torch.stack([normalize(np.repeat(im[..., None], 3, 2)) for im in images])


def toy_training_batch(
    rng: np.random.Generator, n: int, kind: str = "stripes", size: int = 64, synthesizer: Any = None
) -> dict[str, Any]:
    """A training batch of toy normals (`toy_texture_images`) and the same images with the project's
    synthetic lesions, with the training item's keys (stacked): image, lesion_image, lesion_mask
    (n, 1, S, S) float, foreground (n, 1, S, S) bool (the whole image)."""
    import torch

    from data_modules.anomaly_synthesis import LesionSynthesizer

    synthesizer = synthesizer or LesionSynthesizer()
    x, _ = toy_texture_images(rng, n, kind, size=size)
    whole = np.ones((size, size), bool)
    pairs = [synthesizer(np.repeat(im[..., None], 3, 2), whole, rng) for im in x]
    return {
        "image": toy_tensors(x),
        "lesion_image": toy_tensors(np.stack([p[0][..., 0] for p in pairs])),
        "lesion_mask": torch.from_numpy(np.stack([p[1] for p in pairs])[:, None]).float(),
        "foreground": torch.ones(n, 1, size, size, dtype=torch.bool),
    }


def make_demo_data(dataset: str, out: str | Path, kind: str = "phantom", **kwargs: object) -> Path:
    """Write a demo dataset for `pathoscope make-demo-data --dataset brats|chestxray8 --out DIR`.

    Defaults are small enough to write in seconds and large enough for the default few-shot
    protocol at reduced test counts: BraTS 20 subjects of 128 x 128 x 100, ChestX-ray8 60 normal
    + 60 abnormal images of 256 x 256. Keyword arguments override the writer's defaults.
    `kind` (BraTS only): "phantom" (`write_brats`, the default) or "anatomy" (brains from the
    MNI152 template, `anatomy.write_brats_anatomy`; needs nilearn).
    Returns the path to give the data module as `root`.
    """
    if kind not in ("phantom", "anatomy"):
        raise DataError(f"make_demo_data: unknown kind {kind!r}; expected 'phantom' or 'anatomy'")
    if dataset == "brats":
        opts: dict = {"n_subjects": 20, "shape": (128, 128, 100)}
        opts.update(kwargs)
        if kind == "anatomy":
            from data_modules.anatomy import write_brats_anatomy  # imports this module

            return write_brats_anatomy(out, **opts)
        return write_brats(out, **opts)
    if kind != "phantom":
        raise DataError(f"make_demo_data: kind={kind!r} applies to brats only, not {dataset!r}")
    if dataset == "chestxray8":
        opts = {"n_normal": 60, "n_abnormal": 60, "size": 256}
        opts.update(kwargs)
        return write_chestxray8(out, **opts)
    raise DataError(
        f"make_demo_data: unknown dataset {dataset!r}; expected 'brats' or 'chestxray8'"
    )
