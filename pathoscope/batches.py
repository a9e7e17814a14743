"""The batch contract: what the data modules hand to the model and the callbacks.

Typed batches (anomalib's `Batch` dataclasses are the pattern): the data modules' loaders stack
their item dicts into a `TrainBatch` (`train_dataloader()`) or an `EvalBatch`
(`val_dataloader()`, `test_dataloader()`, `predict_dataloader()`), and the model and the
callbacks read named fields. The field comments below are the contract (docs/batch_contract.md
points here): B items per batch, S = `image_size` (256 by default, 128 in the demo).

Images are (3, S, S) float32, ImageNet-normalised (`data_modules.transforms.normalize`; mean
(0.485, 0.456, 0.406), std (0.229, 0.224, 0.225); `denormalize` undoes it): one grey channel
(one MRI modality, or a radiograph) copied to three, or three MRI modalities.

The classes live in the method package because the model consumes them and the method imports no
data code; the data modules import them from here. They are plain (mutable) dataclasses, since
Lightning's device transfer (`apply_to_collection`) rebuilds a batch field by field and refuses
frozen ones; nothing in the project assigns to a batch's fields.

Transitional dict view: `batch["image"]`, `batch.get("draw")` and `"draw" in batch` still answer
(the field, or the default / False where the field is None), for code written against the former
item dicts. The project's own consumers read attributes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

from torch import Tensor
from torch.utils.data import default_collate


class _DictView:
    """The transitional dict view of a batch dataclass (read-only).

    Not iterable (`__iter__ = None`): without it Python would iterate through `__getitem__(0)`,
    and Lightning's batch-size lookup would take the batch for an iterable of keys instead of a
    dataclass of tensors. `keys()` lists the fields that are set.
    """

    __iter__ = None

    def __getitem__(self, key: str) -> Any:
        if key not in _field_names(self):
            raise KeyError(key)
        return getattr(self, key)

    def __contains__(self, key: object) -> bool:
        return key in _field_names(self) and getattr(self, str(key)) is not None

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key) if key in self else default

    def keys(self) -> list[str]:
        """The names of the fields that are set (not None)."""
        return [name for name in _field_names(self) if name in self]


def _field_names(batch: object) -> tuple[str, ...]:
    return tuple(f.name for f in fields(batch))  # type: ignore[arg-type]


@dataclass
class ImageBatch(_DictView):
    """What scoring needs: images and their foreground (a predict batch, the base of the others)."""

    image: Tensor  # (B, 3, S, S) float32, normalised; training: x_n, augmented
    foreground: Tensor  # (B, 1, S, S) bool: body / brain (BraTS: voxels > 0; radiograph: all)

    @property
    def size(self) -> int:
        """B, the number of items."""
        return int(self.image.shape[0])


@dataclass
class TrainBatch(ImageBatch):
    """A training batch (`train_dataloader()`): augmented normal images with a synthetic lesion.

    `image` is `x_n`: a training image, augmented (random affine + elastic); `foreground` went
    through the same augmentation. An epoch is `steps_per_epoch` batches of `batch_size` items;
    item i of epoch e has the global index g = e * length + i, uses training image g mod K, and
    draws its augmentation and lesion from `numpy.random.default_rng([seed, g])` alone, so batches
    are the same whatever `num_workers` is. With `train_pool` = P > 0 the data module first takes
    g mod P: the stream cycles over P distinct items, and an item with the same `draw` holds the
    same pixels every time, so the model keeps the frozen backbone's features of each draw
    (`PathoScopeModel.pooled_features`). The lesion lies inside the foreground and covers at least
    one feature cell (8 x 8 pixels, `FEATURE_STRIDE`) to `lesion_min_fraction`.
    """

    lesion_image: Tensor  # (B, 3, S, S) float32: x_p, the same augmented image with one lesion
    lesion_mask: Tensor  # (B, 1, S, S) float32: M_p, 1 inside the synthetic lesion, 0 elsewhere
    index: Tensor  # (B,) int64: which of the K training images (0..K-1)
    draw: Tensor | None = None  # (B,) int64, only with train_pool P > 0: g mod P, the item's id

    @classmethod
    def collate(cls, items: Sequence[dict[str, Any]]) -> TrainBatch:
        """Stack training item dicts (`TrainDataset`) with torch's default collate."""
        return cls(**default_collate(list(items)))


@dataclass
class EvalBatch(ImageBatch):
    """A validation / test batch: images, not augmented, with their ground truth.

    Validation holds only the training subjects' other healthy slices (or augmented copies of the
    training image where there is none), each once as it is (label 0) and once with a synthetic
    lesion (label 1, its lesion mask as `gt_mask`). The test set never shares a subject with
    training.
    """

    gt_mask: Tensor  # (B, 1, S, S) bool: lesion (BraTS: seg > 0; ChestX-ray8: union of the boxes)
    has_mask: Tensor  # (B,) bool: gt_mask is pixel-level (False: abnormal radiograph, no box)
    label: Tensor  # (B,) int64: 1 = pathological, 0 = normal
    subject: list[str]  # B names: subject (BraTS) or image file (ChestX-ray8)
    slice: Tensor  # (B,) int64: axial slice index (BraTS), 0 for radiographs
    index: Tensor  # (B,) int64: position in the dataset (removes DDP's padding duplicates)

    @classmethod
    def collate(cls, items: Sequence[dict[str, Any]]) -> EvalBatch:
        """Stack evaluation item dicts (`EvalDataset`) with torch's default collate."""
        return cls(**default_collate(list(items)))
