"""pathoscope.metrics against slow, obviously correct references and hand-worked cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from pathoscope.metrics import (
    best_dice,
    dice_score,
    image_auroc,
    iou_score,
    pixel_auroc,
    pro_score,
    to_numpy,
)

TOL = 1e-6


# ---------------------------------------------------------------- slow references


def ref_auroc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Mann-Whitney: fraction of (anomalous, normal) pairs ranked right, ties count 1/2."""
    pos, neg = scores[labels], scores[~labels]
    if pos.size == 0 or neg.size == 0:
        return None
    wins = 0.0
    for p in pos:
        wins += np.sum(p > neg) + 0.5 * np.sum(p == neg)
    return wins / (pos.size * neg.size)


def ref_pro(
    maps: np.ndarray, gt: np.ndarray, fpr_limit: float = 0.3, foreground: np.ndarray | None = None
) -> float | None:
    """Explicit loops over every distinct threshold and every 8-connected region."""
    fg = np.ones_like(gt) if foreground is None else foreground
    regions = []  # list of (image index, bool mask of the region)
    for i in range(maps.shape[0]):
        labelled, n = ndimage.label(gt[i] & fg[i], structure=np.ones((3, 3)))
        for r in range(1, n + 1):
            regions.append((i, labelled == r))
    normal = ~gt & fg
    if not regions or not normal.any():
        return None
    curve = [(0.0, 0.0)]
    for t in sorted(np.unique(maps[(gt & fg) | normal]), reverse=True):
        overlaps = [np.mean(maps[i][region] >= t) for i, region in regions]
        fpr = np.mean(maps[normal] >= t)
        curve.append((float(fpr), float(np.mean(overlaps))))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(curve[:-1], curve[1:], strict=True):
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:  # cut the last segment at the limit
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / fpr_limit


def ref_best_dice(maps: np.ndarray, gt: np.ndarray) -> tuple[float | None, float | None]:
    """Pooled Dice at every distinct threshold, highest threshold wins ties."""
    best, best_t = None, None
    for t in sorted(np.unique(maps), reverse=True):
        pred = maps >= t
        tp = np.sum(pred & gt)
        fp = np.sum(pred & ~gt)
        fn = np.sum(~pred & gt)
        if tp + fp + fn == 0:
            continue
        dice = 2 * tp / (2 * tp + fp + fn)
        if best is None or dice > best:
            best, best_t = dice, t
    return best, best_t


# ---------------------------------------------------------------- random inputs


def blob_masks(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """(n, size, size) bool: a few discs per image, stray pixels, some images empty."""
    yy, xx = np.mgrid[:size, :size]
    gt = np.zeros((n, size, size), dtype=bool)
    for i in range(n):
        if i % 3 == 0:
            continue  # a normal image
        for _ in range(rng.integers(1, 5)):
            cy, cx = rng.integers(0, size, 2)
            radius = rng.uniform(0.5, 4.0)
            gt[i] |= (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
        gt[i] |= rng.random((size, size)) < 0.01  # single pixels, some diagonal neighbours
    return gt


def random_case(seed: int, n: int = 6, size: int = 24, decimals: int | None = 1):
    """Maps correlated with blob gt_masks, quantised for ties; a random foreground."""
    rng = np.random.default_rng(seed)
    gt = blob_masks(rng, n, size)
    maps = rng.random((n, size, size)) + 0.6 * gt
    if decimals is not None:
        maps = np.round(maps, decimals)
    maps = maps.astype(np.float32)
    foreground = np.zeros_like(gt)
    foreground[:, 3:-3, 2:-5] = True
    foreground &= rng.random(gt.shape) < 0.9
    return maps, gt, foreground


# ---------------------------------------------------------------- random vs reference


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("use_foreground", [False, True])
def test_pixel_metrics_match_references_with_ties(seed: int, use_foreground: bool) -> None:
    maps, gt, fg = random_case(seed)
    foreground = fg if use_foreground else None
    assert len(np.unique(maps)) < 20  # many ties
    sel = fg if use_foreground else np.ones_like(gt)

    assert pixel_auroc(maps, gt, foreground) == pytest.approx(
        ref_auroc(maps[sel], gt[sel]), abs=TOL
    )
    for limit in (0.3, 0.05, 1.0):
        assert pro_score(maps, gt, limit, foreground) == pytest.approx(
            ref_pro(maps, gt, limit, foreground), abs=TOL
        )
    if not use_foreground:
        dice, thr = best_dice(maps, gt)
        ref_dice, ref_thr = ref_best_dice(maps, gt)
        assert dice == pytest.approx(ref_dice, abs=TOL)
        assert thr == ref_thr


def test_pixel_metrics_match_references_without_ties() -> None:
    maps, gt, fg = random_case(seed=7, n=3, size=16, decimals=None)
    assert len(np.unique(maps)) == maps.size  # every pixel its own threshold
    assert pixel_auroc(maps, gt) == pytest.approx(ref_auroc(maps.ravel(), gt.ravel()), abs=TOL)
    assert pro_score(maps, gt) == pytest.approx(ref_pro(maps, gt), abs=TOL)
    assert pro_score(maps, gt, foreground=fg) == pytest.approx(
        ref_pro(maps, gt, foreground=fg), abs=TOL
    )
    dice, thr = best_dice(maps, gt)
    ref_dice, ref_thr = ref_best_dice(maps, gt)
    assert dice == pytest.approx(ref_dice, abs=TOL)
    assert thr == ref_thr


@pytest.mark.parametrize("seed", [0, 1])
def test_image_auroc_matches_reference_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.random(60) < 0.4
    scores = np.round(rng.random(60) + 0.3 * labels, 1)
    assert image_auroc(scores, labels) == pytest.approx(ref_auroc(scores, labels), abs=TOL)


def test_auroc_exact_for_scores_outside_unit_interval() -> None:
    # torchmetrics would squash these with a sigmoid, where float32 sigmoid(100.x) == 1
    # for all of them, and report 0.5; the AUROC must depend only on the order.
    rng = np.random.default_rng(3)
    labels = rng.random(50) < 0.5
    scores = (100.0 + np.round(rng.random(50) + 0.5 * labels, 1)).astype(np.float32)
    expected = ref_auroc(scores, labels)
    assert expected > 0.6
    assert image_auroc(scores, labels) == pytest.approx(expected, abs=TOL)
    maps, gt, _ = random_case(seed=4)
    maps = maps * 1000.0 - 50.0
    assert pixel_auroc(maps, gt) == pytest.approx(ref_auroc(maps.ravel(), gt.ravel()), abs=TOL)


def test_auroc_exact_for_extreme_score_range() -> None:
    # A min-max rescale would merge 1.0 and its float64 neighbour (AUROC 0.875); the
    # order-preserving fallback keeps them apart: every anomalous score is higher, AUROC 1.
    scores = np.array([-1e300, 1.0, np.nextafter(1.0, 2.0), 1e300])
    labels = np.array([False, False, True, True])
    assert image_auroc(scores, labels) == pytest.approx(1.0)


def test_torch_inputs_give_the_same_values() -> None:
    maps, gt, fg = random_case(seed=5)
    tm, tg, tf = torch.from_numpy(maps), torch.from_numpy(gt), torch.from_numpy(fg)
    assert pixel_auroc(tm, tg, tf) == pixel_auroc(maps, gt, fg)
    assert pro_score(tm, tg, foreground=tf) == pro_score(maps, gt, foreground=fg)
    assert best_dice(tm, tg) == best_dice(maps, gt)
    assert dice_score(tm > 1.0, tg) == dice_score(maps > 1.0, gt)
    assert iou_score(tm > 1.0, tg.to(torch.uint8)) == iou_score(maps > 1.0, gt)
    scores = tm.amax(dim=(1, 2))
    labels = tg.any(dim=2).any(dim=1)
    assert image_auroc(scores, labels) == image_auroc(scores.numpy(), labels.numpy())


# ---------------------------------------------------------------- hand-worked cases


def test_perfect_map_scores_one() -> None:
    _, gt, _ = random_case(seed=0)
    maps = gt.astype(np.float32)
    assert pixel_auroc(maps, gt) == pytest.approx(1.0)
    assert pro_score(maps, gt) == pytest.approx(1.0)
    assert best_dice(maps, gt) == (pytest.approx(1.0), 1.0)
    scores, labels = maps.max(axis=(1, 2)), gt.any(axis=(1, 2))
    assert image_auroc(scores, labels) == pytest.approx(1.0)


def test_inverted_map_scores_zero() -> None:
    _, gt, _ = random_case(seed=0)
    maps = 1.0 - gt.astype(np.float32)
    assert pixel_auroc(maps, gt) == pytest.approx(0.0)
    # Curve: (0,0) -> (1,0) at t=1 (all normal pixels first) -> (1,1); area up to 0.3 is 0.
    assert pro_score(maps, gt) == pytest.approx(0.0)
    labels = gt.any(axis=(1, 2))
    assert image_auroc((~labels).astype(np.float32), labels) == pytest.approx(0.0)


def test_auroc_with_ties_by_hand() -> None:
    # Pairs (anomalous, normal): 0.5>0.1 -> 1; 0.5==0.5 -> 1/2; 0.9 beats both -> 2.
    # AUROC = 3.5 / 4 = 0.875.
    scores = np.array([0.1, 0.5, 0.5, 0.9])
    labels = np.array([False, False, True, True])
    assert image_auroc(scores, labels) == pytest.approx(0.875, abs=TOL)
    maps = scores.reshape(1, 2, 2)
    assert pixel_auroc(maps, labels.reshape(1, 2, 2)) == pytest.approx(0.875, abs=TOL)


def test_pro_with_ties_and_interpolation_by_hand() -> None:
    # One 1x13 image. Region A = pixel 0 (score 0.9); region B = pixels 3, 4 (0.8, 0.5).
    # Ten normal pixels: 0.95, 0.8, 0.5, 0.5, and six at 0.1.
    # Thresholds (last point of each tie group):
    #   0.95: FPR 0.1, PRO 0              0.9: FPR 0.1, PRO (1 + 0) / 2 = 0.5
    #   0.8:  FPR 0.2, PRO (1 + .5) / 2 = 0.75
    #   0.5:  FPR 0.4, PRO 1              0.1: FPR 1.0, PRO 1
    # Up to 0.3: 0.1 * (0.5 + 0.75) / 2 = 0.0625, then PRO at 0.3 interpolated between
    # (0.2, 0.75) and (0.4, 1) is 0.875: 0.1 * (0.75 + 0.875) / 2 = 0.08125.
    # AU-PRO(0.3) = 0.14375 / 0.3 = 0.4791666...
    # Up to 1.0: 0.0625 + 0.2 * (0.75 + 1) / 2 + 0.6 * 1 = 0.8375.
    row = [0.9, 0.95, 0.8, 0.8, 0.5, 0.5, 0.5, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]
    gt_row = [1, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0]
    maps = np.array(row, dtype=np.float32).reshape(1, 1, 13)
    gt = np.array(gt_row, dtype=bool).reshape(1, 1, 13)
    assert pro_score(maps, gt, fpr_limit=0.3) == pytest.approx(0.14375 / 0.3, abs=TOL)
    assert pro_score(maps, gt, fpr_limit=1.0) == pytest.approx(0.8375, abs=TOL)
    # Limit exactly on a curve point (FPR 0.2): 0.0625 / 0.2.
    assert pro_score(maps, gt, fpr_limit=0.2) == pytest.approx(0.3125, abs=TOL)


def test_pro_uses_8_connectivity() -> None:
    # gt pixels (0,0), (1,1), (1,2): one 8-connected region of 3 pixels, but two 4-connected
    # regions ({(0,0)} and {(1,1),(1,2)}). Only (0,0) scores above the normals (0.5).
    # 8-connected: the curve is (0,0) -> (0,1/3) -> (1,1/3) -> (1,1), AU-PRO(0.3) = 1/3.
    # 4-connected it would be (0,0) -> (0,1/2) -> ..., AU-PRO(0.3) = 1/2.
    gt = np.zeros((1, 3, 3), dtype=bool)
    gt[0, 0, 0] = gt[0, 1, 1] = gt[0, 1, 2] = True
    maps = np.where(gt, 0.1, 0.5).astype(np.float32)
    maps[0, 0, 0] = 0.9
    assert pro_score(maps, gt) == pytest.approx(1 / 3, abs=TOL)
    assert ref_pro(maps, gt) == pytest.approx(1 / 3, abs=TOL)


def test_foreground_excludes_pixels_by_hand() -> None:
    # The high-scoring normal pixel lies outside the foreground: with the foreground every
    # anomalous pixel outranks every counted normal pixel.
    maps = np.array([[[0.9, 0.8, 0.2, 0.95]]], dtype=np.float32)
    gt = np.array([[[True, True, False, False]]])
    fg = np.array([[[True, True, True, False]]])
    assert pixel_auroc(maps, gt) == pytest.approx(0.5)  # 2 of 4 pairs won
    assert pixel_auroc(maps, gt, fg) == pytest.approx(1.0)
    assert pro_score(maps, gt) == pytest.approx(0.0)  # the 0.95 normal comes first: FPR 0.5
    assert pro_score(maps, gt, foreground=fg) == pytest.approx(1.0)


def test_no_anomalous_pixel_gives_none() -> None:
    rng = np.random.default_rng(0)
    maps = rng.random((3, 8, 8)).astype(np.float32)
    gt = np.zeros((3, 8, 8), dtype=bool)
    assert pixel_auroc(maps, gt) is None
    assert pro_score(maps, gt) is None
    assert best_dice(maps, gt) == (None, None)
    assert dice_score(gt, gt) is None
    assert iou_score(gt, gt) is None
    assert image_auroc(maps.max(axis=(1, 2)), np.zeros(3, dtype=bool)) is None
    # Anomalous pixels only in the background: none counted.
    gt[0, 0, 0] = True
    fg = np.ones_like(gt)
    fg[0, 0, 0] = False
    assert pro_score(maps, gt, foreground=fg) is None
    assert pixel_auroc(maps, gt, fg) is None


def test_no_normal_pixel_gives_none() -> None:
    maps = np.random.default_rng(0).random((2, 4, 4))
    gt = np.ones((2, 4, 4), dtype=bool)
    assert pro_score(maps, gt) is None
    assert pixel_auroc(maps, gt) is None
    assert image_auroc(np.array([0.2, 0.3]), np.array([1, 1])) is None


def test_dice_and_iou_are_pooled_by_hand() -> None:
    # Image 0: pred == gt == one pixel. Image 1: pred 3 pixels, gt 1 pixel inside them.
    # Pooled: TP 2, |pred| 4, |gt| 2 -> Dice 4/6, IoU 2/4 (a per-image mean would give
    # Dice 0.75).
    pred = np.zeros((2, 2, 2), dtype=bool)
    gt = np.zeros((2, 2, 2), dtype=bool)
    pred[0, 0, 0] = gt[0, 0, 0] = True
    pred[1, 0, :] = True
    pred[1, 1, 0] = True
    gt[1, 0, 1] = True
    assert dice_score(pred, gt) == pytest.approx(4 / 6)
    assert iou_score(pred, gt) == pytest.approx(0.5)
    assert dice_score(pred, np.zeros_like(gt)) == 0.0
    assert iou_score(np.zeros_like(pred), gt) == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_best_dice_threshold_reproduces_dice(seed: int) -> None:
    maps, gt, _ = random_case(seed)
    dice, thr = best_dice(maps, gt)
    assert dice is not None and thr is not None
    assert dice_score(maps >= thr, gt) == pytest.approx(dice, abs=1e-12)
    # No other threshold does better.
    for t in np.unique(maps):
        assert dice_score(maps >= t, gt) <= dice + 1e-12


# ---------------------------------------------------------------- bad input


def test_bad_inputs_raise_clear_errors() -> None:
    maps = np.zeros((2, 4, 4), dtype=np.float32)
    gt = np.zeros((2, 4, 4), dtype=bool)
    gt[0, 0, 0] = True
    with pytest.raises(ValueError, match="same shape"):
        pixel_auroc(maps, gt[:, :3])
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        pro_score(maps[0], gt[0])
    with pytest.raises(ValueError, match="foreground"):
        pro_score(maps, gt, foreground=gt[:1])
    with pytest.raises(ValueError, match="fpr_limit"):
        pro_score(maps, gt, fpr_limit=0.0)
    with pytest.raises(ValueError, match="gt_masks must be bool"):
        best_dice(maps, gt * 2)
    with pytest.raises(ValueError, match="finite"):
        pixel_auroc(np.full((2, 4, 4), np.nan), gt)
    with pytest.raises(ValueError, match="same shape"):
        image_auroc(np.zeros(3), np.zeros(4, dtype=bool))
    with pytest.raises(ValueError, match="same shape"):
        dice_score(gt, gt[:1])


def test_to_numpy() -> None:
    t = torch.arange(6, dtype=torch.bfloat16).reshape(2, 3)
    arr = to_numpy(t)
    assert isinstance(arr, np.ndarray) and arr.shape == (2, 3)
    np.testing.assert_array_equal(arr, np.arange(6).reshape(2, 3))
    assert to_numpy([1, 2]).tolist() == [1, 2]


def test_sensitivity_by_lesion_area_by_hand() -> None:
    """Four pathological 10 x 10 slices, foreground 50 pixels: lesions of 0, 1, 2 and 10 pixels
    (0, 2, 4 and 20 % of the foreground); detected: the 1- and 10-pixel ones."""
    from pathoscope.metrics import sensitivity_by_area

    gt = np.zeros((4, 10, 10), bool)
    fg = np.zeros((4, 10, 10), bool)
    fg[:, :5] = True
    gt[1, 0, 0] = True
    gt[2, 0, :2] = True
    gt[3, 1, :] = True
    got = sensitivity_by_area(np.array([True, True, False, True]), gt, fg)
    # 1 pixel = 2 %: bin 1to3; 2 pixels = 4 %: 3to10; 10 pixels = 20 %: ge10; no lesion: no bin
    assert got == {"lt1": (None, 0), "1to3": (1.0, 1), "3to10": (0.0, 1), "ge10": (1.0, 1)}
    empty = sensitivity_by_area(np.zeros(0, bool), gt[:0], fg[:0])
    assert all(v == (None, 0) for v in empty.values())
