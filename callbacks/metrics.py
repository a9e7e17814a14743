"""AnomalyMetrics: collect validation/test predictions, set tau, compute and write the metrics.

Per evaluation item the callback keeps the score, the label, the anomaly_map resized (bilinear)
to the evaluation size as float32, gt_mask and foreground resized (nearest) to that size,
has_mask, index, subject and slice, all on the CPU: memory is set by the evaluation size and the
number of items, never by the input resolution. At epoch end it gathers the items of every DDP
rank, removes the duplicates that DistributedSampler pads with (same `index`), and computes:

* validation: tau = the `pl_module.tau_quantile` quantile of the NORMAL validation scores,
  stored by `pl_module.threshold` (`ImageThreshold`: a buffer, so checkpoints carry it);
  `val/<metric>` is logged.
* test: the stored tau is used as it is; `test/<metric>` is logged, and `metrics.json` (every key
  of docs/metrics.md, with the inputs the data module skipped and why) plus, with
  `save_predictions=True`, `predictions.npz` are written.

Pixel metrics use the items with a pixel-level gt_mask (`has_mask`) plus the normal items, and
are null when those hold no anomalous pixel. tau sees no anomalous data and is biased low: the
sensitivity/specificity actually achieved at tau are reported with it.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from pathoscope.batches import EvalBatch
from pathoscope.files import atomic_path, write_text
from pathoscope.metrics import (
    AREA_BINS,
    best_dice,
    dice_score,
    image_auroc,
    iou_score,
    pixel_auroc,
    pro_score,
    sensitivity_by_area,
)
from pathoscope.postprocess import ImageThreshold, pathological

__all__ = [
    "JSON_KEYS",
    "METRIC_KEYS",
    "AnomalyMetrics",
    "EvalData",
    "compute_metrics",
    "resolve_output_dir",
]

# Values logged as <stage>/<name>; metrics.json holds these plus the run description.
METRIC_KEYS = (
    "image_auroc",
    "pixel_auroc",
    "pro",
    "dice_best",
    "pixel_auroc_fg",
    "pro_fg",
    "tau",
    "sensitivity",
    "specificity",
    "dice_at_tau",
    "iou_at_tau",
    *(f"sensitivity_area_{name}" for name in AREA_BINS),
)
JSON_KEYS = (*METRIC_KEYS, "lesion_area_counts", "eval_size", "weights", "checkpoint")


@dataclass
class EvalData:
    """Predictions of one evaluation set, one row per item (N items, S_h x S_w = eval size)."""

    scores: np.ndarray  # (N,) float32
    labels: np.ndarray  # (N,) int64, 1 = pathological
    maps: np.ndarray  # (N, S_h, S_w) float32 anomaly_map
    gt_masks: np.ndarray  # (N, S_h, S_w) bool
    foreground: np.ndarray  # (N, S_h, S_w) bool
    has_mask: np.ndarray  # (N,) bool: gt_mask is pixel-level
    index: np.ndarray  # (N,) int64, position in the dataset
    subject: np.ndarray  # (N,) str
    slice: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def rows(self, keep: np.ndarray) -> EvalData:
        """The items selected by `keep` (bool mask or integer positions)."""
        return EvalData(**{f.name: getattr(self, f.name)[keep] for f in fields(self)})

    @property
    def pixel_items(self) -> np.ndarray:
        """(N,) bool: the items pixel metrics use (pixel-level gt_mask, or normal)."""
        return self.has_mask | (self.labels == 0)

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, f.name).nbytes for f in fields(self))


def compute_metrics(data: EvalData, tau: float | None, fpr_limit: float = 0.3) -> dict[str, Any]:
    """Every value of METRIC_KEYS for `data` (None where undefined).

    Image decisions are `pathological(score, tau)` (score >= tau) over all items; pixel decisions
    are `pathological(anomaly_map, tau)`,
    pooled over the pixel-metric items (EvalData.pixel_items). Threshold-based values are None
    when tau is None.
    """
    out: dict[str, Any] = dict.fromkeys(METRIC_KEYS)
    out["tau"] = tau
    out["image_auroc"] = image_auroc(data.scores, data.labels)
    if tau is not None:
        decision = pathological(data.scores, tau)
        positive = data.labels == 1
        if positive.any():
            out["sensitivity"] = float(np.mean(decision[positive]))
        if (~positive).any():
            out["specificity"] = float(np.mean(~decision[~positive]))
        out.update({f"sensitivity_area_{k}": v for k, (v, _) in _by_area(data, decision).items()})
    counts = _by_area(data, np.zeros(len(data), bool))
    out["lesion_area_counts"] = {k: n for k, (_, n) in counts.items()}

    pixel = data.pixel_items
    if pixel.all():  # no copy of the maps in the usual case
        maps, gt_masks, foreground = data.maps, data.gt_masks, data.foreground
    else:
        maps, gt_masks, foreground = data.maps[pixel], data.gt_masks[pixel], data.foreground[pixel]
    if not gt_masks.any():  # no anomalous pixel: every pixel metric is undefined
        return out
    out["pixel_auroc"] = pixel_auroc(maps, gt_masks)
    out["pro"] = pro_score(maps, gt_masks, fpr_limit=fpr_limit)
    out["dice_best"] = best_dice(maps, gt_masks)[0]
    out["pixel_auroc_fg"] = pixel_auroc(maps, gt_masks, foreground=foreground)
    out["pro_fg"] = pro_score(maps, gt_masks, fpr_limit=fpr_limit, foreground=foreground)
    if tau is not None:
        pred_masks = pathological(maps, tau)
        out["dice_at_tau"] = dice_score(pred_masks, gt_masks)
        out["iou_at_tau"] = iou_score(pred_masks, gt_masks)
    return out


def _by_area(data: EvalData, decision: np.ndarray) -> dict[str, tuple[float | None, int]]:
    """Sensitivity by lesion area (pathoscope.metrics.AREA_BINS) of the pixel-masked lesions."""
    keep = (data.labels == 1) & data.has_mask
    return sensitivity_by_area(decision[keep], data.gt_masks[keep], data.foreground[keep])


def resolve_output_dir(trainer: L.Trainer, output_dir: str | None) -> Path:
    """`output_dir`, else the trainer's log_dir, else its default_root_dir.

    Call it on every rank: `trainer.log_dir` is a collective (broadcast) under DDP.
    """
    if output_dir is not None:
        return Path(output_dir)
    log_dir = trainer.log_dir
    return Path(log_dir if log_dir is not None else trainer.default_root_dir)


class AnomalyMetrics(Callback):
    """Evaluation callback (module docstring): metrics, tau, metrics.json, predictions.npz.

    Args:
        eval_size: side of the square evaluation grid; None = the input image size.
        save_predictions: also write predictions.npz after the test.
        output_dir: folder of metrics.json / predictions.npz; None = trainer.log_dir (or
            default_root_dir).
        fpr_limit: PRO is integrated up to this false-positive rate (MVTec AD: 0.3).

    Needs `pl_module.threshold` (`ImageThreshold`), `pl_module.tau_quantile` (float), and
    validation/test steps that return {"score": (B,), "anomaly_map": (B, 1, H, W)} on the
    `pathoscope.batches.EvalBatch` of each step. After an epoch, `results[stage]` (EvalData) and
    `metrics[stage]` (dict) hold what was computed; stage is "val" or "test".
    """

    def __init__(
        self,
        eval_size: int | None = None,
        save_predictions: bool = False,
        output_dir: str | None = None,
        fpr_limit: float = 0.3,
    ) -> None:
        super().__init__()
        if eval_size is not None and eval_size < 1:
            raise ValueError(f"eval_size must be >= 1 or None; got {eval_size}")
        if not 0.0 < fpr_limit <= 1.0:
            raise ValueError(f"fpr_limit must be in (0, 1]; got {fpr_limit}")
        self.eval_size = eval_size
        self.save_predictions = save_predictions
        self.output_dir = output_dir
        self.fpr_limit = fpr_limit
        self.results: dict[str, EvalData] = {}
        self.metrics: dict[str, dict[str, Any]] = {}
        self.written: list[Path] = []  # files of the last test
        self._reset()

    # -- collection ---------------------------------------------------------------------------------
    def _reset(self) -> None:
        self._eval_hw: tuple[int, int] | None = None
        self._buffers: dict[str, list[np.ndarray]] = {f.name: [] for f in fields(EvalData)}

    @property
    def buffer_nbytes(self) -> int:
        """Bytes held by the items collected so far in the current epoch."""
        return sum(a.nbytes for parts in self._buffers.values() for a in parts)

    def _collect(self, outputs: Any, batch: Any, dataloader_idx: int) -> None:
        if dataloader_idx != 0:
            raise ValueError(
                "AnomalyMetrics supports one validation/test dataloader; "
                f"got dataloader_idx {dataloader_idx}"
            )
        if not isinstance(outputs, Mapping) or not {"score", "anomaly_map"} <= outputs.keys():
            raise ValueError(
                "AnomalyMetrics: the validation/test step must return a dict with 'score' (B,) and "
                f"'anomaly_map' (B, 1, H, W); got {type(outputs).__name__}"
            )
        if not isinstance(batch, EvalBatch):
            raise ValueError(
                "AnomalyMetrics: the batch must be a pathoscope.batches.EvalBatch (a loader with "
                f"collate_fn=EvalBatch.collate); got {type(batch).__name__}"
            )
        maps = outputs["anomaly_map"].detach()
        if maps.ndim == 3:
            maps = maps[:, None]
        if maps.ndim != 4 or maps.shape[1] != 1:
            raise ValueError(
                f"AnomalyMetrics: expected anomaly_map (B, 1, H, W); got {tuple(maps.shape)}"
            )
        if self._eval_hw is None:
            input_hw = batch.image.shape[-2:]
            size = self.eval_size
            self._eval_hw = (
                (size, size) if size is not None else (int(input_hw[0]), int(input_hw[1]))
            )
        hw = self._eval_hw
        b = maps.shape[0]
        buf = self._buffers
        # Resize on the model's device; only eval-size copies reach the CPU buffers.
        buf["maps"].append(_resize_map(maps, hw).cpu().numpy())
        buf["gt_masks"].append(_resize_mask(_as_4d(batch.gt_mask), hw).cpu().numpy())
        buf["foreground"].append(_resize_mask(_as_4d(batch.foreground), hw).cpu().numpy())
        buf["scores"].append(_per_item(outputs["score"], b, torch.float32).numpy())
        buf["labels"].append(_per_item(batch.label, b, torch.int64).numpy())
        buf["has_mask"].append(_per_item(batch.has_mask, b, torch.bool).numpy())
        buf["index"].append(_per_item(batch.index, b, torch.int64).numpy())
        buf["slice"].append(_per_item(batch.slice, b, torch.int64).numpy())
        subjects = batch.subject
        subjects = [subjects] if isinstance(subjects, str) else [str(s) for s in subjects]
        if len(subjects) != b:
            raise ValueError(f"AnomalyMetrics: {len(subjects)} subjects for a batch of {b} maps")
        buf["subject"].append(np.asarray(subjects, dtype=str))

    def _finish(self, trainer: L.Trainer, pl_module: L.LightningModule) -> EvalData | None:
        """This epoch's items of all ranks, one per index, sorted by index (None if no item)."""
        buf = self._buffers
        hw = self._eval_hw or (0, 0)
        n_local = sum(len(a) for a in buf["scores"])
        world_size = int(getattr(trainer, "world_size", 1))
        if world_size > 1:
            meta = pl_module.all_gather(torch.tensor([n_local, hw[0], hw[1]]))  # (world, 3)
            meta = meta.reshape(world_size, 3).cpu()
            counts = [int(n) for n in meta[:, 0]]
            present = meta[meta[:, 0] > 0]
            if present.numel():  # a rank without items does not know the size
                hw = (int(present[0, 1]), int(present[0, 2]))
                if not bool((present[:, 1:] == present[0, 1:]).all()):
                    raise ValueError(f"AnomalyMetrics: ranks collected different sizes {meta}")
        else:
            counts = [n_local]
        if sum(counts) == 0:
            return None

        empty_shapes = {"maps": (0, *hw), "gt_masks": (0, *hw), "foreground": (0, *hw)}
        dtypes = {
            "scores": np.float32,
            "labels": np.int64,
            "maps": np.float32,
            "gt_masks": np.bool_,
            "foreground": np.bool_,
            "has_mask": np.bool_,
            "index": np.int64,
            "subject": str,
            "slice": np.int64,
        }
        local = {
            name: np.concatenate(parts)
            if parts
            else np.zeros(empty_shapes.get(name, (0,)), dtype=dtypes[name])
            for name, parts in buf.items()
        }
        self._reset()  # free the per-batch parts
        if world_size > 1:
            for name, array in local.items():
                if name == "subject":
                    local[name] = _gather_strings(array, world_size)
                else:
                    local[name] = _gather_rows(array, counts, pl_module)
        data = EvalData(**local)
        # DistributedSampler pads with repeats of the first items: keep one row per index.
        _, first = np.unique(data.index, return_index=True)  # sorted by index
        return data.rows(first)

    # -- hooks ----------------------------------------------------------------------------------------
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset()
        if not trainer.sanity_checking:
            self.results.pop("val", None)
            self.metrics.pop("val", None)

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset()
        self.results.pop("test", None)
        self.metrics.pop("test", None)
        self.written = []

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if trainer.sanity_checking:  # a few batches only: no tau, no metrics
            return
        self._collect(outputs, batch, dataloader_idx)

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._collect(outputs, batch, dataloader_idx)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        data = self._finish(trainer, pl_module)
        if data is None:
            warnings.warn("AnomalyMetrics: no validation items; tau is unchanged", stacklevel=2)
            return
        tau = _threshold(pl_module).fit(data.scores, data.labels, float(pl_module.tau_quantile))
        if tau is None:
            warnings.warn(
                "AnomalyMetrics: no normal validation item; tau is left unset (NaN)", stacklevel=2
            )
        self._evaluate("val", data, trainer, pl_module)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        data = self._finish(trainer, pl_module)
        if data is None:
            warnings.warn("AnomalyMetrics: no test items; nothing written", stacklevel=2)
            return
        metrics = self._evaluate("test", data, trainer, pl_module)
        eval_size: int | list[int] = (
            data.maps.shape[1]
            if data.maps.shape[1] == data.maps.shape[2]
            else list(data.maps.shape[1:])
        )
        report = {
            **metrics,
            "eval_size": eval_size,
            "weights": getattr(pl_module, "weights_tag", None),
            "checkpoint": "last",  # never a checkpoint selected on test labels
            **_skipped_inputs(trainer),
        }
        self.metrics["test"] = report
        out_dir = resolve_output_dir(trainer, self.output_dir)  # on every rank (collective)
        if not trainer.is_global_zero:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        metrics_path = out_dir / "metrics.json"
        write_text(metrics_path, json.dumps(report, indent=2, allow_nan=False) + "\n")
        self.written.append(metrics_path)
        if self.save_predictions:
            predictions_path = out_dir / "predictions.npz"
            tau = report["tau"]
            with atomic_path(predictions_path) as tmp:
                np.savez(
                    tmp,
                    **{f.name: getattr(data, f.name) for f in fields(data)},
                    tau=np.float64(np.nan if tau is None else tau),
                )
            self.written.append(predictions_path)

    def _evaluate(
        self, stage: str, data: EvalData, trainer: L.Trainer, pl_module: L.LightningModule
    ) -> dict[str, Any]:
        tau = _threshold(pl_module).value  # the stored (float32) value is the one used
        if tau is None and stage == "test":
            warnings.warn(
                "AnomalyMetrics: tau is unset (no validation ran and the checkpoint has "
                "none); tau, sensitivity, specificity, dice_at_tau and iou_at_tau are null",
                stacklevel=2,
            )
        metrics = compute_metrics(data, tau, self.fpr_limit)
        self.results[stage] = data
        self.metrics[stage] = metrics
        logged = {f"{stage}/{k}": float(metrics[k]) for k in METRIC_KEYS if metrics[k] is not None}
        if logged:
            # Every rank holds the same gathered values; syncing them changes nothing.
            pl_module.log_dict(logged, sync_dist=True)
        return metrics


def _skipped_inputs(trainer: L.Trainer) -> dict[str, dict[str, str]]:
    """{"skipped_subjects" (or "_images"): {name: reason}} of the data module's split: the bad
    inputs of the data root that the results were made without ({} for a plain data module)."""
    datamodule = getattr(trainer, "datamodule", None)
    skipped = getattr(datamodule, "skipped", None)
    return {} if skipped is None else {datamodule.skipped_key: dict(sorted(skipped.items()))}


def _threshold(pl_module: L.LightningModule) -> ImageThreshold:
    threshold = getattr(pl_module, "threshold", None)
    if not isinstance(threshold, ImageThreshold):
        raise TypeError(
            "AnomalyMetrics needs pl_module.threshold, a pathoscope.postprocess.ImageThreshold "
            f"(as PathoScope has); got {type(threshold).__name__}"
        )
    return threshold


def _as_4d(mask: Any) -> Tensor:
    """(B, H, W) or (B, 1, H, W) -> (B, 1, H, W) tensor."""
    mask = torch.as_tensor(mask)
    return mask[:, None] if mask.ndim == 3 else mask


def _resize_map(maps: Tensor, hw: tuple[int, int]) -> Tensor:
    """(B, 1, H, W) -> (B, S_h, S_w) float32, bilinear (antialiased when shrinking)."""
    maps = maps.float()
    if tuple(maps.shape[-2:]) != hw:
        maps = F.interpolate(maps, size=hw, mode="bilinear", align_corners=False, antialias=True)
    return maps[:, 0].contiguous()


def _resize_mask(mask: Tensor, hw: tuple[int, int]) -> Tensor:
    """(B, 1, H, W) bool/0-1 -> (B, S_h, S_w) bool, nearest (pixel centres)."""
    if tuple(mask.shape[-2:]) != hw:
        mask = F.interpolate(mask.float(), size=hw, mode="nearest-exact") > 0.5
    return mask[:, 0].bool().contiguous()


def _per_item(values: Any, b: int, dtype: torch.dtype) -> Tensor:
    """One value per item as a CPU tensor (B,)."""
    t = torch.as_tensor(values).detach().reshape(-1).to("cpu", dtype)
    if t.numel() != b:
        raise ValueError(f"AnomalyMetrics: expected {b} values per batch; got {t.numel()}")
    return t


def _gather_rows(array: np.ndarray, counts: list[int], pl_module: L.LightningModule) -> np.ndarray:
    """Every rank's rows, concatenated in rank order.

    all_gather needs one shape on every rank: rows are padded to the largest count, and bool goes
    as uint8 (gloo has no bool).
    """
    n_max = max(counts)
    t = torch.from_numpy(np.ascontiguousarray(array))
    is_bool = t.dtype == torch.bool
    if is_bool:
        t = t.to(torch.uint8)
    if t.shape[0] < n_max:
        t = torch.cat([t, t.new_zeros((n_max - t.shape[0], *t.shape[1:]))])
    gathered = pl_module.all_gather(t).cpu()  # (world, n_max, ...)
    out = torch.cat([gathered[r, :c] for r, c in enumerate(counts)])
    return out.bool().numpy() if is_bool else out.numpy()


def _gather_strings(array: np.ndarray, world_size: int) -> np.ndarray:
    """Every rank's strings, concatenated in rank order (all_gather_object: tensors cannot)."""
    parts: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(parts, array.tolist())
    return np.asarray([s for part in parts for s in part], dtype=str)
