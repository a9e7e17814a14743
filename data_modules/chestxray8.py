"""NIH ChestX-ray8 (ChestX-ray14) few-shot data module (PNG + CSV).

Layout under `root`: PNGs in `images/` and/or `images_*/images/` (the Kaggle / tarball layouts),
`Data_Entry_2017*.csv` (the last in sorted order, i.e. `_v2020` when present), optional
`BBox_List_2017.csv`, `train_val_list.txt` and `test_list.txt`. CSV rows whose PNG is absent are
ignored (a partial download works); `view` filters on "View Position" ("PA", "AP" or None = all).
Normal = "No Finding".

Split procedure (choices rank names by a hash of (seed, purpose, name), see common.py):
1. Test candidates: images listed in `test_list.txt` (else all not in `train_val_list.txt`);
   training candidates: images in `train_val_list.txt` (else all not in `test_list.txt`) of
   patients with no test candidate. Without either list, patients are split like BraTS subjects:
   the test patients are the smallest prefix of the `test_seed` ranking of patients supplying the
   requested normal and abnormal images while leaving `shots` patients with a normal image.
2. Test set: round(n_test * test_abnormal_fraction) abnormal and the rest normal images, the first
   ones of the test candidates in the `test_seed` ranking (DataError with the counts when too few:
   lower `n_test`).
3. Training: the first `shots` training-candidate patients with a normal image in the `seed`
   ranking, one normal image each (first in the `seed` ranking); validation: those patients'
   other normal images.

`gt_mask` is box level: the union of the image's boxes in BBox_List_2017.csv. Box coordinates are
in the frame of the released 1024 x 1024 PNGs (`bbox_frame`); they are scaled to the PNG's actual
size (resized copies of the dataset) and then resized with the image. `has_mask` is True for
normal images (empty `gt_mask`) and for boxed abnormal images, False for unboxed abnormal images.
Images: 8-bit, 16-bit, RGB(A) or palette PNGs become one grey channel in [0, 1] (8-bit / 255,
16-bit / 65535, colour: ITU-R 601 luma, alpha ignored), replicated to 3 channels; the foreground
is the whole image.
"""

from __future__ import annotations

import csv
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

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
from data_modules.transforms import IMAGENET_MEAN, IMAGENET_STD, resize

log = logging.getLogger(__name__)

NORMAL_LABEL = "No Finding"
DATA_ENTRY_REQUIRED = ("Image Index", "Finding Labels", "Patient ID")
BBOX_REQUIRED = ("Image Index", "Bbox [x", "y", "w", "h]")
BBOX_FRAME = 1024
VIEWS = ("PA", "AP")  # the "View Position" values of the real list


def load_grey_png(path: str | Path) -> np.ndarray:
    """Any PNG -> (H, W) float32 grey in [0, 1]; DataError naming the file when unreadable."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
                arr = np.asarray(img).astype(np.float32)
                return np.clip(arr / 65535.0, 0.0, 1.0)  # 16-bit PNG
            if mode == "F":
                return np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)
            if mode != "L":
                # RGB(A), LA, P, 1 -> luma (Pillow uses ITU-R 601-2; alpha is dropped).
                img = img.convert("RGB").convert("L") if mode in ("P", "PA") else img.convert("L")
            return np.asarray(img, dtype=np.float32) / 255.0
    except DataError:
        raise
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError...
        raise DataError(f"{path}: cannot read PNG image ({exc})") from exc


def _read_csv(path: Path, required: tuple[str, ...]) -> list[dict[str, str]]:
    """Rows of a CSV as dicts (header names stripped); DataError when columns are missing."""
    try:
        with open(path, newline="") as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            missing = [c for c in required if c not in header]
            if missing:
                raise DataError(
                    f"{path}: missing columns {missing}; expected {list(required)}, found {header}"
                )
            return [
                dict(zip(header, (v.strip() for v in row), strict=False)) for row in reader if row
            ]
    except DataError:
        raise
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read CSV ({exc})") from exc


# (test images, training images, validation images per training patient, test patients)
_ChestSelection = tuple[list[str], list[str], list[list[str]], set[str]]


@dataclass
class _Record:
    name: str
    patient: str
    normal: bool
    path: Path


class ChestXray8DataModule(FewShotDataModule):
    """ChestX-ray8 few-shot split (module docstring); items as in docs/batch_contract.md.

    Item `subject` is the image file name ("Image Index"); `train_subjects` / `test_subjects`
    are patient IDs.
    """

    dataset_name = "chestxray8"
    input_kind = "image"

    def __init__(
        self,
        root: str,
        shots: int,
        seed: int = 0,
        test_seed: int = 0,
        n_test: int = 1490,
        test_abnormal_fraction: float = 0.5,
        view: str | None = "PA",
        image_size: int = 256,
        batch_size: int = 8,
        steps_per_epoch: int = 20,
        num_workers: int = 0,
        strict: bool = False,
        bbox_frame: int = BBOX_FRAME,
        textures: str | None = None,
        lesion_min_fraction: float = 0.5,
        intensity_lesions: float = 0.0,
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
        check_arguments(
            {
                "n_test": (n_test, "[1, inf)"),
                "test_abnormal_fraction": (test_abnormal_fraction, "[0, 1]"),
                "bbox_frame": (bbox_frame, "[1, inf)"),
            }
        )
        if view is not None and str(view).upper() not in VIEWS:
            raise ValueError(f"view must be one of {VIEWS} (any case) or null, got {view!r}")
        self.root = Path(root).expanduser()
        self.n_test = int(n_test)
        self.test_abnormal_fraction = float(test_abnormal_fraction)
        self.view = view
        self.strict = bool(strict)
        self.bbox_frame = int(bbox_frame)
        self._boxes: dict[str, list[tuple[float, float, float, float]]] = {}
        self._paths: dict[str, Path] = {}
        self._png_size: dict[str, tuple[int, int]] = {}
        self._loaded: dict[str, np.ndarray] = {}

    def preprocessing(self) -> dict[str, object]:
        return {
            "dataset": self.dataset_name,
            "view": self.view,
            "image_size": self.image_size,
            "channels": "one grey channel replicated to 3",
            "normalization": (
                "PNG -> grey [0, 1] (8-bit / 255, 16-bit / 65535, colour: ITU-R 601 luma, alpha "
                "dropped); resize (bilinear/area); then ImageNet mean "
                f"{list(IMAGENET_MEAN)} / std {list(IMAGENET_STD)}"
            ),
            "foreground": "whole image",
            "orientation": "as stored in the PNG",
        }

    # ------------------------------------------------------------------------- reading
    def _index_images(self) -> dict[str, Path]:
        folders = [self.root / "images", *sorted(self.root.glob("images_*/images"))]
        paths: dict[str, Path] = {}
        for folder in folders:
            if folder.is_dir():
                with os.scandir(folder) as it:
                    for entry in it:
                        if entry.name.lower().endswith(".png"):
                            paths.setdefault(entry.name, Path(entry.path))
        if not paths:
            raise DataError(
                f"{self.root}: no PNG images in images/ or images_*/images/ (expected the "
                "ChestX-ray8 layout: images/00000001_000.png, Data_Entry_2017.csv)"
            )
        return paths

    def _read_records(self, paths: dict[str, Path]) -> list[_Record]:
        entries = sorted(self.root.glob("Data_Entry_2017*.csv"))
        if not entries:
            raise DataError(f"{self.root}: no Data_Entry_2017*.csv label file")
        entry = entries[-1]  # Data_Entry_2017_v2020.csv (corrected labels) when present
        required = DATA_ENTRY_REQUIRED + (("View Position",) if self.view else ())
        rows = _read_csv(entry, required)
        records, absent = [], 0
        for row in rows:
            name = row["Image Index"]
            if self.view and row["View Position"].upper() != self.view.upper():
                continue
            if name not in paths:
                absent += 1
                continue
            labels = {lab.strip() for lab in row["Finding Labels"].split("|")}
            records.append(_Record(name, row["Patient ID"], labels == {NORMAL_LABEL}, paths[name]))
        if absent:
            log.info(
                "%s: %d rows without a PNG under %s are ignored", entry.name, absent, self.root
            )
        if not records:
            raise DataError(
                f"{entry}: no rows with an existing PNG and view {self.view!r} "
                f"({len(rows)} rows, {len(paths)} PNGs)"
            )
        return sorted(records, key=lambda r: r.name)

    def _read_boxes(self) -> dict[str, list[tuple[float, float, float, float]]]:
        path = self.root / "BBox_List_2017.csv"
        if not path.is_file():
            return {}
        boxes: dict[str, list[tuple[float, float, float, float]]] = {}
        for line, row in enumerate(_read_csv(path, BBOX_REQUIRED), start=2):
            try:
                x, y, w, h = (float(row[c]) for c in BBOX_REQUIRED[1:])
            except ValueError as exc:
                raise DataError(f"{path}: line {line}: bad box coordinates ({exc})") from exc
            boxes.setdefault(row["Image Index"], []).append((x, y, w, h))
        return boxes

    def _read_list(self, name: str) -> set[str] | None:
        path = self.root / name
        if not path.is_file():
            return None
        return {line.strip() for line in path.read_text().splitlines() if line.strip()}

    # ------------------------------------------------------------------------- split
    def _build_split(self) -> Split:
        if not self.root.is_dir():
            what = "is not a folder" if self.root.exists() else "does not exist"
            raise DataError(f"{self.root}: ChestX-ray8 root folder {what}")
        self._paths = self._index_images()
        records = self._read_records(self._paths)
        self._boxes = self._read_boxes()
        train_list = self._read_list("train_val_list.txt")
        test_list = self._read_list("test_list.txt")
        by_name = {r.name: r for r in records}
        selection, _ = select_loading(
            lambda bad: self._select(
                [r for r in records if r.name not in bad], train_list, test_list
            ),
            self._load_selection,
        )
        test_names, train_names, val_names, test_patients = selection

        def sample(name: str) -> Sample:
            rec = by_name[name]
            image = self._loaded[name]
            if rec.normal:
                gt, has_mask = np.zeros(image.shape[:2], dtype=bool), True
            else:
                gt, has_mask = self._gt_mask(name), name in self._boxes
            return Sample(
                image=image,
                foreground=np.ones(image.shape[:2], dtype=bool),
                gt_mask=gt,
                has_mask=has_mask,
                label=0 if rec.normal else 1,
                subject=name,
                slice=0,
            )

        test = [sample(n) for n in sorted(test_names)]
        train = [sample(n) for n in train_names]
        val = [[sample(n) for n in names] for names in val_names]
        self._loaded = {}
        return Split(
            train=train,
            val_normal=val,
            test=test,
            train_subjects=[by_name[n].patient for n in train_names],
            test_subjects=sorted(test_patients),
            info={
                "images": len(records),
                "test_normal": sum(1 for t in test if t.label == 0),
                "test_abnormal": sum(1 for t in test if t.label == 1),
                "test_boxed": sum(1 for t in test if t.label == 1 and t.has_mask),
            },
        )

    def _select(
        self, records: list[_Record], train_list: set[str] | None, test_list: set[str] | None
    ) -> _ChestSelection:
        """(test images, training images, per training patient its other normal images, test
        patients)."""
        n_abnormal = round(self.n_test * self.test_abnormal_fraction)
        n_normal = self.n_test - n_abnormal
        test_candidates = self._test_candidates(
            records, train_list, test_list, n_normal, n_abnormal
        )
        test_patients = {r.patient for r in test_candidates}
        test_names = self._test_names(test_candidates, n_normal, n_abnormal)
        train_names, val_names = self._training_shots(records, test_patients, train_list)
        return test_names, train_names, val_names, test_patients

    def _test_candidates(
        self,
        records: list[_Record],
        train_list: set[str] | None,
        test_list: set[str] | None,
        n_normal: int,
        n_abnormal: int,
    ) -> list[_Record]:
        """The test split: test_list.txt, else all but train_val_list.txt, else (no official
        split) the images of a test_seed-ranked prefix of the patients."""
        if test_list is not None:
            return [r for r in records if r.name in test_list]
        if train_list is not None:  # only train_val_list.txt: the rest is the test split
            return [r for r in records if r.name not in train_list]
        by_patient: dict[str, list[_Record]] = {}
        for r in records:
            by_patient.setdefault(r.patient, []).append(r)
        supply = {
            p: (sum(r.normal for r in rs), sum(not r.normal for r in rs))
            for p, rs in by_patient.items()
        }
        eligible = {p for p, (n, _) in supply.items() if n > 0}
        pool = choose_test_pool(
            sorted(by_patient),
            supply,
            eligible,
            n_normal,
            n_abnormal,
            self.shots,
            self.test_seed,
            f"patients (normal / abnormal images, view {self.view})",
        )
        return [r for p in pool for r in by_patient[p]]

    def _test_names(
        self, test_candidates: list[_Record], n_normal: int, n_abnormal: int
    ) -> list[str]:
        """The first `n_normal` normal and `n_abnormal` abnormal candidates in test_seed order."""
        ts = self.test_seed
        normals = sorted(
            (r.name for r in test_candidates if r.normal), key=lambda n: rank_key(ts, "normal", n)
        )
        abnormals = sorted(
            (r.name for r in test_candidates if not r.normal),
            key=lambda n: rank_key(ts, "abnormal", n),
        )
        if len(normals) < n_normal or len(abnormals) < n_abnormal:
            raise DataError(
                f"{self.root}: the test split has {len(normals)} normal and {len(abnormals)} "
                f"abnormal images (view {self.view}), fewer than the {n_normal} normal and "
                f"{n_abnormal} abnormal requested by n_test={self.n_test} with "
                f"test_abnormal_fraction={self.test_abnormal_fraction}; lower n_test (at most "
                f"{self._max_n_test(len(normals), len(abnormals))})"
            )
        return normals[:n_normal] + abnormals[:n_abnormal]

    def _training_shots(
        self, records: list[_Record], test_patients: set[str], train_list: set[str] | None
    ) -> tuple[list[str], list[list[str]]]:
        """(one training image per shot, the shot patient's other normal images): normal images
        of patients never in the test split, patients and images ranked by `seed`."""
        train_ok = (lambda r: True) if train_list is None else (lambda r: r.name in train_list)
        train_by_patient: dict[str, list[str]] = {}
        for r in records:
            if r.normal and r.patient not in test_patients and train_ok(r):
                train_by_patient.setdefault(r.patient, []).append(r.name)
        if len(train_by_patient) < self.shots:
            raise DataError(
                f"{self.root}: only {len(train_by_patient)} training patients with a normal "
                f"image (view {self.view}, outside the test split), fewer than shots={self.shots}"
            )
        patients = sorted(train_by_patient, key=lambda p: rank_key(self.seed, "train", p))
        chosen = sorted(patients[: self.shots])
        train_names, val_names = [], []
        for p in chosen:
            ranked = sorted(
                train_by_patient[p], key=lambda n, p=p: rank_key(self.seed, "shot", p, n)
            )
            train_names.append(ranked[0])
            val_names.append(sorted(ranked[1:]))
        return train_names, val_names

    def _max_n_test(self, normals: int, abnormals: int) -> int:
        """Largest n_test the test split supports at the requested abnormal fraction."""
        f = self.test_abnormal_fraction
        best = 0
        for n in range(1, normals + abnormals + 1):
            a = round(n * f)
            if a <= abnormals and n - a <= normals:
                best = n
        return best

    # ------------------------------------------------------------------------- loading
    def _load_selection(self, selection: _ChestSelection) -> set[str]:
        test_names, train_names, val_names, _ = selection
        names = sorted(
            {*test_names, *train_names, *(n for ns in val_names for n in ns)} - set(self._loaded)
        )
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            results = list(pool.map(self._load_image_safe, names))
        failed = set()
        for name, result in zip(names, results, strict=True):
            if isinstance(result, DataError):
                self._skip(name, result, self.strict)
                failed.add(name)
            else:
                self._loaded[name] = result
        return failed

    def _load_image_safe(self, name: str) -> np.ndarray | DataError:
        try:
            return self._load_image(name)
        except DataError as err:
            return err

    def _load_image(self, name: str) -> np.ndarray:
        """(S, S, 1) float32 grey image, resized."""
        grey = load_grey_png(self._paths[name])  # (H, W)
        self._png_size[name] = grey.shape
        image, _ = resize(grey[:, :, None], self.image_size)
        return image.reshape(self.image_size, self.image_size, 1)

    def _gt_mask(self, name: str) -> np.ndarray:
        """Union of the image's boxes, drawn at the PNG's size then resized (nearest)."""
        h, w = self._png_size[name]
        gt = np.zeros((h, w), dtype=bool)
        sx, sy = w / self.bbox_frame, h / self.bbox_frame
        for x, y, bw, bh in self._boxes.get(name, []):
            x0, y0 = int(np.floor(x * sx)), int(np.floor(y * sy))
            x1, y1 = int(np.ceil((x + bw) * sx)), int(np.ceil((y + bh) * sy))
            gt[max(y0, 0) : max(y1, 0), max(x0, 0) : max(x1, 0)] = True
        # Nearest-neighbour resize (the rule cv2.INTER_NEAREST uses): dst[i] = src[floor(i * h / S)].
        rows = np.minimum((np.arange(self.image_size) * h) // self.image_size, h - 1)
        cols = np.minimum((np.arange(self.image_size) * w) // self.image_size, w - 1)
        return gt[np.ix_(rows, cols)]
