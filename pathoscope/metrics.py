"""Exact evaluation metrics: image/pixel AUROC, AU-PRO, best Dice, Dice and IoU.

Pure functions. Inputs are numpy arrays or torch tensors: anomaly maps (N, H, W) float,
gt_mask / pred_mask / foreground (N, H, W) bool (0/1 integers are accepted too).
Every metric is exact: every distinct score is a threshold, ties are resolved by taking
the point after the whole tie group, and memory is linear in the number of pixels.
A metric that is undefined on its input (one class only, no pixel at all) returns None.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torchmetrics.functional.classification import binary_auroc

__all__ = [
    "best_dice",
    "dice_score",
    "image_auroc",
    "iou_score",
    "pixel_auroc",
    "pro_score",
    "to_numpy",
]

# 8-connectivity inside each (H, W) slice and none across the N axis, so one
# ndimage.label call on the (N, H, W) stack labels every image's regions separately.
_PER_IMAGE_8_CONNECTED = np.zeros((3, 3, 3), dtype=bool)
_PER_IMAGE_8_CONNECTED[1] = True


def to_numpy(x: Any) -> np.ndarray:
    """Return `x` (torch tensor, numpy array or nested sequence) as a numpy array on the CPU."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:  # numpy has no bfloat16
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def image_auroc(scores: Any, labels: Any) -> float | None:
    """Exact AUROC of image scores (N,) against image labels (N,) (True/1 = anomalous).

    None when only one class is present.
    """
    scores_np = _as_scores(scores, "scores")
    labels_np = _as_binary(labels, "labels")
    if scores_np.ndim != 1 or labels_np.shape != scores_np.shape:
        raise ValueError(
            "image_auroc expects scores and labels of the same shape (N,); "
            f"got scores {scores_np.shape} and labels {labels_np.shape}"
        )
    return _exact_binary_auroc(scores_np, labels_np)


def pixel_auroc(maps: Any, gt_masks: Any, foreground: Any = None) -> float | None:
    """Exact AUROC over pixels of anomaly maps (N, H, W) against gt_masks (N, H, W).

    With `foreground` (N, H, W) only foreground pixels count. None when the counted
    pixels hold only one class.
    """
    maps_np, gt_np, fg_np = _check_maps_and_masks(maps, gt_masks, foreground)
    if fg_np is None:
        return _exact_binary_auroc(maps_np.ravel(), gt_np.ravel())
    return _exact_binary_auroc(maps_np[fg_np], gt_np[fg_np])


def pro_score(
    maps: Any, gt_masks: Any, fpr_limit: float = 0.3, foreground: Any = None
) -> float | None:
    """Normalised area under the PRO curve up to `fpr_limit` (MVTec AD definition).

    Regions are the 8-connected components of each image's gt_mask (intersected with the
    foreground when given). For a threshold t, PRO is the mean over all regions of the set
    of the fraction of the region's pixels with map >= t, and FPR is the fraction of all
    normal pixels (gt_mask False, inside the foreground when given) with map >= t. One
    global sweep over every distinct score gives the curve, which starts at (0, 0); it is
    integrated with the trapezoid rule up to `fpr_limit` (interpolated linearly there) and
    divided by `fpr_limit`. None when there is no anomalous or no normal pixel.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"pro_score expects 0 < fpr_limit <= 1; got {fpr_limit}")
    maps_np, gt_np, fg_np = _check_maps_and_masks(maps, gt_masks, foreground)
    if fg_np is None:
        anomalous, normal = gt_np, ~gt_np
    else:
        anomalous, normal = gt_np & fg_np, ~gt_np & fg_np
    n_normal = int(np.count_nonzero(normal))
    region_labels, n_regions = ndimage.label(anomalous, structure=_PER_IMAGE_8_CONNECTED)
    if n_regions == 0 or n_normal == 0:
        return None

    # An anomalous pixel adds 1 / (R * |its region|) to PRO once the threshold reaches it.
    region_sizes = np.bincount(region_labels.ravel(), minlength=n_regions + 1)
    region_weight = np.zeros(n_regions + 1, dtype=np.float64)  # label 0 = not anomalous
    region_weight[1:] = 1.0 / (n_regions * region_sizes[1:])
    anomalous_scores = maps_np[anomalous]  # (A,)
    order = np.argsort(anomalous_scores)[::-1]  # descending
    sorted_anomalous = anomalous_scores[order]
    pro_cum = np.cumsum(region_weight[region_labels[anomalous]][order])
    ends = _tie_group_ends(sorted_anomalous)
    thresholds = sorted_anomalous[ends]  # distinct anomalous scores, descending
    pro_at = pro_cum[ends]  # PRO at t: pixels >= t
    pro_above = np.concatenate(([0.0], pro_at[:-1]))  # PRO just above t: pixels > t
    normal_sorted = np.sort(maps_np[normal])  # (n_normal,) ascending
    fp_at = n_normal - np.searchsorted(normal_sorted, thresholds, side="left")
    fp_above = n_normal - np.searchsorted(normal_sorted, thresholds, side="right")

    # The curve over every distinct score, (0,0) first: between two anomalous scores only
    # FPR moves, so those points lie on a horizontal line from (fp_at, pro_at) of one to
    # (fp_above, pro_above) of the next, and the line's ends carry the same area and
    # interpolation as all its points. Sorting only the normal scores is much faster.
    fpr = np.concatenate(([0.0], np.stack([fp_above, fp_at], axis=1).ravel() / n_normal, [1.0]))
    pro = np.concatenate(([0.0], np.stack([pro_above, pro_at], axis=1).ravel(), pro_at[-1:]))
    return _trapezoid_up_to(fpr, pro, fpr_limit) / fpr_limit


def best_dice(maps: Any, gt_masks: Any) -> tuple[float | None, float | None]:
    """Dataset-pooled Dice at the threshold that maximises it: (dice, threshold).

    Prediction is map >= threshold; Dice = 2 TP / (2 TP + FP + FN) with counts summed over
    all pixels of all images. Exact over every distinct score; among equal best values the
    highest threshold wins. An oracle (it sees the gt_masks). (None, None) when there is
    no anomalous pixel (the best prediction is then empty and Dice undefined).
    """
    maps_np, gt_np, _ = _check_maps_and_masks(maps, gt_masks, None)
    n_positive = int(np.count_nonzero(gt_np))
    if n_positive == 0:
        return None, None
    # Lowering a threshold past normal pixels only adds FP, so the best threshold (the
    # highest among equals) is always an anomalous pixel's score: try just those.
    sorted_anomalous = np.sort(maps_np[gt_np])[::-1]  # (P,) descending
    ends = _tie_group_ends(sorted_anomalous)
    thresholds = sorted_anomalous[ends]
    tp = ends + 1
    normal_sorted = np.sort(maps_np[~gt_np])
    fp = normal_sorted.size - np.searchsorted(normal_sorted, thresholds, side="left")
    dice = 2.0 * tp / (tp + fp + n_positive)  # 2TP / (2TP + FP + FN)
    best = int(np.argmax(dice))
    return float(dice[best]), float(thresholds[best])


def dice_score(pred_masks: Any, gt_masks: Any) -> float | None:
    """Dice of pred_masks against gt_masks, pooled over the set. None when both are empty."""
    pred_np, gt_np = _check_mask_pair(pred_masks, gt_masks, "dice_score")
    total = int(np.count_nonzero(pred_np)) + int(np.count_nonzero(gt_np))
    if total == 0:
        return None
    return 2.0 * int(np.count_nonzero(pred_np & gt_np)) / total


def iou_score(pred_masks: Any, gt_masks: Any) -> float | None:
    """IoU of pred_masks against gt_masks, pooled over the set. None when both are empty."""
    pred_np, gt_np = _check_mask_pair(pred_masks, gt_masks, "iou_score")
    union = int(np.count_nonzero(pred_np | gt_np))
    if union == 0:
        return None
    return int(np.count_nonzero(pred_np & gt_np)) / union


# Lesion area bins, as a fraction of the slice's foreground (brain) area: [lo, hi) each. Small
# lesions are where a reader most needs help; 1 % of a mid-brain axial slice (about 190 cm2 of
# brain) is a lesion about 15 mm across.
AREA_BINS: dict[str, tuple[float, float]] = {
    "lt1": (0.0, 0.01),
    "1to3": (0.01, 0.03),
    "3to10": (0.03, 0.10),
    "ge10": (0.10, float("inf")),
}


def sensitivity_by_area(
    decisions: Any, gt_masks: Any, foreground: Any
) -> dict[str, tuple[float | None, int]]:
    """{bin: (sensitivity, n)} over the pathological items (N, H, W masks with a lesion), binned by
    lesion area / foreground area (AREA_BINS): the fraction of each bin's items whose image
    decision (N,) bool is pathological; None for an empty bin."""
    decided = np.asarray(decisions, bool)
    gt = np.asarray(gt_masks, bool)
    fg = np.asarray(foreground, bool) | gt  # a lesion pixel is inside the organ
    pixels = int(np.prod(gt.shape[1:]))
    lesion = gt.reshape(len(gt), pixels).sum(1)
    area = lesion / np.maximum(fg.reshape(len(fg), pixels).sum(1), 1)
    out: dict[str, tuple[float | None, int]] = {}
    for name, (lo, hi) in AREA_BINS.items():
        inside = (lesion > 0) & (area >= lo) & (area < hi)
        n = int(inside.sum())
        out[name] = (float(decided[inside].mean()) if n else None, n)
    return out


def _exact_binary_auroc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """torchmetrics' exact AUROC (thresholds=None) of 1-D scores against bool labels."""
    n_positive = int(np.count_nonzero(labels))
    if n_positive == 0 or n_positive == labels.size:
        return None
    if scores.dtype not in (np.float32, np.float64):
        scores = scores.astype(np.float64)
    # AUROC ignores the order of the samples. torchmetrics sorts them again, but on input
    # that is already sorted its argsort and gathers run several times faster, and two
    # numpy sorts plus a merge cost far less than one argsort.
    merged, merged_labels = _merge_sorted(np.sort(scores[~labels]), np.sort(scores[labels]))
    preds = torch.from_numpy(_order_preserving_unit(merged)[::-1].copy())  # descending
    target = torch.from_numpy(merged_labels[::-1].copy())
    # Inputs were validated above; torchmetrics' own check would sort the pixels again.
    return float(binary_auroc(preds, target, thresholds=None, validate_args=False))


def _merge_sorted(negative: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Merge two ascending arrays: (merged scores, True where the score came from positive)."""
    positive_at = np.searchsorted(negative, positive, side="left") + np.arange(positive.size)
    is_positive = np.zeros(negative.size + positive.size, dtype=bool)
    is_positive[positive_at] = True
    merged = np.empty(is_positive.size, dtype=negative.dtype)
    merged[positive_at] = positive
    merged[~is_positive] = negative
    return merged, is_positive


def _order_preserving_unit(sorted_scores: np.ndarray) -> np.ndarray:
    """Ascending float scores mapped into [0, 1] keeping their order and ties exactly.

    torchmetrics applies a sigmoid to scores outside [0, 1], which merges large scores
    (sigmoid(20) == sigmoid(21) in float32) and would change the AUROC. A min-max rescale in
    float64 keeps order and ties unless the range is extreme; that is checked, with dense
    ranks as the fallback.
    """
    low, high = np.float64(sorted_scores[0]), np.float64(sorted_scores[-1])
    if low >= 0.0 and high <= 1.0:
        return sorted_scores
    if low == high:
        return np.zeros(sorted_scores.size, dtype=np.float64)
    distinct = sorted_scores[1:] != sorted_scores[:-1]
    rescaled = (sorted_scores.astype(np.float64) - low) / (high - low)  # rounding is monotone
    if np.array_equal(distinct, rescaled[1:] != rescaled[:-1]):
        return rescaled
    dense_rank = np.zeros(sorted_scores.size, dtype=np.float64)
    np.cumsum(distinct, out=dense_rank[1:])
    return dense_rank / dense_rank[-1]


def _tie_group_ends(sorted_scores: np.ndarray) -> np.ndarray:
    """Index of the last element of each run of equal values in a sorted 1-D array."""
    change = np.flatnonzero(sorted_scores[1:] != sorted_scores[:-1])
    return np.append(change, sorted_scores.size - 1)


def _trapezoid_up_to(x: np.ndarray, y: np.ndarray, x_limit: float) -> float:
    """Trapezoid area under the curve (x nondecreasing from 0) from x[0] to x_limit.

    The curve is interpolated linearly at x_limit when no point lies exactly there.
    """
    stop = int(np.searchsorted(x, x_limit, side="right"))  # first point beyond the limit
    x_in, y_in = x[:stop], y[:stop]
    if stop < x.size and x_in[-1] < x_limit:
        x0, x1, y0, y1 = x[stop - 1], x[stop], y[stop - 1], y[stop]
        y_limit = y0 + (y1 - y0) * (x_limit - x0) / (x1 - x0)
        x_in, y_in = np.append(x_in, x_limit), np.append(y_in, y_limit)
    return float(np.sum(np.diff(x_in) * (y_in[1:] + y_in[:-1])) / 2.0)


def _as_scores(x: Any, name: str) -> np.ndarray:
    """Real-valued, finite numpy array or a ValueError naming `name`."""
    arr = to_numpy(x)
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_) or np.iscomplexobj(arr):
        raise ValueError(f"{name} must hold real numbers; got dtype {arr.dtype}")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite; found NaN or infinite values")
    return arr


def _as_binary(x: Any, name: str) -> np.ndarray:
    """Bool numpy array from bool or 0/1 input, or a ValueError naming `name`."""
    arr = to_numpy(x)
    if arr.dtype == np.bool_:
        return arr
    if not np.issubdtype(arr.dtype, np.number) or not np.all((arr == 0) | (arr == 1)):
        raise ValueError(f"{name} must be bool (or 0/1); got dtype {arr.dtype} with other values")
    return arr.astype(bool)


def _check_maps_and_masks(
    maps: Any, gt_masks: Any, foreground: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Validated (maps, gt_masks, foreground) as numpy, all of shape (N, H, W)."""
    maps_np = _as_scores(maps, "maps")
    gt_np = _as_binary(gt_masks, "gt_masks")
    if maps_np.ndim != 3 or gt_np.shape != maps_np.shape:
        raise ValueError(
            "expected maps and gt_masks of the same shape (N, H, W); "
            f"got maps {maps_np.shape} and gt_masks {gt_np.shape}"
        )
    fg_np = None
    if foreground is not None:
        fg_np = _as_binary(foreground, "foreground")
        if fg_np.shape != maps_np.shape:
            raise ValueError(
                f"expected foreground of shape {maps_np.shape} like maps; got {fg_np.shape}"
            )
    return maps_np, gt_np, fg_np


def _check_mask_pair(pred_masks: Any, gt_masks: Any, caller: str) -> tuple[np.ndarray, np.ndarray]:
    """Validated (pred_masks, gt_masks) as bool numpy arrays of one shape."""
    pred_np = _as_binary(pred_masks, "pred_masks")
    gt_np = _as_binary(gt_masks, "gt_masks")
    if pred_np.shape != gt_np.shape:
        raise ValueError(
            f"{caller} expects pred_masks and gt_masks of the same shape; "
            f"got {pred_np.shape} and {gt_np.shape}"
        )
    return pred_np, gt_np
