"""BraTS2020 few-shot data module (NIfTI via nibabel).

Layout: `root` is the `MICCAI_BraTS2020_TrainingData` folder, its parent, or any folder of subject
folders `BraTS20_Training_XXX/BraTS20_Training_XXX_{flair,t1,t1ce,t2,seg}.nii[.gz]` (listings
sorted). Axial slice k is `vol[:, :, k]` as stored (no reorientation); `slice_range` is inclusive
(60..90 = 31 slices). `gt_mask = seg > 0`; a healthy slice has an empty `gt_mask` (at the stored
resolution). In-range slices without any brain voxel (possible only at a volume's ends) are
neither healthy nor tumorous: they are never used.

Split procedure (all choices rank names by a hash of (seed, purpose, name), see common.py):
1. Scan every subject: file names, headers (3D, equal shapes, depth covers slice_range) and the
   in-range part of the segmentation and of the first modality, giving each subject's healthy and
   tumorous in-range slices.
   Subjects failing a check are reported (logging.warning with the file) and skipped;
   `strict=True` raises the DataError instead.
2. Test pool: the smallest prefix of the `test_seed` ranking of subjects whose in-range slices
   include `n_test_healthy` healthy and `n_test_tumorous` tumorous ones, leaving at least `shots`
   subjects with a healthy slice outside the pool (DataError otherwise). Test slices: the first
   `n_test_healthy` healthy and `n_test_tumorous` tumorous in-range slices of the pool in the
   `test_seed` ranking of (subject, slice). The pool depends only on `test_seed`, never on `seed`
   or `shots`, so repeats vary only the training shots.
3. Training: the first `shots` subjects outside the pool (with a healthy in-range slice) in the
   `seed` ranking; for each, its first healthy in-range slice in the `seed` ranking. Validation:
   the other healthy in-range slices of those subjects (see common.FewShotDataModule).
4. Only the selected subjects' volumes are read in full; a subject whose volume then fails (e.g.
   truncated file, all-zero volume) is reported and the selection is redone without it.

Preprocessing per volume and modality (`intensity_norm`): "median" (the default, ours) divides by
twice the median of the brain voxels (> 0) and clips to [0, 1]: a percentile scaling is moved by
a large bright tumour (benchmarks/ABLATION.md, `percentile_norm`); "percentile" (the former
default) clips to [0, p99.5] where p99.5 is the 99.5th percentile of the brain voxels, divides
by p99.5 -> [0, 1]; `foreground` = voxels > 0 in any chosen
modality; slices resized to `image_size` (bilinear/area; masks nearest). Only the selected
in-range slices stay in memory. The optional `cache_dir` (outside the data root) stores the scan
summary and preprocessed slices per subject, keyed by the files' names, sizes and modification
times and by every preprocessing argument.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from data_modules.brats_volumes import (
    CLIP_PERCENTILE,
    INTENSITY_NORMS,
    check_3d,
    find_subject_dirs,
    find_subject_file,
    load_volume,
    normalize_volume,
    preprocess_slices,
    rel_name,
)
from data_modules.common import (
    FewShotDataModule,
    Sample,
    Split,
    check_arguments,
    choose_test_pool,
    rank_key,
    select_loading,
)
from data_modules.errors import DataError
from data_modules.transforms import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)

MODALITIES = ("flair", "t1", "t1ce", "t2")
_CACHE_VERSION = 1


# ----------------------------------------------------------------------------- subjects
@dataclass
class _Subject:
    name: str
    images: list[Path]  # one per chosen modality
    seg: Path
    tumorous: np.ndarray  # (n_range,) bool, in-range slices with seg > 0
    has_brain: np.ndarray  # (n_range,) bool, in-range slices with voxels > 0


@dataclass
class _Selection:
    pool: list[str]
    test: list[tuple[str, int]]  # (subject, slice)
    train: list[tuple[str, int]]  # sorted by subject
    val: dict[str, list[int]]  # training subject -> other healthy slices


def _modalities(modality: str | list[str]) -> list[str]:
    mods = [modality] if isinstance(modality, str) else list(modality)
    if len(mods) not in (1, 3) or any(m not in MODALITIES for m in mods):
        raise ValueError(
            f"modality must be one of {MODALITIES} or a list of three of them, got {modality!r}"
        )
    return mods


def _slice_range(slice_range: tuple[int, int]) -> tuple[int, int]:
    lo, hi = (int(v) for v in slice_range)
    if not 0 <= lo <= hi:
        raise ValueError(f"slice_range must be (lo, hi) with 0 <= lo <= hi, got {slice_range}")
    return lo, hi


BRATS_LABELS = (0, 1, 2, 4)  # background, necrotic / non-enhancing core, oedema, enhancing


class BraTSDataModule(FewShotDataModule):
    """BraTS2020 few-shot split (module docstring); items as in docs/batch_contract.md."""

    dataset_name = "brats"

    def __init__(
        self,
        root: str,
        shots: int,
        seed: int = 0,
        test_seed: int = 0,
        modality: str | list[str] = "flair",
        slice_range: tuple[int, int] = (60, 90),
        n_test_healthy: int = 130,
        n_test_tumorous: int = 290,
        image_size: int = 256,
        batch_size: int = 8,
        steps_per_epoch: int = 20,
        num_workers: int = 0,
        strict: bool = False,
        cache_dir: str | None = None,
        textures: str | None = None,
        lesion_min_fraction: float = 0.5,
        intensity_lesions: float = 0.5,
        intensity_norm: str = "median",
        train_pool: int = 0,
    ) -> None:
        super().__init__(
            shots,
            seed,
            test_seed,
            image_size,
            batch_size,
            steps_per_epoch,
            num_workers,
            textures,
            lesion_min_fraction,
            intensity_lesions,
            train_pool,
        )
        self.save_hyperparameters()
        self.root = Path(root).expanduser()
        self.modalities = _modalities(modality)
        self.slice_range = _slice_range(slice_range)
        check_arguments(
            {
                "n_test_healthy": (n_test_healthy, "[0, inf)"),
                "n_test_tumorous": (n_test_tumorous, "[0, inf)"),
            }
        )
        self.n_test_healthy = int(n_test_healthy)
        self.n_test_tumorous = int(n_test_tumorous)
        if intensity_norm not in INTENSITY_NORMS:
            raise ValueError(
                f"intensity_norm must be one of {INTENSITY_NORMS}, got {intensity_norm!r}"
            )
        self.intensity_norm = intensity_norm
        self.strict = bool(strict)
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        self._subjects: dict[str, _Subject] = {}
        self._loaded: dict[str, dict[str, np.ndarray]] = {}

    # ------------------------------------------------------------------------- public info
    def preprocessing(self) -> dict[str, object]:
        return {
            "dataset": self.dataset_name,
            "modality": list(self.modalities),
            "channels": "one modality replicated to 3 channels"
            if len(self.modalities) == 1
            else "three modalities as the 3 channels, in this order",
            "slice_range": list(self.slice_range),
            "image_size": self.image_size,
            "intensity_norm": self.intensity_norm,
            "normalization": (
                f"per volume and modality: {self._norm_text()} -> [0, 1]; resize (bilinear/area, masks nearest); "
                f"then ImageNet mean {list(IMAGENET_MEAN)} / std {list(IMAGENET_STD)}"
            ),
            "foreground": "voxels > 0 in any chosen modality",
            "orientation": "axial slice k = vol[:, :, k] of the stored array, no reorientation "
            "(BraTS/ITK LPS affine)",
            **self._training_geometry(),
        }

    def _norm_text(self) -> str:
        if self.intensity_norm == "median":
            return "divide by twice the median of the voxels > 0, clip at 1"
        return f"clip to [0, p{CLIP_PERCENTILE}] of the voxels > 0, divide by p{CLIP_PERCENTILE}"

    def _training_geometry(self) -> dict[str, object]:
        """What `pathoscope predict` compares new volumes with, from the K training subjects once
        the split exists: `axcodes` and `voxel_spacing` (mm) of their stored arrays (headers only)
        and `foreground_fraction`, the mean foreground fraction of their healthy in-range slices
        (the training and validation-normal samples)."""
        if self._split is None:
            return {}
        subjects = [self._subjects[name] for name in self.split.train_subjects]
        headers = [nib.load(str(sub.images[0])) for sub in subjects]
        axcodes = {nib.aff2axcodes(h.affine) for h in headers}
        spacing = np.mean([np.asarray(h.header.get_zooms()[:3], float) for h in headers], axis=0)
        samples = [*self.split.train, *(s for group in self.split.val_normal for s in group)]
        fractions = [float(sample.foreground.mean()) for sample in samples]
        info: dict[str, object] = {"voxel_spacing": [round(float(z), 4) for z in spacing]}
        if len(axcodes) == 1:  # mixed orientations: predict falls back to the BraTS default
            info["axcodes"] = list(axcodes.pop())
        if fractions:
            info["foreground_fraction"] = round(float(np.mean(fractions)), 4)
        return info

    # ------------------------------------------------------------------------- split
    def _build_split(self) -> Split:
        self._check_cache_dir()
        subjects = self._scan_all()
        self._subjects = subjects
        selection, bad = select_loading(
            lambda bad: self._select(subjects, bad), self._load_selection
        )
        lo = self.slice_range[0]

        def sample(subject: str, k: int, label: int) -> Sample:
            arrays = self._loaded[subject]
            i = k - lo
            return Sample(
                image=arrays["image"][i],
                foreground=arrays["foreground"][i],
                gt_mask=arrays["gt_mask"][i],
                has_mask=True,
                label=label,
                subject=subject,
                slice=k,
            )

        test = [sample(s, k, int(subjects[s].tumorous[k - lo])) for s, k in sorted(selection.test)]
        train = [sample(s, k, 0) for s, k in selection.train]
        val = [[sample(s, k, 0) for k in selection.val[s]] for s, _ in selection.train]
        # Keep only the selected slices (the Samples above hold views of them: copy).
        for group in [test, train, *val]:
            for smp in group:
                smp.image, smp.foreground = smp.image.copy(), smp.foreground.copy()
                smp.gt_mask = smp.gt_mask.copy()
        self._loaded = {}
        return Split(
            train=train,
            val_normal=val,
            test=test,
            train_subjects=[s for s, _ in selection.train],
            test_subjects=sorted(selection.pool),
            info={
                "usable_subjects": len(subjects) - len(bad),
                "test_healthy": sum(1 for t in test if t.label == 0),
                "test_tumorous": sum(1 for t in test if t.label == 1),
            },
        )

    def _check_cache_dir(self) -> None:
        if self.cache_dir is None:
            return
        cache = self.cache_dir.resolve()
        root = self.root.resolve()
        if cache == root or root in cache.parents:
            raise DataError(
                f"cache_dir {self.cache_dir} is inside the data root {self.root}: nothing may be "
                "written into the data root; choose a folder outside it"
            )

    def _scan_all(self) -> dict[str, _Subject]:
        dirs = find_subject_dirs(self.root)
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            results = list(pool.map(self._scan_subject_safe, dirs))
        subjects: dict[str, _Subject] = {}
        for folder, result in zip(dirs, results, strict=True):
            if isinstance(result, DataError):
                self._skip(folder.name, result, self.strict)
            else:
                subjects[result.name] = result
        if not subjects:
            raise DataError(f"{self.root}: none of the {len(dirs)} subject folders is usable")
        return subjects

    def _scan_subject_safe(self, folder: Path) -> _Subject | DataError:
        try:
            return self._scan_subject(folder)
        except DataError as err:
            return err

    def _scan_subject(self, folder: Path) -> _Subject:
        images = [find_subject_file(folder, m) for m in self.modalities]
        seg = find_subject_file(folder, "seg")
        lo, hi = self.slice_range
        key = self._cache_key("scan", [*images, seg], slice_range=[lo, hi])
        cached = self._cache_read(key)
        if cached is not None:
            return _Subject(folder.name, images, seg, cached["tumorous"], cached["has_brain"])
        shapes = []
        for path in [*images, seg]:
            try:
                header_shape = nib.load(str(path)).shape
            except Exception as exc:
                raise DataError(f"{rel_name(path)}: cannot read NIfTI header ({exc})") from exc
            shapes.append(check_3d(path, header_shape))
        for path, shape in zip(images, shapes[:-1], strict=True):
            if shape != shapes[-1]:
                raise DataError(
                    f"{rel_name(seg)}: shape {shapes[-1]} does not match {rel_name(path)} shape {shape}"
                )
        if shapes[-1][2] <= hi:
            raise DataError(
                f"{rel_name(seg)}: slice_range {lo}..{hi} needs at least {hi + 1} axial slices, "
                f"the volume has {shapes[-1][2]}"
            )
        tumorous = self._read_slab(seg, lo, hi).any(axis=0)  # (n_range,)
        # Slices without any brain (possible at the volume's ends) are never used.
        has_brain = self._read_slab(images[0], lo, hi).any(axis=0)
        if not has_brain.any():
            if not load_volume(images[0]).any():
                raise DataError(f"{rel_name(images[0])}: all voxels are zero")
            raise DataError(f"{rel_name(images[0])}: no voxel > 0 in axial slices {lo}..{hi}")
        self._cache_write(key, tumorous=tumorous, has_brain=has_brain)
        return _Subject(folder.name, images, seg, tumorous, has_brain)

    @staticmethod
    def _read_slab(path: Path, lo: int, hi: int) -> np.ndarray:
        """(H*W, n) bool: voxels > 0 of axial slices lo..hi (reads only up to slice hi)."""
        try:
            slab = np.asarray(nib.load(str(path)).dataobj[:, :, lo : hi + 1])
        except Exception as exc:
            raise DataError(f"{rel_name(path)}: cannot read the volume data ({exc})") from exc
        return slab.reshape(-1, hi - lo + 1) > 0

    def _select(self, subjects: dict[str, _Subject], bad: set[str]) -> _Selection:
        lo, _ = self.slice_range
        names = sorted(s for s in subjects if s not in bad)
        healthy, tumorous = {}, {}
        for s in names:
            sub = subjects[s]
            healthy[s] = [lo + int(i) for i in np.flatnonzero(~sub.tumorous & sub.has_brain)]
            tumorous[s] = [lo + int(i) for i in np.flatnonzero(sub.tumorous & sub.has_brain)]
        eligible = {s for s in names if healthy[s]}
        pool = choose_test_pool(
            names,
            {s: (len(healthy[s]), len(tumorous[s])) for s in names},
            eligible,
            self.n_test_healthy,
            self.n_test_tumorous,
            self.shots,
            self.test_seed,
            f"subjects (healthy / tumorous slices in {self.slice_range[0]}..{self.slice_range[1]})",
        )
        ts = self.test_seed
        test_h = sorted(
            ((s, k) for s in pool for k in healthy[s]), key=lambda x: rank_key(ts, "healthy", *x)
        )
        test_t = sorted(
            ((s, k) for s in pool for k in tumorous[s]), key=lambda x: rank_key(ts, "tumorous", *x)
        )
        test = test_h[: self.n_test_healthy] + test_t[: self.n_test_tumorous]
        candidates = sorted(eligible - set(pool), key=lambda s: rank_key(self.seed, "train", s))
        chosen = sorted(candidates[: self.shots])
        train, val = [], {}
        for s in chosen:
            ranked = sorted(healthy[s], key=lambda k, s=s: rank_key(self.seed, "shot", s, k))
            train.append((s, ranked[0]))
            val[s] = sorted(ranked[1:])
        return _Selection(pool, test, train, val)

    # ------------------------------------------------------------------------- loading
    def _load_selection(self, selection: _Selection) -> set[str]:
        needed: dict[str, set[int]] = {}
        for s, k in selection.test + selection.train:
            needed.setdefault(s, set()).add(k)
        for s, ks in selection.val.items():
            needed.setdefault(s, set()).update(ks)
        todo = sorted(s for s in needed if s not in self._loaded)
        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
            results = list(pool.map(self._load_subject_safe, todo))
        failed = set()
        for s, result in zip(todo, results, strict=True):
            if isinstance(result, DataError):
                self._skip(s, result, self.strict)
                failed.add(s)
            else:
                self._loaded[s] = result
        return failed

    def _load_subject_safe(self, name: str) -> dict[str, np.ndarray] | DataError:
        try:
            return self._load_subject(name)
        except DataError as err:
            return err

    def _load_subject(self, name: str) -> dict[str, np.ndarray]:
        """All in-range slices of one subject, preprocessed: image (n, S, S, C), foreground, gt_mask."""
        subject = self._subjects[name]
        lo, hi = self.slice_range
        key = self._cache_key(
            "slices",
            [*subject.images, subject.seg],
            slice_range=[lo, hi],
            modalities=self.modalities,
            image_size=self.image_size,
            **(
                {"intensity_norm": self.intensity_norm}
                if self.intensity_norm != "percentile"
                else {}
            ),
        )
        cached = self._cache_read(key)
        if cached is not None:
            return cached
        volumes = []
        for path in subject.images:
            volume = load_volume(path)
            try:
                volumes.append(normalize_volume(volume, self.intensity_norm))
            except DataError as err:
                raise DataError(f"{rel_name(path)}: {err}") from None
        seg = load_volume(subject.seg)
        if seg.shape != volumes[0].shape:  # headers were checked; guard against odd files
            raise DataError(
                f"{rel_name(subject.seg)}: shape {seg.shape} does not match {volumes[0].shape}"
            )
        self._check_labels(subject.seg, seg[:, :, lo : hi + 1])
        arrays = preprocess_slices(volumes, list(range(lo, hi + 1)), self.image_size, seg)
        self._cache_write(key, **arrays)
        return arrays

    def _check_labels(self, path: Path, seg: np.ndarray) -> None:
        """Labels of the used slices outside BraTS's {0, 1, 2, 4}: a warning (every label > 0
        still counts as tumour), or a DataError under `strict`."""
        values = np.unique(seg)
        odd = [v.item() for v in values if v not in BRATS_LABELS]
        if not odd:
            return
        shown = ", ".join(f"{v:g}" for v in odd[:8]) + (", ..." if len(odd) > 8 else "")
        lo, hi = self.slice_range
        message = (
            f"{rel_name(path)}: labels {shown} in slices {lo}..{hi} are not BraTS labels "
            f"(0, 1, 2, 4); every label > 0 is taken as tumour"
        )
        if self.strict:
            raise DataError(message)
        log.warning(message)

    # ------------------------------------------------------------------------- cache
    def _cache_key(self, kind: str, files: list[Path], **params: object) -> str | None:
        if self.cache_dir is None:
            return None
        desc = {
            "version": _CACHE_VERSION,
            "kind": kind,
            "files": [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files],
            **params,
        }
        digest = hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:32]
        return f"brats-{kind}-{digest}.npz"

    def _cache_read(self, key: str | None) -> dict[str, np.ndarray] | None:
        if key is None or self.cache_dir is None:
            return None
        path = self.cache_dir / key
        if not path.is_file():
            return None
        try:
            with np.load(path) as data:
                return {k: data[k] for k in data.files}
        except Exception as exc:  # a damaged cache entry is rebuilt, never trusted
            log.warning("ignoring unreadable cache entry %s (%s)", path, exc)
            return None

    def _cache_write(self, key: str | None, **arrays: np.ndarray) -> None:
        if key is None or self.cache_dir is None:
            return
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        # Atomic: concurrent runs (several seeds at once) never read a half-written entry.
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, self.cache_dir / key)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
