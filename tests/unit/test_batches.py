"""The typed batches of pathoscope.batches: what the data modules' loaders yield (fields, dtypes,
shapes as their comments say), stacked exactly as torch's default collate stacks the item dicts,
moved to a device by Lightning as the same class, and the transitional dict view."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities.data import extract_batch_size
from torch.utils.data import default_collate

import pathoscope.batches as batches
from data_modules.brats import BraTSDataModule
from pathoscope.batches import EvalBatch, ImageBatch, TrainBatch


@pytest.fixture(scope="module")
def dm(brats_root: Path) -> BraTSDataModule:
    return BraTSDataModule(
        str(brats_root), shots=2, image_size=64, n_test_healthy=3, n_test_tumorous=3, batch_size=4
    )


def test_train_loader_yields_a_train_batch_as_documented(dm: BraTSDataModule) -> None:
    batch = next(iter(dm.train_dataloader()))
    assert type(batch) is TrainBatch and batch.size == 4
    assert batch.image.shape == batch.lesion_image.shape == (4, 3, 64, 64)
    assert batch.image.dtype == batch.lesion_image.dtype == torch.float32
    assert batch.lesion_mask.shape == (4, 1, 64, 64) and batch.lesion_mask.dtype == torch.float32
    assert batch.foreground.shape == (4, 1, 64, 64) and batch.foreground.dtype == torch.bool
    assert batch.index.tolist() == [0, 1, 0, 1] and batch.draw is None  # g mod K; no train_pool
    items = [dm.train_dataset()[g] for g in range(4)]
    for name, stacked in default_collate(items).items():  # the same tensors as the dicts gave
        assert torch.equal(getattr(batch, name), stacked), name


def test_eval_loaders_yield_an_eval_batch_as_documented(dm: BraTSDataModule) -> None:
    for loader in (dm.val_dataloader(), dm.test_dataloader()):
        batch = next(iter(loader))
        b = batch.size
        assert type(batch) is EvalBatch and b == 4
        assert batch.image.shape == (b, 3, 64, 64) and batch.image.dtype == torch.float32
        for mask in (batch.gt_mask, batch.foreground):
            assert mask.shape == (b, 1, 64, 64) and mask.dtype == torch.bool
        assert batch.has_mask.dtype == torch.bool and batch.has_mask.shape == (b,)
        for ints in (batch.label, batch.slice, batch.index):
            assert ints.dtype == torch.int64 and ints.shape == (b,)
        assert batch.index.tolist() == [0, 1, 2, 3]
        assert len(batch.subject) == b and all(isinstance(s, str) for s in batch.subject)


def test_anchor_images_are_an_image_batch(dm: BraTSDataModule) -> None:
    batch = dm.anchor_images(copies=1)
    assert type(batch) is ImageBatch and batch.size == 4  # K raw + K augmented
    assert batch.image.shape == (4, 3, 64, 64) and batch.foreground.shape == (4, 1, 64, 64)


def _train_batch(draw: torch.Tensor | None = None) -> TrainBatch:
    return TrainBatch(
        image=torch.zeros(2, 3, 8, 8),
        foreground=torch.ones(2, 1, 8, 8, dtype=torch.bool),
        lesion_image=torch.ones(2, 3, 8, 8),
        lesion_mask=torch.zeros(2, 1, 8, 8),
        index=torch.tensor([0, 1]),
        draw=draw,
    )


def test_lightning_moves_a_batch_as_the_same_class() -> None:
    batch = _train_batch(torch.tensor([3, 4]))
    moved = move_data_to_device(batch, torch.device("meta"))
    assert type(moved) is TrainBatch and moved is not batch
    assert moved.image.device.type == moved.draw.device.type == "meta"
    assert batch.image.device.type == "cpu"  # the original is left alone


def test_dict_view_answers_fields_and_treats_none_as_absent() -> None:
    batch = _train_batch()
    assert batch["lesion_image"] is batch.lesion_image
    assert "image" in batch and "draw" not in batch and "gt_mask" not in batch
    assert batch.get("draw") is None and batch.get("draw", 7) == 7
    assert batch.keys() == ["image", "foreground", "lesion_image", "lesion_mask", "index"]
    with pytest.raises(KeyError):
        batch["gt_mask"]
    pooled = _train_batch(torch.tensor([3, 4]))
    assert "draw" in pooled and pooled.get("draw").tolist() == [3, 4]


def test_every_field_documents_its_shape() -> None:
    """The field comments are the contract: each field's line names its shape, (B, ...) or B."""
    lines = inspect.getsource(batches).splitlines()
    seen = set()
    for node in ast.walk(ast.parse("\n".join(lines))):
        if isinstance(node, ast.ClassDef) and node.name in {
            "ImageBatch",
            "TrainBatch",
            "EvalBatch",
        }:
            for stmt in node.body:
                if isinstance(stmt, ast.AnnAssign):
                    comment = lines[stmt.lineno - 1].partition("#")[2]
                    assert "(B" in comment or "B names" in comment, stmt.target.id  # type: ignore[attr-defined]
                    seen.add(stmt.target.id)  # type: ignore[attr-defined]
    fields = {f for cls in (TrainBatch, EvalBatch) for f in cls.__dataclass_fields__}
    assert seen == fields


def test_a_batch_is_not_iterable() -> None:
    """No accidental iteration through __getitem__(0): Lightning must see a dataclass."""
    batch = _train_batch()
    with pytest.raises(TypeError):
        iter(batch)
    assert extract_batch_size(batch) == 2
