"""Pieces shared by the few-shot data modules (BraTS2020, ChestX-ray8).

* `Sample`: one preprocessed 2D image held in memory at the network resolution.
* `rank_key` / `choose_test_pool`: order-stable, seeded selection. Every random choice of a split
  ranks candidates by a hash of (seed, purpose, name), not by a permutation of a list: removing
  a candidate (a bad subject found late) never changes the relative order of the others, and the
  same names give the same split on every machine.
* `EvalDataset`, `TrainDataset`, `TrainSampler`: item dicts, which the loaders stack into the typed
  batches of `pathoscope.batches` (`EvalBatch`, `TrainBatch`; their fields are the contract).
  Training items depend only on the global index g = epoch * length + i that `TrainSampler`
  yields and on the seed (augmentation and lesion synthesis are seeded from `np.random.default_rng([seed, g])`),
  so batches are identical whatever `num_workers` is.
* `FewShotDataModule`: the LightningDataModule both datasets derive from; a subclass only
  implements `_build_split()` (and `preprocessing()`).
"""

from __future__ import annotations

import hashlib
import logging
from abc import abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from data_modules.anomaly_synthesis import LesionSynthesizer
from data_modules.errors import DataError
from data_modules.transforms import TrainAugmentation, normalize
from pathoscope.batches import EvalBatch, ImageBatch, TrainBatch
from pathoscope.feature_grid import FEATURE_STRIDE
from pathoscope.hparams import check_range

log = logging.getLogger(__name__)
SelectionT = TypeVar("SelectionT")

# Extra validation copies for a training subject without another healthy image.
VAL_COPIES_WITHOUT_OTHERS = 2
# The range of image_size (--data.image_size), checked at construction.
# Minimum: the feature grid has one cell per FEATURE_STRIDE x FEATURE_STRIDE pixels and a
# synthetic lesion must cover a whole cell (LesionSynthesizer.lesion_mask): a smaller image has
# no cell at all.
MIN_IMAGE_SIZE = FEATURE_STRIDE
# Maximum: memory. Each evaluation item is held as a float32 image plus two bool masks, 6 S^2
# bytes, and its map as much again when --metrics.eval_size follows S: the BraTS protocol's 420
# test slices take 5 GiB at 1024 px, and a training step of 8 images (x_n, x_p and v_s on a
# 128 x 128 grid, 384 + 1024 channels) about 3 GiB more, what a 16 GB machine holds; twice the
# side is four times that. 1024 px is also ChestX-ray8's own size (BraTS's is 240): above it,
# resizing only interpolates.
MAX_IMAGE_SIZE = 1024


def check_image_size(image_size: object) -> None:
    """ValueError naming --data.image_size and its bounds unless MIN <= image_size <= MAX."""
    if (
        isinstance(image_size, int)
        and not isinstance(image_size, bool)
        and MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE
    ):
        return
    raise ValueError(
        f"image_size (--data.image_size) must be an integer in [{MIN_IMAGE_SIZE}, "
        f"{MAX_IMAGE_SIZE}], got {image_size!r}: below {MIN_IMAGE_SIZE} px the image holds no "
        f"cell of the {FEATURE_STRIDE}-pixel feature grid to place a synthetic lesion in, and "
        f"above {MAX_IMAGE_SIZE} px the test set and a training step no longer fit in memory"
    )


def check_arguments(arguments: dict[str, tuple[object, str]]) -> None:
    """A data module's constructor arguments, {name: (value, interval)}: ValueError naming the
    first one outside its interval, the intervals written as `pathoscope.hparams.check_range` reads
    them ("[1, inf)", "[0, 1]"). (`pathoscope.hparams.check_ranges` checks a hyperparameter
    group's fields against the group's RANGES instead.)"""
    for name, (value, interval) in arguments.items():
        check_range(name, value, interval)


@dataclass
class Sample:
    """One preprocessed image at the network resolution (S = image_size)."""

    image: np.ndarray  # (S, S, C) float32 in [0, 1], C = 1 (replicated later) or 3
    foreground: np.ndarray  # (S, S) bool
    gt_mask: np.ndarray  # (S, S) bool
    has_mask: bool
    label: int  # 1 = pathological
    subject: str
    slice: int = 0


@dataclass
class Split:
    """What a data module's `_build_split` returns."""

    train: list[Sample]  # K samples, one per training subject, in `train_subjects` order
    val_normal: list[list[Sample]]  # per training subject: its other healthy samples
    test: list[Sample]
    train_subjects: list[str]
    test_subjects: list[str]
    info: dict[str, object] = field(default_factory=dict)  # counts for the log


def to_rgb(image: np.ndarray) -> np.ndarray:
    """(H, W, 1) or (H, W, 3) -> (H, W, 3) float32 (a single channel is replicated)."""
    image = np.asarray(image, dtype=np.float32)
    return np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image


def rank_key(*parts: object) -> bytes:
    """Seeded sort key for selection: sorted(items, key=lambda x: rank_key(seed, "purpose", x))."""
    return hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()


def choose_test_pool(
    units: Sequence[str],
    supply: dict[str, tuple[int, int]],
    eligible: set[str],
    n_normal: int,
    n_abnormal: int,
    shots: int,
    test_seed: int,
    what: str,
) -> list[str]:
    """Smallest prefix of the `test_seed` ranking of `units` supplying the requested test counts.

    `supply[u]` = (normal, abnormal) items unit u can give; `eligible`: units that could be
    training subjects. The pool must leave at least `shots` eligible units outside it.
    `what` names the units and items in error messages, e.g. "subjects (healthy/tumorous slices)".
    """
    order = sorted(units, key=lambda u: rank_key(test_seed, "test-pool", u))
    pool: list[str] = []
    got_n = got_a = 0
    for unit in order:
        if got_n >= n_normal and got_a >= n_abnormal:
            break
        pool.append(unit)
        got_n += supply[unit][0]
        got_a += supply[unit][1]
    total_n = sum(s[0] for s in supply.values())
    total_a = sum(s[1] for s in supply.values())
    if got_n < n_normal or got_a < n_abnormal:
        raise DataError(
            f"not enough test data: {len(units)} usable {what} supply {total_n} normal and "
            f"{total_a} abnormal items, but {n_normal} normal and {n_abnormal} abnormal test items "
            "were requested; lower the test counts"
        )
    outside = len(eligible - set(pool))
    if outside < shots:
        raise DataError(
            f"not enough training data: the test pool needs {len(pool)} of {len(units)} usable "
            f"{what}, leaving {outside} eligible for training, fewer than shots={shots}; lower the "
            "test counts or the shots"
        )
    return pool


def select_loading(
    select: Callable[[set[str]], SelectionT],
    load: Callable[[SelectionT], set[str]],
) -> tuple[SelectionT, set[str]]:
    """Select, load, and reselect without the units that failed to load, until nothing fails.

    `select(bad)` returns a selection avoiding the `bad` units; `load(selection)` loads it and
    returns the units that failed (having reported them, or raised under strict=True). Because
    selections rank by hash, dropping a bad unit leaves the rest of the ranking intact. Returns
    the final selection and the failed units.
    """
    bad: set[str] = set()
    while True:
        selection = select(bad)
        failed = load(selection)
        if not failed:
            return selection, bad
        bad |= failed


def sample_item(sample: Sample, index: int) -> dict[str, object]:
    """Evaluation item dict of a Sample: one item of an `EvalBatch`, unstacked."""
    return {
        "image": normalize(to_rgb(sample.image)),  # (3, S, S)
        "gt_mask": torch.from_numpy(np.ascontiguousarray(sample.gt_mask[None])),  # (1, S, S)
        "foreground": torch.from_numpy(np.ascontiguousarray(sample.foreground[None])),
        "has_mask": bool(sample.has_mask),
        "label": int(sample.label),
        "subject": sample.subject,
        "slice": int(sample.slice),
        "index": index,
    }


class EvalDataset(Dataset):
    """Validation / test items from in-memory samples (already at the network resolution)."""

    def __init__(self, samples: Sequence[Sample]) -> None:
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, object]:
        return sample_item(self.samples[index], index)


class TrainSampler(Sampler[int]):
    """Yields the global indices epoch * length + i, i < length (Lightning calls set_epoch)."""

    def __init__(self, length: int) -> None:
        self.length = length
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        start = self.epoch * self.length
        return iter(range(start, start + self.length))

    def __len__(self) -> int:
        return self.length


class TrainDataset(Dataset):
    """Augmented copies of the K training samples with a synthetic lesion each.

    Global index g -> sample g % K; augmentation and lesion synthesis are seeded from
    `np.random.default_rng([seed, g])` only. With `pool` > 0, g is first taken modulo `pool`: the
    stream cycles over `pool` distinct items, each marked with its `draw` (= that g), so that the
    model can keep their frozen backbone features (`data.train_pool`).
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        length: int,
        seed: int,
        augmentation: TrainAugmentation,
        synthesizer: LesionSynthesizer,
        pool: int = 0,
    ) -> None:
        self.samples = list(samples)
        self.length = length
        self.seed = seed
        self.augmentation = augmentation
        self.synthesizer = synthesizer
        self.pool = pool

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, g: int) -> dict[str, object]:
        if self.pool:  # the stream repeats its first `pool` items: g and g + pool are the same
            g = g % self.pool
        k = g % len(self.samples)
        sample = self.samples[k]
        rng = np.random.default_rng([self.seed, g])
        image, masks = self.augmentation(
            to_rgb(sample.image), {"foreground": sample.foreground}, seed=int(rng.integers(2**31))
        )
        foreground = masks["foreground"].astype(bool)  # (S, S)
        lesion_image, lesion_mask = self.synthesizer(image, foreground, rng)
        item: dict[str, object] = {
            "image": normalize(image),  # (3, S, S) x_n
            "lesion_image": normalize(lesion_image),  # (3, S, S) x_p
            "lesion_mask": torch.from_numpy(lesion_mask[None].astype(np.float32)),  # (1, S, S)
            "foreground": torch.from_numpy(np.ascontiguousarray(foreground[None])),
            "index": k,
        }
        if self.pool:
            item["draw"] = g
        return item


class FewShotDataModule(L.LightningDataModule):
    """Base of the few-shot data modules: datasets, loaders, validation split, anchor images."""

    dataset_name = "base"
    input_kind = "subject"  # one input of the data root: a BraTS subject, a ChestX-ray8 image

    def __init__(
        self,
        shots: int,
        seed: int,
        test_seed: int,
        image_size: int,
        batch_size: int,
        steps_per_epoch: int,
        num_workers: int,
        textures: str | None,
        lesion_min_fraction: float,
        intensity_lesions: float = 0.0,
        train_pool: int = 0,
    ) -> None:
        super().__init__()
        check_image_size(image_size)
        check_arguments(
            {
                "train_pool": (train_pool, "[0, inf)"),
                "shots": (shots, "[1, inf)"),
                "seed": (seed, "[0, inf)"),  # numpy's default_rng([seed, g]): no negative seeds
                "test_seed": (test_seed, "[0, inf)"),
                "batch_size": (batch_size, "[1, inf)"),
                "steps_per_epoch": (steps_per_epoch, "[1, inf)"),
                "num_workers": (num_workers, "[0, inf)"),
            }
        )
        self.shots = int(shots)
        self.seed = int(seed)
        self.test_seed = int(test_seed)
        self.image_size = int(image_size)
        self.batch_size = int(batch_size)
        self.steps_per_epoch = int(steps_per_epoch)
        self.num_workers = int(num_workers)
        self.train_pool = int(train_pool)
        self.augmentation = TrainAugmentation(self.image_size)
        self.synthesizer = LesionSynthesizer(
            textures=textures,
            min_fraction=lesion_min_fraction,
            intensity_lesions=intensity_lesions,
        )
        self._split: Split | None = None
        self._val_samples: list[Sample] = []
        self.skipped: dict[str, str] = {}  # bad inputs left out of the split -> the reason

    def _skip(self, name: str, err: DataError, strict: bool) -> None:
        """Leave out the bad input `name`: its DataError under `strict`, else a warning, and the
        reason recorded in `skipped`."""
        if strict:
            raise err
        log.warning("skipping %s %s: %s", self.dataset_name, self.input_kind, err)
        self.skipped[name] = str(err)

    @property
    def skipped_key(self) -> str:
        """The key of the split's info (and of metrics.json) holding `skipped`."""
        return f"skipped_{self.input_kind}s"

    # --------------------------------------------------------------- subclass interface
    @abstractmethod
    def _build_split(self) -> Split:
        """Read the data root and return the split (training, validation candidates, test)."""

    @abstractmethod
    def preprocessing(self) -> dict[str, object]:
        """Everything needed to preprocess new data the same way at predict time."""

    # --------------------------------------------------------------- setup
    def setup(self, stage: str | None = None) -> None:
        """Build the split once (every stage uses the same one); reads the data root."""
        if self._split is not None:
            return
        split = self._build_split()
        if len(split.train) != self.shots:  # a subclass bug, not bad data
            raise RuntimeError(f"expected {self.shots} training samples, got {len(split.train)}")
        self._split = split
        self._val_samples = self._validation_samples(split)
        log.info(
            "%s: %d training subjects %s, %d validation items, %d test items %s, %d %ss skipped",
            self.dataset_name,
            len(split.train),
            split.train_subjects,
            len(self._val_samples),
            len(split.test),
            split.info,
            len(self.skipped),
            self.input_kind,
        )
        split.info[self.skipped_key] = dict(sorted(self.skipped.items()))

    @property
    def split(self) -> Split:
        if self._split is None:
            self.setup()
        assert self._split is not None
        return self._split

    @property
    def train_subjects(self) -> list[str]:
        return list(self.split.train_subjects)

    @property
    def test_subjects(self) -> list[str]:
        return list(self.split.test_subjects)

    def _validation_samples(self, split: Split) -> list[Sample]:
        """Each healthy validation image once as is (label 0) and once with a synthetic lesion."""
        normals: list[Sample] = []
        for k, (train, others) in enumerate(zip(split.train, split.val_normal, strict=True)):
            if others:
                normals.extend(others)
                continue
            # No other healthy image of this subject: augmented copies of its training image.
            for c in range(VAL_COPIES_WITHOUT_OTHERS):
                seed = int(np.random.default_rng([self.seed, 7411, k, c]).integers(2**31))
                image, masks = self.augmentation(
                    to_rgb(train.image), {"foreground": train.foreground}, seed=seed
                )
                fg = masks["foreground"].astype(bool)
                normals.append(
                    Sample(image, fg, np.zeros_like(fg), True, 0, train.subject, train.slice)
                )
        items: list[Sample] = []
        for j, normal in enumerate(normals):
            empty = np.zeros(normal.foreground.shape, dtype=bool)
            items.append(
                Sample(
                    normal.image, normal.foreground, empty, True, 0, normal.subject, normal.slice
                )
            )
            rng = np.random.default_rng([self.seed, 104729, j])
            lesion_image, lesion_mask = self.synthesizer(
                to_rgb(normal.image), normal.foreground, rng
            )
            items.append(
                Sample(
                    lesion_image.astype(np.float32),
                    normal.foreground,
                    lesion_mask.astype(bool),
                    True,
                    1,
                    normal.subject,
                    normal.slice,
                )
            )
        return items

    # --------------------------------------------------------------- datasets and loaders
    def train_dataset(self) -> TrainDataset:
        return TrainDataset(
            self.split.train,
            self.steps_per_epoch * self.batch_size,
            self.seed,
            self.augmentation,
            self.synthesizer,
            self.train_pool,
        )

    def val_dataset(self) -> EvalDataset:
        if self._split is None:
            self.setup()
        return EvalDataset(self._val_samples)

    def test_dataset(self) -> EvalDataset:
        return EvalDataset(self.split.test)

    def _loader(
        self, dataset: Dataset, collate: Callable, sampler: Sampler | None = None
    ) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            shuffle=False,
            collate_fn=collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        dataset = self.train_dataset()
        return self._loader(dataset, TrainBatch.collate, TrainSampler(len(dataset)))

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset(), EvalBatch.collate)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset(), EvalBatch.collate)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

    # --------------------------------------------------------------- anchor bank input
    def anchor_images(self, copies: int, seed: int = 0) -> ImageBatch:
        """K raw training images, then `copies` augmented copies of each (copy-major order).

        Returns `image` (N, 3, S, S) normalised and `foreground` (N, 1, S, S) bool, N = K*(1+copies);
        item K + c*K + k is copy c of training image k, seeded from (seed, c, k).
        """
        train = self.split.train
        images = [to_rgb(s.image) for s in train]
        foregrounds = [s.foreground for s in train]
        for c in range(copies):
            for k, sample in enumerate(train):
                aug_seed = int(np.random.default_rng([seed, 5381, c, k]).integers(2**31))
                image, masks = self.augmentation(
                    to_rgb(sample.image), {"foreground": sample.foreground}, seed=aug_seed
                )
                images.append(image)
                foregrounds.append(masks["foreground"].astype(bool))
        return ImageBatch(
            image=torch.stack([normalize(im) for im in images]),
            foreground=torch.from_numpy(np.stack(foregrounds)[:, None]),
        )
