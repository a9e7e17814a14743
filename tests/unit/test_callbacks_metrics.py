"""AnomalyMetrics on hand-made batches (no real model).

The hooks are called directly with a stand-in trainer and module, except in the DDP test, which
runs a real two-process (gloo, forked) Trainer on a tiny module.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from callbacks import AnomalyMetrics
from callbacks.metrics import JSON_KEYS
from pathoscope.batches import EvalBatch
from pathoscope.metrics import best_dice, image_auroc, pixel_auroc, pro_score
from pathoscope.postprocess import ImageThreshold


class FakeModule:
    """What AnomalyMetrics needs of a LightningModule: threshold, tau_quantile, log_dict."""

    def __init__(self, tau_quantile: float = 0.95, tau: float = float("nan")) -> None:
        self.threshold = ImageThreshold()
        self.threshold.tau.fill_(tau)
        self.tau = self.threshold.tau
        self.tau_quantile = tau_quantile
        self.weights_tag = "random"
        self.logged: dict[str, float] = {}

    def log_dict(self, values: dict[str, float], **kwargs: Any) -> None:
        self.logged.update(values)


def fake_trainer(out_dir: Path, callbacks: list[Any] = (), **kw: Any) -> SimpleNamespace:
    return SimpleNamespace(
        sanity_checking=False,
        world_size=1,
        is_global_zero=True,
        log_dir=str(out_dir),
        default_root_dir=str(out_dir),
        loggers=[],
        callbacks=list(callbacks),
        **kw,
    )


def make_batch(
    maps: np.ndarray,
    scores: list[float],
    labels: list[int],
    gt_masks: np.ndarray,
    index: list[int],
    has_mask: list[bool] | None = None,
    foreground: np.ndarray | None = None,
) -> tuple[dict[str, torch.Tensor], EvalBatch]:
    """(outputs, batch) as the model's step and `EvalBatch.collate` give them."""
    b, h, w = maps.shape
    outputs = {
        "score": torch.tensor(scores, dtype=torch.float32),
        "anomaly_map": torch.from_numpy(maps.astype(np.float32))[:, None],
    }
    batch = EvalBatch(
        image=torch.zeros(b, 3, h, w),
        gt_mask=torch.from_numpy(gt_masks.astype(bool))[:, None],
        foreground=torch.from_numpy(np.ones((b, h, w), bool) if foreground is None else foreground)[
            :, None
        ],
        has_mask=torch.tensor([True] * b if has_mask is None else has_mask),
        label=torch.tensor(labels),
        subject=[f"subj{i:03d}" for i in index],
        slice=torch.tensor([60 + i for i in index]),
        index=torch.tensor(index),
    )
    return outputs, batch


def feed(cb: AnomalyMetrics, trainer: Any, module: Any, stage: str, batches: list) -> None:
    getattr(cb, f"on_{stage}_epoch_start")(trainer, module)
    for i, (outputs, batch) in enumerate(batches):
        getattr(cb, f"on_{stage}_batch_end")(trainer, module, outputs, batch, i)
    getattr(cb, f"on_{stage}_epoch_end")(trainer, module)


def random_set(n: int, size: int, seed: int) -> dict[str, np.ndarray]:
    """n items: maps in [0, 1), label 1 items with a blob gt_mask, a disc foreground."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    yy, xx = np.mgrid[:size, :size]
    gt = np.zeros((n, size, size), bool)
    for i in np.flatnonzero(labels):
        cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
        gt[i] = (yy - cy) ** 2 + (xx - cx) ** 2 <= (size // 6) ** 2
    maps = (rng.random((n, size, size)) * 0.6 + 0.4 * gt).astype(np.float32)
    fg = np.broadcast_to((yy - size / 2) ** 2 + (xx - size / 2) ** 2 <= (size / 2.2) ** 2, gt.shape)
    scores = rng.random(n).astype(np.float32) + 0.3 * labels
    return {"maps": maps, "gt": gt, "labels": labels, "scores": scores, "fg": np.array(fg)}


def test_memory_is_set_by_eval_size_and_item_count_not_input_resolution(tmp_path: Path) -> None:
    n, eval_size = 6, 32
    held = {}
    for size in (256, 64):
        cb = AnomalyMetrics(eval_size=eval_size)
        trainer, module = fake_trainer(tmp_path), FakeModule()
        cb.on_test_epoch_start(trainer, module)
        # Left half 1, right half 0: the resized map must keep that layout.
        maps = np.zeros((n, size, size), np.float32)
        maps[:, :, : size // 2] = 1.0
        gt = np.zeros((n, size, size), bool)
        gt[:, : size // 2] = True
        for start in (0, 3):
            idx = list(range(start, start + 3))
            outputs, batch = make_batch(maps[:3], [0.5] * 3, [1, 0, 1], gt[:3], idx)
            cb.on_test_batch_end(trainer, module, outputs, batch, start)
        held[size] = cb.buffer_nbytes
        stored = np.concatenate(cb._buffers["maps"])
        assert stored.shape == (n, eval_size, eval_size) and stored.dtype == np.float32
        np.testing.assert_allclose(stored[:, :, :12], 1.0)
        np.testing.assert_allclose(stored[:, :, 20:], 0.0)
        gt_stored = np.concatenate(cb._buffers["gt_masks"])
        assert (
            gt_stored.dtype == np.bool_ and gt_stored[:, :16].all() and not gt_stored[:, 16:].any()
        )
    pixels = n * eval_size * eval_size
    per_item = (
        4 + 8 + 1 + 8 + 8 + 4 * len("subj000")
    )  # score, label, has_mask, index, slice, subject
    assert held[256] == held[64] == pixels * (4 + 1 + 1) + n * per_item


def test_eval_size_none_keeps_the_input_size(tmp_path: Path) -> None:
    data = random_set(4, 24, seed=1)
    cb = AnomalyMetrics()
    trainer, module = fake_trainer(tmp_path), FakeModule(tau=0.5)
    batch = make_batch(
        data["maps"], data["scores"].tolist(), data["labels"].tolist(), data["gt"], [0, 1, 2, 3]
    )
    feed(cb, trainer, module, "test", [batch])
    assert cb.results["test"].maps.shape == (4, 24, 24)
    np.testing.assert_array_equal(cb.results["test"].maps, data["maps"])
    assert json.loads((tmp_path / "metrics.json").read_text())["eval_size"] == 24


def test_duplicated_indices_count_once(tmp_path: Path) -> None:
    data = random_set(6, 16, seed=2)
    # As DistributedSampler pads: items 0..5, then 0 and 1 again (0 is a normal item with a high score).
    data["scores"][0] = 5.0
    order = [[0, 1, 2], [3, 4, 5], [0, 1]]
    batches = [
        make_batch(
            data["maps"][idx],
            data["scores"][idx].tolist(),
            data["labels"][idx].tolist(),
            data["gt"][idx],
            idx,
        )
        for idx in order
    ]
    cb = AnomalyMetrics(save_predictions=True)
    trainer, module = fake_trainer(tmp_path), FakeModule(tau=0.5)
    feed(cb, trainer, module, "test", batches)

    np.testing.assert_array_equal(cb.results["test"].index, np.arange(6))
    report = json.loads((tmp_path / "metrics.json").read_text())
    unique_auroc = image_auroc(data["scores"], data["labels"])
    all_rows = np.concatenate(order)
    assert image_auroc(data["scores"][all_rows], data["labels"][all_rows]) != unique_auroc
    assert report["image_auroc"] == pytest.approx(unique_auroc, abs=1e-12)
    assert report["pixel_auroc"] == pytest.approx(pixel_auroc(data["maps"], data["gt"]), abs=1e-12)
    assert report["pro"] == pytest.approx(pro_score(data["maps"], data["gt"]), abs=1e-12)
    assert report["pro_fg"] == pytest.approx(
        pro_score(data["maps"], data["gt"], foreground=np.ones_like(data["gt"])), abs=1e-12
    )
    assert report["dice_best"] == pytest.approx(best_dice(data["maps"], data["gt"])[0], abs=1e-12)
    positive = data["labels"] == 1
    assert report["sensitivity"] == pytest.approx(np.mean(data["scores"][positive] >= 0.5))
    assert report["specificity"] == pytest.approx(np.mean(data["scores"][~positive] < 0.5))
    with np.load(tmp_path / "predictions.npz") as npz:
        np.testing.assert_array_equal(npz["index"], np.arange(6))
        np.testing.assert_array_equal(npz["maps"], data["maps"])
        np.testing.assert_array_equal(npz["subject"], [f"subj{i:03d}" for i in range(6)])
        np.testing.assert_array_equal(npz["slice"], 60 + np.arange(6))
        assert npz["maps"].dtype == np.float32


def test_tau_is_the_validation_normals_quantile_and_the_test_uses_it(tmp_path: Path) -> None:
    size = 4
    zeros = np.zeros((6, size, size))
    # Validation: normals 0.1, 0.4, 0.2, 0.3; 0.9 and 0.05 are anomalous and must not count.
    val_scores = [0.1, 0.9, 0.4, 0.2, 0.05, 0.3]
    val_labels = [0, 1, 0, 0, 1, 0]
    val_gt = np.zeros((6, size, size), bool)
    val_gt[[1, 4], 0, 0] = True
    val_batch = make_batch(zeros, val_scores, val_labels, val_gt, list(range(6)))
    cb = AnomalyMetrics()
    trainer, module = fake_trainer(tmp_path), FakeModule(tau_quantile=0.9)
    feed(cb, trainer, module, "validation", [val_batch])
    # 0.9 quantile of (0.1, 0.2, 0.3, 0.4): position 0.9 * 3 = 2.7 -> 0.3 + 0.7 * 0.1 = 0.37.
    assert module.tau.dtype == torch.float32
    assert float(module.tau) == pytest.approx(0.37, abs=1e-7)
    assert module.logged["val/tau"] == float(module.tau)
    assert "val/image_auroc" in module.logged
    assert not (tmp_path / "metrics.json").exists()  # validation only logs

    # Test at the stored tau: normals 0.1, 0.5 -> specificity 1/2; anomalous 0.36, 0.38, 0.8
    # -> sensitivity 2/3. Item 2's map is 0.9 on its 2x2 gt_mask and on one more pixel: at tau,
    # TP 4, FP 1, FN 0 -> Dice 8/9, IoU 4/5 (pooled; the other maps are 0 < tau).
    maps = np.zeros((5, size, size))
    gt = np.zeros((5, size, size), bool)
    gt[2, :2, :2] = True
    maps[2, :2, :2] = 0.9
    maps[2, 0, 2] = 0.9
    test_batch = make_batch(maps, [0.1, 0.5, 0.36, 0.38, 0.8], [0, 0, 1, 1, 1], gt, list(range(5)))
    feed(cb, trainer, module, "test", [test_batch])
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert set(report) == set(JSON_KEYS)
    assert report["tau"] == float(module.tau)
    assert report["specificity"] == pytest.approx(0.5)
    assert report["sensitivity"] == pytest.approx(2 / 3)
    assert report["dice_at_tau"] == pytest.approx(8 / 9)
    assert report["iou_at_tau"] == pytest.approx(4 / 5)
    assert report["checkpoint"] == "last" and report["weights"] == "random"
    assert report["eval_size"] == size
    assert module.logged["test/dice_at_tau"] == pytest.approx(8 / 9)


def test_pixel_metrics_null_without_pixel_masks(tmp_path: Path) -> None:
    data = random_set(6, 16, seed=3)
    # Anomalous items carry a gt_mask but has_mask False (e.g. an image label only): ignored.
    batch = make_batch(
        data["maps"],
        data["scores"].tolist(),
        data["labels"].tolist(),
        data["gt"],
        list(range(6)),
        has_mask=[False] * 6,
    )
    cb = AnomalyMetrics()
    trainer, module = fake_trainer(tmp_path), FakeModule(tau=0.5)
    feed(cb, trainer, module, "test", [batch])
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert set(report) == set(JSON_KEYS)
    for key in (
        "pixel_auroc",
        "pro",
        "dice_best",
        "pixel_auroc_fg",
        "pro_fg",
        "dice_at_tau",
        "iou_at_tau",
    ):
        assert report[key] is None, key
        assert f"test/{key}" not in module.logged
    assert report["image_auroc"] == pytest.approx(image_auroc(data["scores"], data["labels"]))
    assert report["sensitivity"] is not None and report["specificity"] is not None


def test_pixel_metrics_use_masked_and_normal_items_only(tmp_path: Path) -> None:
    data = random_set(8, 16, seed=4)
    has_mask = [True, True, True, False, True, False, True, True]  # items 3, 5: anomalous, no mask
    fg = data["fg"]
    batch = make_batch(
        data["maps"],
        data["scores"].tolist(),
        data["labels"].tolist(),
        data["gt"],
        list(range(8)),
        has_mask=has_mask,
        foreground=fg,
    )
    cb = AnomalyMetrics()
    trainer, module = fake_trainer(tmp_path), FakeModule(tau=0.5)
    feed(cb, trainer, module, "test", [batch])
    keep = np.array([0, 1, 2, 4, 6, 7])
    maps, gt = data["maps"][keep], data["gt"][keep]
    metrics = cb.metrics["test"]
    assert metrics["pixel_auroc"] == pytest.approx(pixel_auroc(maps, gt), abs=1e-12)
    assert metrics["pixel_auroc_fg"] == pytest.approx(pixel_auroc(maps, gt, fg[keep]), abs=1e-12)
    assert metrics["pro_fg"] == pytest.approx(pro_score(maps, gt, foreground=fg[keep]), abs=1e-12)
    assert metrics["pixel_auroc"] != pytest.approx(pixel_auroc(data["maps"], data["gt"]), abs=1e-9)
    # Image metrics use every item.
    assert metrics["image_auroc"] == pytest.approx(image_auroc(data["scores"], data["labels"]))


def test_test_without_tau_warns_and_leaves_threshold_values_null(tmp_path: Path) -> None:
    data = random_set(4, 16, seed=5)
    batch = make_batch(
        data["maps"], data["scores"].tolist(), data["labels"].tolist(), data["gt"], [0, 1, 2, 3]
    )
    cb = AnomalyMetrics()
    trainer, module = fake_trainer(tmp_path), FakeModule()  # tau NaN: no validation ran
    with pytest.warns(UserWarning, match="tau is unset"):
        feed(cb, trainer, module, "test", [batch])
    report = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("tau", "sensitivity", "specificity", "dice_at_tau", "iou_at_tau"):
        assert report[key] is None, key
    assert report["pixel_auroc"] is not None and report["pro"] is not None


def test_interrupted_writes_leave_whole_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C while predictions.npz is written: the earlier run's file stays whole (it is
    replaced only by a complete one) and nothing half-written is left; metrics.json was
    replaced whole."""
    data = random_set(4, 16, seed=5)
    batch = make_batch(
        data["maps"], data["scores"].tolist(), data["labels"].tolist(), data["gt"], [0, 1, 2, 3]
    )
    (tmp_path / "metrics.json").write_text('{"earlier": true}\n')
    (tmp_path / "predictions.npz").write_bytes(b"earlier run")

    def interrupted_savez(file: Any, **arrays: Any) -> None:
        Path(file).write_bytes(b"half an npz")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", interrupted_savez)
    cb = AnomalyMetrics(save_predictions=True)
    with pytest.raises(KeyboardInterrupt), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tau is NaN here
        feed(cb, fake_trainer(tmp_path), FakeModule(), "test", [batch])
    assert (tmp_path / "predictions.npz").read_bytes() == b"earlier run"
    assert "image_auroc" in json.loads((tmp_path / "metrics.json").read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "predictions.npz"]


def test_sanity_check_batches_are_ignored(tmp_path: Path) -> None:
    data = random_set(4, 16, seed=6)
    batch = make_batch(
        data["maps"], data["scores"].tolist(), data["labels"].tolist(), data["gt"], [0, 1, 2, 3]
    )
    cb = AnomalyMetrics()
    trainer, module = fake_trainer(tmp_path), FakeModule(tau_quantile=0.5)
    trainer.sanity_checking = True
    feed(cb, trainer, module, "validation", [batch])
    assert np.isnan(float(module.tau)) and not module.logged and cb.buffer_nbytes == 0


def test_bad_step_output_raises_a_clear_error(tmp_path: Path) -> None:
    data = random_set(2, 8, seed=7)
    _, batch = make_batch(data["maps"], [0.1, 0.2], [0, 1], data["gt"], [0, 1])
    cb = AnomalyMetrics()
    with pytest.raises(ValueError, match="must return a dict with 'score'"):
        cb.on_test_batch_end(fake_trainer(tmp_path), FakeModule(), torch.zeros(2), batch, 0)


def test_a_dict_batch_raises_a_clear_error(tmp_path: Path) -> None:
    """The metrics bind to EvalBatch's fields: a plain dict (the former item dicts) is refused."""
    data = random_set(2, 8, seed=7)
    outputs, batch = make_batch(data["maps"], [0.1, 0.2], [0, 1], data["gt"], [0, 1])
    as_dict = dict(vars(batch))
    with pytest.raises(ValueError, match="must be a pathoscope.batches.EvalBatch"):
        AnomalyMetrics().on_test_batch_end(
            fake_trainer(tmp_path), FakeModule(), outputs, as_dict, 0
        )


# -- DDP --------------------------------------------------------------------------------------------
class DDPItems(Dataset):
    """7 items (odd, so DistributedSampler pads 2 ranks with a repeat of item 0)."""

    def __len__(self) -> int:
        return 7

    def __getitem__(self, i: int) -> dict[str, Any]:
        return ddp_item(i)


def ddp_item(i: int) -> dict[str, Any]:
    rng = np.random.default_rng(i)
    gt = np.zeros((1, 8, 8), bool)
    if i % 2:
        gt[0, 2:5, 3:6] = True
    return {
        "image": torch.from_numpy(rng.random((3, 8, 8)).astype(np.float32) + gt),
        "gt_mask": torch.from_numpy(gt),
        "foreground": torch.ones(1, 8, 8, dtype=torch.bool),
        "has_mask": True,
        "label": i % 2,
        "subject": f"s{i}",
        "slice": 10 * i,
        "index": i,
    }


class UnevenRanks(torch.utils.data.Sampler[int]):
    """Rank 0 gets items 0-3, rank 1 items 4-6: different item counts per rank."""

    def _mine(self) -> list[int]:
        return [0, 1, 2, 3] if torch.distributed.get_rank() == 0 else [4, 5, 6]

    def __iter__(self) -> Any:
        return iter(self._mine())

    def __len__(self) -> int:
        return len(self._mine())


class ImageAsMap(L.LightningModule):
    """anomaly_map = the first image channel; score = its max. Records the indices it saw."""

    def __init__(self, record_dir: str, tau: float = 0.8, tau_quantile: float = 0.95) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.threshold = ImageThreshold()
        self.threshold.set(tau)
        self.weights_tag = "random"

    def test_step(self, batch: EvalBatch, batch_idx: int) -> dict[str, torch.Tensor]:
        seen = Path(self.hparams.record_dir) / f"seen_rank{self.global_rank}.txt"
        with seen.open("a") as f:
            f.writelines(f"{int(i)}\n" for i in batch.index)
        m = batch.image[:, :1]
        return {"score": m.flatten(1).amax(1), "anomaly_map": m}


@pytest.mark.parametrize("uneven", [False, True], ids=["distributed_sampler", "uneven_ranks"])
def test_ddp_gathers_every_rank_and_drops_padding(tmp_path: Path, uneven: bool) -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        pytest.skip("ddp_fork cannot start workers once CUDA is initialised in this process")
    cb = AnomalyMetrics(save_predictions=True, output_dir=str(tmp_path))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_fork",  # no re-import in the workers
        use_distributed_sampler=not uneven,
        callbacks=[cb],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    sampler = UnevenRanks() if uneven else None
    loader = torch.utils.data.DataLoader(
        DDPItems(), batch_size=2, sampler=sampler, collate_fn=EvalBatch.collate
    )
    trainer.test(ImageAsMap(str(tmp_path)), dataloaders=loader, verbose=False)

    seen = [
        sorted(int(v) for v in (tmp_path / f"seen_rank{r}.txt").read_text().split()) for r in (0, 1)
    ]
    if uneven:
        assert seen == [[0, 1, 2, 3], [4, 5, 6]]
    else:  # DistributedSampler: [0..6, 0] split rank-wise, so item 0 is seen twice
        assert seen == [[0, 2, 4, 6], [0, 1, 3, 5]]
    items = [ddp_item(i) for i in range(7)]
    maps = np.stack([it["image"][0].numpy() for it in items])
    gt = np.stack([it["gt_mask"][0].numpy() for it in items])
    labels = np.array([it["label"] for it in items])
    scores = maps.reshape(7, -1).max(1)
    with np.load(tmp_path / "predictions.npz") as npz:
        np.testing.assert_array_equal(npz["index"], np.arange(7))
        np.testing.assert_array_equal(npz["subject"], [f"s{i}" for i in range(7)])
        np.testing.assert_array_equal(npz["slice"], 10 * np.arange(7))
        np.testing.assert_array_equal(npz["maps"], maps)
        np.testing.assert_array_equal(npz["gt_masks"], gt)
        np.testing.assert_array_equal(npz["labels"], labels)
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["image_auroc"] == pytest.approx(image_auroc(scores, labels), abs=1e-12)
    assert report["pixel_auroc"] == pytest.approx(pixel_auroc(maps, gt), abs=1e-12)
    assert report["sensitivity"] == pytest.approx(np.mean(scores[labels == 1] >= np.float32(0.8)))
