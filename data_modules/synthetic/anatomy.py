"""A BraTS2020-layout development set whose brains come from real anatomy (MNI152 2009a).

`write_brats_anatomy` writes the files of `synthetic.write_brats` (layout, dtypes, LPS affine,
timestamp-free gzip); each brain is nilearn's MNI152 2009a template (skull-stripped T1, grey and
white-matter maps; CSF = brain - GM - WM) under a per-subject pose and smooth non-rigid warp, so
real gyri, sulci, ventricles and nuclei appear. Modalities: tissue mixtures with per-subject
contrast jitter plus the template's own detail, a bias field, Rician noise, a scanner scale.
Tumours follow BraTS (not the project's lesion synthesiser): a lobulated glioma in white / deep
grey matter of one hemisphere, high grade (necrosis 1 in an enhancing rim 4 in oedema 2) or low
grade (non-enhancing core 1 in oedema 2, or infiltration 2 only); oedema follows white matter and
spares the ventricles; a mass effect warps the anatomy; soft edges, smooth heterogeneity, and
conspicuity from obvious to nearly isointense.

Geometry: frame voxel (i, j, k) shows MNI mm x = -(i - (H-1)/2) * 240/H, y = -18 - (j - (W-1)/2)
* 240/W (LPS storage) and z = -10 + (k - lo) * 30 / (hi - lo): `slice_range` lo..hi always shows
z -10..+20 mm (basal ganglia to the ventricles' bodies); for the default (240, 240, 155) and
(60, 90), 1 mm voxels with slice k at z = k - 70 (before each subject's pose).
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from data_modules.errors import DataError
from data_modules.synthetic.brats import BRATS_DIRNAME, MISNAMED_SEG, save_nifti
from data_modules.synthetic.mr_signal import modality
from data_modules.synthetic.noise import smooth_noise
from data_modules.synthetic.variability import HARD_CONTRAST, HARD_SIZE, draw_variability

Box = tuple[slice, slice, slice]  # voxel box of the frame
_TEMPLATE = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
_Y0, _Z_LO, _Z_HI = -18.0, -10.0, 20.0  # MNI mm of the frame centre (y) and of slices lo / hi
_CENTRE = np.array([0.0, _Y0, 5.0])  # pose pivot (MNI mm)
_BRAIN_BOX = np.array([[-73.0, -108.0, -73.0], [73.0, 74.0, 83.0]])  # template brain extent (mm)
# Subject mix relative to slice_range (the rest "covers"): see _tumour_extent.
_KIND_FRACTIONS = {"none": 0.2, "outside": 0.075, "inside": 0.075, "straddle": 0.35}


# ----------------------------------------------------------------------------- template
def _template_dir() -> Path:
    """nilearn's bundled data folder, found without importing nilearn (slow, pulls sklearn)."""
    spec = importlib.util.find_spec("nilearn")
    places = list(spec.submodule_search_locations or []) if spec else []
    folder = Path(places[0] if places else ".") / "datasets" / "data"
    if not places or not (folder / _TEMPLATE.format("t1")).is_file():
        raise DataError("write_brats_anatomy needs nilearn's MNI152 template: pip install nilearn")
    return folder


@dataclass(frozen=True)
class _Template:
    t1: np.ndarray  # float32 in [0, 1], (197, 233, 189), RAS
    gm: np.ndarray
    wm: np.ndarray
    to_voxel: np.ndarray  # (4, 4) MNI mm -> template voxel
    coef: np.ndarray  # (3,): T1 ~ coef . (csf, gm, wm) inside the brain
    edt: np.ndarray  # distance (mm) to the brain boundary on the 2 mm grid [::2, ::2, ::2]
    sites: np.ndarray  # (n, 4): MNI mm and edt of candidate tumour centres


@lru_cache(maxsize=1)
def _template() -> _Template:
    folder = _template_dir()
    images = {n: nib.load(str(folder / _TEMPLATE.format(n))) for n in ("t1", "gm", "wm")}
    t1, gm, wm = (np.asarray(images[n].dataobj, dtype=np.float32) / 255.0 for n in images)
    brain = t1 > 0
    csf = np.clip(brain - gm - wm, 0.0, 1.0)
    mix = np.stack([csf[brain], gm[brain], wm[brain]], axis=1)
    coef = np.linalg.lstsq(mix, t1[brain], rcond=None)[0].astype(np.float32)
    edt = ndimage.distance_transform_edt(brain[::2, ::2, ::2], sampling=2.0).astype(np.float32)
    # Tumour centres: white or deep grey matter of one hemisphere, away from the surface.
    sub = (slice(None, None, 2),) * 3
    ok = ((wm[sub] > 0.5) | ((gm[sub] > 0.5) & (edt > 20.0))) & (edt >= 6.0)
    mm = nib.affines.apply_affine(images["t1"].affine, 2.0 * np.argwhere(ok))
    sites = np.column_stack([mm, edt[ok]])
    sites = sites[np.abs(sites[:, 0]) >= 10.0].astype(np.float32)
    return _Template(t1, gm, wm, np.linalg.inv(images["t1"].affine), coef, edt, sites)


# ----------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class _Frame:
    """Voxel index <-> nominal MNI mm per axis: mm = mm0 + step * (index - origin)."""

    shape: tuple[int, int, int]
    origin: tuple[float, float, float]
    step: tuple[float, float, float]  # signed: x and y decrease with the index (LPS)
    mm0: tuple[float, float, float]

    @classmethod
    def of(cls, shape: tuple[int, int, int], slice_range: tuple[int, int]) -> _Frame:
        h, w, _ = shape
        lo, hi = slice_range
        sz = (_Z_HI - _Z_LO) / (hi - lo) if hi > lo else 1.0
        return cls(
            shape, ((h - 1) / 2, (w - 1) / 2, lo), (-240.0 / h, -240.0 / w, sz), (0.0, _Y0, _Z_LO)
        )

    def mm(self, axis: int, start: int, stop: int) -> np.ndarray:
        idx = np.arange(start, stop, dtype=np.float32) - np.float32(self.origin[axis])
        return np.float32(self.mm0[axis]) + np.float32(self.step[axis]) * idx

    def index(self, axis: int, mm: float) -> float:
        return self.origin[axis] + (mm - self.mm0[axis]) / self.step[axis]

    def box(self, lo_mm: np.ndarray, hi_mm: np.ndarray) -> Box:
        """Voxel slices covering the mm box [lo_mm, hi_mm], clipped to the frame."""
        out = []
        for a, n in enumerate(self.shape):
            e0, e1 = sorted((self.index(a, float(lo_mm[a])), self.index(a, float(hi_mm[a]))))
            out.append(slice(max(0, math.floor(e0)), min(n, math.ceil(e1) + 1)))
        return out[0], out[1], out[2]


@dataclass(frozen=True)
class _Pose:
    """Nominal frame mm p -> template mm q = matrix @ p + offset (rotation, tilt, scale, shift)."""

    matrix: np.ndarray
    offset: np.ndarray

    def inverse(self, q: np.ndarray) -> np.ndarray:
        return np.linalg.solve(self.matrix, (q - self.offset).T).T


def _draw_pose(rng: np.random.Generator) -> _Pose:
    angles = [rng.uniform(-8.0, 8.0), rng.uniform(-3.0, 3.0), rng.uniform(-3.0, 3.0)]
    rot = Rotation.from_euler("zxy", angles, degrees=True).as_matrix()  # yaw, then small tilts
    matrix = rot / rng.uniform(0.9, 1.1, 3)  # sampling at 1/s shows the brain scaled by s
    shift = rng.uniform(-4.0, 4.0, 3) * np.array([1.0, 1.0, 0.5])
    return _Pose(matrix, _CENTRE - matrix @ _CENTRE + shift)


def mass_effect_shift(r: np.ndarray, radius: float, amplitude: float, decay: float) -> np.ndarray:
    """Outward displacement (mm) of tissue at distance r from a tumour centre.

    Linear inside the tumour (tissue there is compressed), largest (`amplitude`) at `radius`,
    decaying exponentially over `decay` mm outside. amplitude < radius keeps the map one-to-one.
    """
    r = np.asarray(r, dtype=np.float32)
    inside = np.float32(amplitude / radius) * r
    outside = np.float32(amplitude) * np.exp(np.float32(-1.0 / decay) * (r - np.float32(radius)))
    return np.where(r <= radius, inside, outside)


# ----------------------------------------------------------------------------- tumour plan
@dataclass(frozen=True)
class _Tumour:
    centre: np.ndarray  # nominal frame mm
    core: float  # core radius (mm)
    margin: float  # oedema margin beyond the core (mm)
    grade: str  # "high", "low" (non-enhancing core) or "infiltrative" (oedema only)
    rim: float  # mean enhancing-rim thickness (mm, high grade): necrosis inside it
    lobes: float  # radius modulation on the sphere
    contrast: float  # 0 subtle .. 1 obvious
    necrosis_flair: float  # necrosis in FLAIR (WM units): hypo- or hyperintense
    push: float  # mass effect amplitude (mm)
    decay: float  # mass effect decay length (mm)


def _tumour_kinds(n: int, rng: np.random.Generator) -> list[str]:
    kinds = [k for k, f in _KIND_FRACTIONS.items() for _ in range(round(f * n))][:n]
    kinds += ["covers"] * (n - len(kinds))
    return [kinds[i] for i in rng.permutation(n)]


def _tumour_extent(kind: str, rng: np.random.Generator, z_top: float) -> tuple[float, float] | None:
    """Total radius (core + margin, mm) and centre z (MNI mm) for a tumour of this kind."""
    half, mid = 0.5 * (_Z_HI - _Z_LO), 0.5 * (_Z_HI + _Z_LO)
    if kind == "covers":  # reaches beyond both ends of the range
        total = rng.uniform(half + 6.0, half + 22.0)
        return total, mid + rng.uniform(-1.0, 1.0) * (total - half - 5.0)
    if kind == "straddle":  # one end tumorous, the other healthy
        total = rng.uniform(8.0, 22.0)
        depth = rng.uniform(0.3, 0.8) * min(2.0 * total, 2.0 * half - 6.0)
        return total, (_Z_LO + depth - total) if rng.random() < 0.5 else (_Z_HI - depth + total)
    if kind == "inside":  # small, healthy slices on both sides
        total = rng.uniform(4.0, 8.0)
        return total, rng.uniform(_Z_LO + 1.5 * total + 2.0, _Z_HI - 1.5 * total - 2.0)
    if kind == "outside":  # clear of the range: above when the frame has room, else below
        total = rng.uniform(5.0, 14.0)
        above = _Z_HI + 1.5 * total + 3.0 + rng.uniform(0.0, 8.0)
        if above + total < min(z_top, 60.0) and rng.random() < 0.5:
            return total, above
        return total, _Z_LO - 1.5 * total - 3.0 - rng.uniform(0.0, 8.0)
    return None


def _draw_tumour(
    rng: np.random.Generator,
    kind: str,
    frame: _Frame,
    pose: _Pose,
    hard: np.random.Generator | None = None,
) -> _Tumour | None:
    """The tumour of a subject of this kind (None for "none"); `hard`: the generator of the
    hard variant's draws (smaller, less conspicuous), kept apart so the plain variant's stream
    is unchanged."""
    z_top = frame.mm0[2] + frame.step[2] * (frame.shape[2] - 1 - frame.origin[2])
    extent = _tumour_extent(kind, rng, z_top)
    if extent is None:
        return None
    total, zc = extent
    if hard is not None:
        total *= hard.uniform(*HARD_SIZE)
    grade = str(rng.choice(["high", "low", "infiltrative"], p=[0.6, 0.28, 0.12]))
    share = {"high": (0.3, 0.65), "low": (0.45, 0.85), "infiltrative": (0.15, 0.35)}[grade]
    core = min(25.0, max(3.0, total - 20.0, total * rng.uniform(*share)))
    margin = min(20.0, max(0.0, total - core))
    # Centre: a template site of one hemisphere at this level, deep enough for the core.
    sites = _template().sites
    p = pose.inverse(sites[:, :3].astype(np.float64))
    side = 1.0 if rng.random() < 0.5 else -1.0
    near = np.abs(p[:, 2] - zc) + 40.0 * (sites[:, 0] * side < 0)
    ok = near < near.min() + 3.0
    deep = ok & (sites[:, 3] >= min(0.7 * core + 3.0, 25.0))
    choice = np.flatnonzero(deep if deep.any() else ok)
    centre = np.append(p[int(rng.choice(choice)), :2], zc)  # exactly at the planned level
    effective = core + 0.5 * margin
    push = min(9.0, effective * rng.uniform(0.15, 0.3)) * (1.0 if grade == "high" else 0.5)
    return _Tumour(
        centre=centre,
        core=core,
        margin=margin,
        grade=grade,
        rim=rng.uniform(2.0, 7.0),
        lobes=rng.uniform(0.1, 0.3),
        contrast=rng.uniform(0.0, 1.0) * (HARD_CONTRAST if hard is not None else 1.0),
        necrosis_flair=rng.uniform(0.5, 1.6),
        push=push,
        decay=effective * rng.uniform(0.8, 1.5),
    )


# ----------------------------------------------------------------------------- resampling
def _grid_mm(frame: _Frame, box: Box) -> list[np.ndarray]:
    """Nominal mm of the box's voxels per axis, shaped to broadcast over (ni, nj, nk)."""
    shapes = ((-1, 1, 1), (1, -1, 1), (1, 1, -1))
    return [frame.mm(a, box[a].start, box[a].stop).reshape(shapes[a]) for a in range(3)]


def _radial(frame: _Frame, box: Box, centre: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Offsets (mm, per axis, broadcastable) of the box's voxels from `centre` and their norm."""
    d = [g - np.float32(c) for g, c in zip(_grid_mm(frame, box), centre, strict=True)]
    return d, np.sqrt(d[0] ** 2 + d[1] ** 2 + d[2] ** 2)


def _source_coords(rng: np.random.Generator, frame: _Frame, box: Box, pose: _Pose) -> np.ndarray:
    """(3, ni, nj, nk) float32 template voxel coordinates of the box: pose + smooth warp."""
    tpl = _template()
    lin = tpl.to_voxel[:3, :3] @ pose.matrix
    off = tpl.to_voxel[:3, :3] @ pose.offset + tpl.to_voxel[:3, 3]
    x, y, z = _grid_mm(frame, box)
    shape = tuple(s.stop - s.start for s in box)
    coords = np.empty((3, *shape), dtype=np.float32)
    amp = np.float32(rng.uniform(2.0, 4.0))  # warp amplitude (mm)
    cells = max(2, round(170.0 / rng.uniform(20.0, 40.0)))  # correlation length 20..40 mm
    for a in range(3):
        m = lin[a].astype(np.float32)
        np.add(m[0] * x + m[1] * y + np.float32(off[a]), m[2] * z, out=coords[a])
        coords[a] += amp * smooth_noise(rng, shape, cells)
    return coords


def _push_tissue(coords: np.ndarray, frame: _Frame, box: Box, pose: _Pose, tumour: _Tumour) -> None:
    """Mass effect: sample nearer the tumour centre so tissue appears pushed outward; tapered to
    zero at the brain surface (the skull holds the outline; the cortex compresses)."""
    reach = tumour.core + 0.5 * tumour.margin + 3.0 * tumour.decay
    sub = _sub_box(frame, box, tumour.centre, reach)
    if sub is None:
        return
    local, glob = sub
    d, r = _radial(frame, glob, tumour.centre)
    u = mass_effect_shift(r, tumour.core + 0.5 * tumour.margin, tumour.push, tumour.decay)
    view = coords[(slice(None), *local)]
    edt = ndimage.map_coordinates(_template().edt, view * np.float32(0.5), order=1, prefilter=False)
    scale = u * np.clip(edt / np.float32(8.0), 0.0, 1.0) / np.maximum(r, np.float32(1e-3))
    lin = (_template().to_voxel[:3, :3] @ pose.matrix).astype(np.float32)
    for a in range(3):
        view[a] -= scale * (lin[a, 0] * d[0] + lin[a, 1] * d[1] + lin[a, 2] * d[2])


def _sub_box(
    frame: _Frame, box: Box, centre: np.ndarray, reach: float
) -> tuple[tuple[slice, ...], Box] | None:
    """The part of the cube centre +- reach (mm) inside `box`: (slices local to box, global)."""
    want = frame.box(centre - reach, centre + reach)
    glob = [
        slice(max(w.start, b.start), min(w.stop, b.stop)) for w, b in zip(want, box, strict=True)
    ]
    if any(g.stop <= g.start for g in glob):
        return None
    local = tuple(
        slice(g.start - b.start, g.stop - b.start) for g, b in zip(glob, box, strict=True)
    )
    return local, (glob[0], glob[1], glob[2])


def _brain_box(frame: _Frame, pose: _Pose) -> Box:
    """Frame voxels that can hold brain: the template's extent through the inverse pose + margin."""
    corners = np.array([[_BRAIN_BOX[(c >> a) & 1, a] for a in range(3)] for c in range(8)])
    p = pose.inverse(corners)
    return frame.box(p.min(axis=0) - 14.0, p.max(axis=0) + 14.0)


# ----------------------------------------------------------------------------- tumour tissue
def _lobulation(rng: np.random.Generator, d: list[np.ndarray], r: np.ndarray) -> np.ndarray:
    """Smooth noise on the sphere of directions, in (-1, 1): a few random plane waves."""
    g = np.zeros(r.shape, dtype=np.float32)
    inv = 1.0 / np.maximum(r, np.float32(1e-3))
    for _ in range(6):
        w = rng.standard_normal(3)
        w = (w / np.linalg.norm(w) * rng.uniform(1.0, 3.0)).astype(np.float32)
        phase = np.float32(rng.uniform(0.0, 2.0 * math.pi))
        g += np.cos((w[0] * d[0] + w[1] * d[1] + w[2] * d[2]) * inv + phase)
    return np.tanh(g / np.float32(math.sqrt(3.0)))


def _soft(x: np.ndarray, width: float) -> np.ndarray:
    """Partial-volume membership of a signed distance (mm, > 0 inside); 10..90 % over 4.4 width."""
    return (0.5 * (1.0 + np.tanh(x / np.float32(2.0 * width)))).astype(np.float32)


@dataclass
class _Lesion:
    """A tumour's tissue in its box: soft memberships (outermost first), hard labels, texture."""

    tumour: _Tumour
    local: tuple[slice, ...]  # the tumour box, relative to the brain box
    soft: dict[str, np.ndarray]  # "oedema", then "rim" + "necrosis" or "nonenh"
    seg: np.ndarray  # uint8 BraTS labels
    het: np.ndarray  # smooth relative heterogeneity


def _oedema(
    rng: np.random.Generator, sigma: list[float], margin: float, beyond: np.ndarray, tissue: dict
) -> tuple[np.ndarray, np.ndarray]:
    """Oedema membership and its local reach (fraction of `margin`); `beyond`: mm outside the
    core. It reaches further along white matter, irregularly; wide CSF (ventricles, cisterns)
    stops it while thin sulci inside it are effaced."""
    wm_s = ndimage.gaussian_filter(tissue["wm"], sigma)
    reach = np.clip(0.45 + 0.75 * wm_s + 0.15 * smooth_noise(rng, beyond.shape, 4), 0.3, 1.2)
    spare = np.clip((ndimage.gaussian_filter(tissue["csf"], sigma) - 0.3) / 0.3, 0.0, 1.0)
    return _soft(np.float32(margin) * reach - beyond, 0.6) * (1.0 - spare), reach


def _tumour_tissue(
    rng: np.random.Generator, frame: _Frame, box: Box, tumour: _Tumour, tissue: dict
) -> _Lesion | None:
    """Compartments in the tumour's box (None when the box misses the brain box)."""
    reach = tumour.core * (1.0 + tumour.lobes) + 1.2 * tumour.margin + 2.0
    sub = _sub_box(frame, box, tumour.centre, reach)
    if sub is None:
        return None
    local, glob = sub
    d, r = _radial(frame, glob, tumour.centre)
    r_core = np.float32(tumour.core) * (1.0 + np.float32(tumour.lobes) * _lobulation(rng, d, r))
    near = {k: v[local] for k, v in tissue.items()}
    brain = near["brain"]
    core = _soft(r_core - r, 0.4) * brain
    sigma = [1.5 / abs(s) for s in frame.step]
    oedema, reach_wm = _oedema(rng, sigma, tumour.margin, r - r_core, near)
    oedema = np.maximum(oedema, core) * brain
    # Drop oedema islands not connected to the core (across a sulcus or a ventricle).
    parts, _ = ndimage.label(oedema > 0.5)
    keep = np.unique(parts[(core > 0.5) & (parts > 0)])
    oedema[(parts > 0) & ~np.isin(parts, keep)] = 0.0
    seg = np.where(oedema > 0.5, 2, 0).astype(np.uint8)
    # Core labels stay a voxel inside the outline (may touch the brain's edge): oedema outermost.
    inner = ndimage.binary_erosion((seg > 0) | (brain == 0), border_value=1)
    # Oedema signal fades by up to 30 % towards its outer edge (less water far from the core).
    fade = 1.0 - 0.3 * np.clip((r - r_core) / (np.float32(tumour.margin) * reach_wm + 1.0), 0, 1)
    soft = {"oedema": oedema * np.maximum(fade, core)}
    if tumour.grade == "high":
        rim = np.float32(tumour.rim) * (1.0 + 0.5 * _lobulation(rng, d, r))  # irregular ring
        necrosis = _soft(r_core - rim - r, 0.4) * core
        seg[(core > 0.5) & inner] = 4
        seg[(necrosis > 0.5) & inner] = 1
        soft |= {"rim": core, "necrosis": necrosis}
    elif tumour.grade == "low":
        seg[(core > 0.5) & inner] = 1
        soft["nonenh"] = core
    het = np.float32(rng.uniform(0.02, 0.07)) * smooth_noise(rng, r.shape, 3)
    return _Lesion(tumour, local, soft, seg, het)


# ----------------------------------------------------------------------------- modalities
def _anatomy(coords: np.ndarray) -> dict[str, np.ndarray]:
    """Resampled tissue: brain mask, CSF / GM / WM fractions and the template's detail."""
    tpl = _template()
    t1, gm, wm = (
        ndimage.map_coordinates(getattr(tpl, n), coords, order=1, prefilter=False)
        for n in ("t1", "gm", "wm")
    )
    brain = t1 > 0.05  # template brain voxels are >= 0.1
    gm, wm = (np.clip(v, 0.0, 1.0) * brain for v in (gm, wm))
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0) * brain
    # Template detail the tissue maps do not explain (deep nuclei, vessels, folding), WM units.
    detail = (t1 - tpl.coef[0] * csf - tpl.coef[1] * gm - tpl.coef[2] * wm) * brain / tpl.coef[2]
    return {"brain": brain.astype(np.float32), "csf": csf, "gm": gm, "wm": wm, "detail": detail}


def _subject(
    rng: np.random.Generator, frame: _Frame, kind: str, hard: np.random.Generator | None = None
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """One subject: ({modality: (H, W, D) int16}, seg (H, W, D) uint8); `hard`: the hard
    variant's own generator."""
    pose = _draw_pose(rng)
    tumour = _draw_tumour(rng, kind, frame, pose, hard)
    box = _brain_box(frame, pose)
    coords = _source_coords(rng, frame, box, pose)
    if tumour is not None:
        _push_tissue(coords, frame, box, pose, tumour)
    tissue = _anatomy(coords)
    del coords
    lesion = None if tumour is None else _tumour_tissue(rng, frame, box, tumour, tissue)
    seg = np.zeros(frame.shape, dtype=np.uint8)
    if lesion is not None:
        seg[box][lesion.local] = lesion.seg
    brain = tissue["brain"] > 0
    var = None if hard is None else draw_variability(hard, tissue)
    volumes = {}
    for mod in ("flair", "t1", "t1ce", "t2"):
        img = modality(rng, mod, tissue, lesion, var)
        img *= np.float32(rng.uniform(300.0, 1500.0))  # arbitrary scanner units
        img = np.clip(img + 0.5, 1.0, 32767.0) * brain  # round; >= 1 in the brain, 0 outside
        volumes[mod] = np.zeros(frame.shape, dtype=np.int16)
        volumes[mod][box] = img.astype(np.int16)
    return volumes, seg


# ----------------------------------------------------------------------------- public
def write_brats_anatomy(
    root: str | Path,
    n_subjects: int = 40,
    shape: tuple[int, int, int] = (240, 240, 155),
    seed: int = 0,
    slice_range: tuple[int, int] = (60, 90),
    misnamed: bool = False,
    hard: bool = False,
) -> Path:
    """Write a BraTS2020-style set of template-based brains under `root` (module docstring);
    returns the `MICCAI_BraTS2020_TrainingData` folder. Subjects relative to `slice_range`:
    tumour covering it, straddling one end, small inside it, outside it, or none.
    `misnamed=True` misnames the last subject's segmentation (like real case 355).
    `hard=True` (`--kind anatomy-hard`): the same subjects and tumour plan with what makes real
    BraTS harder: unlabelled white-matter hyperintensities and periventricular caps in every
    subject's normal tissue (none to moderate), grey / white contrast, bias, noise and slice
    thickness that vary per subject, and tumours smaller and at most half as conspicuous."""
    h, w, d = shape
    lo, hi = slice_range
    if not (0 <= lo <= hi < d):
        raise DataError(f"write_brats_anatomy: slice_range {slice_range} does not fit depth {d}")
    if n_subjects < 1 or min(h, w) < 16:
        raise DataError(
            f"write_brats_anatomy: need n_subjects >= 1 and H, W >= 16, got {n_subjects}, {shape}"
        )
    _template()  # fail early (DataError) without nilearn
    frame = _Frame.of((h, w, d), (lo, hi))
    out = Path(root) / BRATS_DIRNAME
    out.mkdir(parents=True, exist_ok=True)
    kinds = _tumour_kinds(n_subjects, np.random.default_rng([seed, 21]))
    for i, kind in enumerate(kinds):
        name = f"BraTS20_Training_{i + 1:03d}"
        (sub_dir := out / name).mkdir(exist_ok=True)
        hard_rng = np.random.default_rng([seed, 21, i, 7]) if hard else None
        volumes, seg = _subject(np.random.default_rng([seed, 21, i]), frame, kind, hard_rng)
        for mod, vol in volumes.items():
            save_nifti(vol, sub_dir / f"{name}_{mod}.nii.gz")
        bad_name = misnamed and i == n_subjects - 1
        save_nifti(seg, sub_dir / (MISNAMED_SEG if bad_name else f"{name}_seg.nii.gz"))
    return out
