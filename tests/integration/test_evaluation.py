"""Fit, validate and test PathoScope on synthetic BraTS; recompute metrics.json from predictions.npz.

Every value in metrics.json is recomputed with the slow, obviously correct references below
(pairwise Mann-Whitney AUROC, PRO by explicit loops over thresholds and regions, Dice by a loop
over thresholds) and must agree to 1e-6. The panels must be the documented selection, checked
against predictions.npz, and show the gt_mask outlines.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from callbacks import AnomalyMetrics, AnomalyPanels
from callbacks.metrics import JSON_KEYS
from callbacks.panels import select_panels
from callbacks.visualization import GT_COLOR, TILE_GAP, TILES, TITLE_HEIGHT
from data_modules.brats import BraTSDataModule
from pathoscope.lightning_model import PathoScope

EVAL_SIZE = 32
EIGHT_CONNECTED = np.ones((3, 3), bool)


# -- references ------------------------------------------------------------------------------------
def ref_auroc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Mann-Whitney: P(positive > negative) + P(tie) / 2 over all pairs."""
    pos, neg = scores[labels].astype(np.float64), scores[~labels].astype(np.float64)
    if pos.size == 0 or neg.size == 0:
        return None
    wins = 0.0
    for chunk in np.array_split(pos, max(1, pos.size // 256)):
        wins += np.sum(chunk[:, None] > neg[None]) + 0.5 * np.sum(chunk[:, None] == neg[None])
    return wins / (pos.size * neg.size)


def ref_pro(
    maps: np.ndarray, gt: np.ndarray, foreground: np.ndarray | None, limit: float
) -> float | None:
    """MVTec AD PRO: per-region overlap averaged over regions vs FPR, integrated to `limit`."""
    counted = np.ones_like(gt) if foreground is None else foreground
    anomalous, normal = gt & counted, ~gt & counted
    regions = []
    for i in range(len(maps)):
        labels, n = ndimage.label(anomalous[i], structure=EIGHT_CONNECTED)
        regions += [maps[i][labels == r] for r in range(1, n + 1)]
    if not regions or not normal.any():
        return None
    normal_scores = maps[normal]
    curve = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:  # every distinct score, descending
        fpr = np.mean(normal_scores >= t)
        pro = np.mean([np.mean(region >= t) for region in regions])
        curve.append((fpr, pro))
        if fpr > limit:
            break
    area = 0.0
    for (x0, y0), (x1, y1) in zip(curve, curve[1:], strict=False):
        if x0 >= limit:
            break
        if x1 > limit:  # interpolate linearly at the limit
            y1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            x1 = limit
        area += (x1 - x0) * (y0 + y1) / 2.0
    return area / limit


def ref_dice(pred: np.ndarray, gt: np.ndarray) -> float | None:
    total = pred.sum() + gt.sum()
    return None if total == 0 else 2.0 * np.sum(pred & gt) / total


def ref_iou(pred: np.ndarray, gt: np.ndarray) -> float | None:
    union = np.sum(pred | gt)
    return None if union == 0 else np.sum(pred & gt) / union


def ref_best_dice(maps: np.ndarray, gt: np.ndarray) -> float | None:
    if not gt.any():
        return None
    return max(ref_dice(maps >= t, gt) for t in np.unique(maps))


def reference_report(npz: dict[str, np.ndarray], tau: float | None) -> dict[str, float | None]:
    scores, labels = npz["scores"], npz["labels"].astype(bool)
    pixel = npz["has_mask"] | ~labels  # items with a pixel-level gt_mask, plus normal items
    maps, gt, fg = npz["maps"][pixel], npz["gt_masks"][pixel], npz["foreground"][pixel]
    out: dict[str, float | None] = {
        "image_auroc": ref_auroc(scores, labels),
        "pixel_auroc": ref_auroc(maps.ravel(), gt.ravel()),
        "pixel_auroc_fg": ref_auroc(maps[fg], gt[fg]),
        "pro": ref_pro(maps, gt, None, 0.3),
        "pro_fg": ref_pro(maps, gt, fg, 0.3),
        "dice_best": ref_best_dice(maps, gt),
        "tau": tau,
        "sensitivity": None,
        "specificity": None,
        "dice_at_tau": None,
        "iou_at_tau": None,
    }
    if tau is not None:
        out["sensitivity"] = np.mean(scores[labels] >= tau)
        out["specificity"] = np.mean(scores[~labels] < tau)
        out["dice_at_tau"] = ref_dice(maps >= tau, gt)
        out["iou_at_tau"] = ref_iou(maps >= tau, gt)
    return out


# -- the run -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_fit_validate_test_metrics_match_references(brats_root: Path, tmp_path: Path) -> None:
    dm = BraTSDataModule(
        str(brats_root),
        shots=2,
        image_size=64,
        n_test_healthy=6,
        n_test_tumorous=6,
        batch_size=4,
        steps_per_epoch=3,
    )
    L.seed_everything(0)
    # The fast test model; maps from the nearest-anchor distance, because after 3 steps the
    # discriminator's maps are nearly flat (PRO 0 on both sides would compare nothing).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Backbone: pretrained=False")
        model = PathoScope(
            network={"pretrained": False, "hidden_dim": 64},
            pieg={"steps": 2},
            bank={"max_anchors": 256},
            scoring={"source": "anchor_distance"},
        )
    metrics_cb = AnomalyMetrics(eval_size=EVAL_SIZE, save_predictions=True)
    viz = AnomalyPanels(false_alarms=2, misses=2, random=2, seed=0)
    trainer = L.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=6,
        callbacks=[viz, metrics_cb],  # the panels first: they must still see the test data
        default_root_dir=str(tmp_path),
    )
    trainer.fit(model, datamodule=dm)
    tau_fit = float(model.tau)
    assert math.isfinite(tau_fit)
    val_results = trainer.validate(model, datamodule=dm, verbose=False)
    assert float(model.tau) == tau_fit  # evaluation is deterministic
    assert val_results[0]["val/tau"] == pytest.approx(tau_fit)
    val = metrics_cb.results["val"]
    assert set(val.subject) <= set(dm.train_subjects)  # checkpoint selection never sees test data
    assert not set(val.subject) & set(dm.test_subjects)
    assert float(model.tau) == pytest.approx(
        np.quantile(val.scores[val.labels == 0].astype(np.float64), model.tau_quantile)
    )
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    state = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert float(state["model.threshold.tau"]) == tau_fit

    test_results = trainer.test(model, datamodule=dm, verbose=False)
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert set(report) == {*JSON_KEYS, "skipped_subjects"}
    # The set's subject 020 has a misnamed segmentation: the results say they were made without it.
    assert list(report["skipped_subjects"]) == ["BraTS20_Training_020"]
    assert (
        "BraTS20_Training_020_seg.nii.gz: missing"
        in report["skipped_subjects"]["BraTS20_Training_020"]
    )
    assert report["eval_size"] == EVAL_SIZE
    assert report["weights"] == model.weights_tag == "random"
    assert report["checkpoint"] == "last"
    assert report["tau"] == tau_fit
    assert test_results[0]["test/image_auroc"] == pytest.approx(report["image_auroc"])

    with np.load(tmp_path / "predictions.npz") as f:
        npz = {k: f[k] for k in f.files}
    n = len(dm.test_dataset())
    assert npz["maps"].shape == (n, EVAL_SIZE, EVAL_SIZE) and npz["maps"].dtype == np.float32
    np.testing.assert_array_equal(npz["index"], np.arange(n))
    assert float(npz["tau"]) == tau_fit
    expected = reference_report(npz, tau_fit)
    for key in ("pixel_auroc", "pro", "pro_fg", "dice_best", "dice_at_tau", "iou_at_tau"):
        assert 0.0 < expected[key] < 1.0, key  # the comparison below is not vacuous
    for key, value in expected.items():
        if value is None:
            assert report[key] is None, key
        else:
            assert report[key] == pytest.approx(value, abs=1e-6), key
            assert key == "tau" or 0.0 <= report[key] <= 1.0, key  # tau is a score

    # Panels: the documented selection of predictions.npz; the gt_mask outline (red) lies on
    # tiles 1-3 where the gt boundary is.
    report = json.loads((tmp_path / "panels" / "panels.json").read_text())
    expected = select_panels(npz["scores"], npz["labels"], 2, 2, 2, seed=0)
    for group, rows in expected.items():
        chosen = [p["index"] for p in report["panels"] if p["group"] == group]
        assert chosen == npz["index"][rows].tolist(), group
    normal_scores = npz["scores"][npz["labels"] == 0]
    false_alarms = [p for p in report["panels"] if p["group"] == "false_alarm"]
    assert [p["score"] for p in false_alarms] == pytest.approx(np.sort(normal_scores)[::-1][:2])
    assert len(viz.paths) == 6 and all(p.is_file() for p in viz.paths)
    assert viz.overview is not None and viz.overview.is_file()
    outlined = 0
    for entry, path in zip(report["panels"], viz.paths, strict=True):
        row = int(np.flatnonzero(npz["index"] == entry["index"])[0])
        png = np.asarray(Image.open(path).convert("RGB"))
        k = (png.shape[1] + TILE_GAP) // TILES // EVAL_SIZE
        gt = npz["gt_masks"][row]
        ys, xs = np.nonzero(gt & ~ndimage.binary_erosion(gt, EIGHT_CONNECTED, border_value=0))
        for tile in (1, 2, 3):
            x0 = tile * (k * EVAL_SIZE + TILE_GAP)
            assert (png[TITLE_HEIGHT + ys * k, x0 + xs * k] == GT_COLOR).all()
        outlined += int(ys.size > 0)
    assert outlined > 0
