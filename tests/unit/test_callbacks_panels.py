"""AnomalyPanels: the documented selection, the files, panels.json and the W&B images, on
hand-made predictions (the helpers of test_callbacks_metrics stand in for the trainer)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from lightning.pytorch.loggers import WandbLogger
from PIL import Image
from scipy import ndimage
from test_callbacks_metrics import FakeModule, fake_trainer, feed, make_batch, random_set
from torch.utils.data import Dataset

from callbacks import AnomalyMetrics, AnomalyPanels
from callbacks.panels import OVERVIEW_TILE, select_panels
from callbacks.visualization import GT_COLOR, TILE_GAP, TILES, TITLE_HEIGHT
from data_modules.transforms import normalize


def test_selection_by_hand() -> None:
    scores = np.array([0.9, 0.1, 0.5, 0.5, 0.2, 0.8, 0.3, 0.7, 0.6, 0.05])
    labels = np.array([0, 1, 0, 0, 1, 1, 0, 1, 0, 1])
    chosen = select_panels(scores, labels, false_alarms=3, misses=2, random=3, seed=0)
    # Normal rows by score: 0 (0.9), 8 (0.6), 2 and 3 (0.5, tie: the lower index first), 6.
    assert chosen["false_alarm"].tolist() == [0, 8, 2]
    # Pathological rows by score, lowest first: 9 (0.05), 1 (0.1), 4, 7, 5.
    assert chosen["miss"].tolist() == [9, 1]
    rest = {3, 4, 5, 6, 7}
    assert set(chosen["random"].tolist()) <= rest and len(chosen["random"]) == 3
    assert chosen["random"].tolist() == sorted(chosen["random"].tolist())
    again = select_panels(scores, labels, 3, 2, 3, seed=0)
    assert again["random"].tolist() == chosen["random"].tolist()
    # Fewer items than asked: every one, and nothing twice.
    small = select_panels(scores, labels, 10, 10, 10, seed=1)
    assert sorted(np.concatenate(list(small.values())).tolist()) == list(range(10))
    assert small["false_alarm"].tolist() == [0, 8, 2, 3, 6]


class ItemDataset(Dataset):
    """Evaluation items of random grey images; `index` is the position."""

    def __init__(self, n: int, size: int) -> None:
        self.n, self.size = n, size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        grey = np.random.default_rng(i).random((self.size, self.size, 1)).astype(np.float32) * 0.5
        return {"image": normalize(np.repeat(grey, 3, axis=2)), "index": i}


class RecordingWandbLogger(WandbLogger):
    def __init__(self) -> None:  # no wandb run
        self.calls: list[dict[str, Any]] = []

    def log_image(
        self, key: str, images: list[Any], step: int | None = None, **kwargs: Any
    ) -> None:
        self.calls.append({"key": key, "images": images, **kwargs})


def _tested(tmp_path: Path, n: int, size: int, panels: AnomalyPanels) -> SimpleNamespace:
    data = random_set(n, size, seed=8)
    metrics_cb = AnomalyMetrics(eval_size=size)
    loader = SimpleNamespace(dataset=ItemDataset(n, 2 * size))  # images at 2x the maps' size
    trainer = fake_trainer(tmp_path, [panels, metrics_cb], test_dataloaders=loader)
    trainer.loggers = [RecordingWandbLogger()]
    module = FakeModule(tau=0.7)
    panels.on_test_start(trainer, module)
    batch = make_batch(
        data["maps"], data["scores"].tolist(), data["labels"].tolist(), data["gt"], list(range(n))
    )
    feed(metrics_cb, trainer, module, "test", [batch])
    panels.on_test_end(trainer, module)
    return SimpleNamespace(data=data, trainer=trainer, wandb=trainer.loggers[0])


def test_panels_follow_the_selection_and_go_to_wandb(tmp_path: Path) -> None:
    n, size = 12, 16
    panels = AnomalyPanels(false_alarms=2, misses=2, random=3, seed=5)
    run = _tested(tmp_path, n, size, panels)
    data = run.data
    report = json.loads((tmp_path / "panels" / "panels.json").read_text())
    expected = select_panels(data["scores"], data["labels"], 2, 2, 3, seed=5)
    for group, rows in expected.items():
        listed = [p for p in report["panels"] if p["group"] == group]
        assert [p["index"] for p in listed] == rows.tolist()  # rows = indices here
        assert [p["rank"] for p in listed] == list(range(1, len(rows) + 1))
    assert report["tau"] == pytest.approx(0.7)
    assert report["value_range"] == pytest.approx([data["maps"].min(), data["maps"].max()])
    assert [tmp_path / "panels" / p["file"] for p in report["panels"]] == panels.paths

    # Each panel: title strip over 4 tiles of k * size px; the gt_mask outline on tiles 1-3.
    checked = 0
    for entry, path in zip(report["panels"], panels.paths, strict=True):
        png = np.asarray(Image.open(path).convert("RGB"))
        k = (png.shape[1] + TILE_GAP) // TILES // size
        side = k * size
        assert side >= 160 and png.shape == (
            TITLE_HEIGHT + side,
            TILES * (side + TILE_GAP) - TILE_GAP,
            3,
        )
        gt = data["gt"][entry["index"]]
        outline = gt & ~ndimage.binary_erosion(gt, np.ones((3, 3), bool), border_value=0)
        ys, xs = np.nonzero(outline)
        for tile in (1, 2, 3):
            x0 = tile * (side + TILE_GAP)
            assert (png[TITLE_HEIGHT + ys * k, x0 + xs * k] == GT_COLOR).all()
        assert not (png[TITLE_HEIGHT:, :side] == GT_COLOR).all(axis=-1).any()  # the plain image
        checked += int(ys.size > 0)
    assert checked > 0

    overview = np.asarray(Image.open(panels.overview))
    assert panels.overview == tmp_path / "panels" / "overview.png"
    assert overview.shape[1] >= 3 * TILES * OVERVIEW_TILE  # three columns of smaller panels
    assert [c["key"] for c in run.wandb.calls] == ["test/panels", "test/panels_overview"]
    assert len(run.wandb.calls[0]["images"]) == 7 and len(run.wandb.calls[0]["caption"]) == 7
    np.testing.assert_array_equal(run.wandb.calls[1]["images"][0], overview)


def test_switched_off_panels_write_nothing(tmp_path: Path) -> None:
    run = _tested(tmp_path, 6, 16, AnomalyPanels(enabled=False))
    assert not (tmp_path / "panels").exists() and run.wandb.calls == []


def test_panels_need_anomaly_metrics(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs an AnomalyMetrics"):
        AnomalyPanels().on_test_start(fake_trainer(tmp_path), FakeModule())
    with pytest.raises(ValueError, match="must be >= 0"):
        AnomalyPanels(misses=-1)
