"""Section 4: the greedy coreset of N backbone features down to the bank size: time and memory.
Its anchors are also the training section's bank."""

from __future__ import annotations

import gc
import math
import time
from typing import Any

import torch
from torch import Tensor

from pathoscope.anchor_bank import greedy_coreset
from pathoscope.app.bench.common import Row, RssSampler, Sizes
from pathoscope.feature_grid import FEATURE_STRIDE
from pathoscope.torch_model import PathoScopeModel

CORESET_SECONDS = 30.0


def backbone_features(
    model: PathoScopeModel, dm: Any, n: int, chunk: int = 8
) -> tuple[Tensor, Tensor, int]:
    """First n backbone features (n, C) of the datamodule's anchor images (K shots + augmented
    copies, as the bank is built), the rest as held-out features, and the number of copies."""
    grid = (dm.image_size // FEATURE_STRIDE) ** 2
    copies = max(1, math.ceil((n + grid) / (dm.shots * grid)) - 1)  # a few held out beyond n
    images = dm.anchor_images(copies=copies, seed=0).image
    feats = []
    with torch.inference_mode():
        for part in images.split(chunk):
            e = model.backbone(part)  # (b, C, h, w)
            feats.append(e.permute(0, 2, 3, 1).reshape(-1, e.shape[1]))
    all_feats = torch.cat(feats)
    return all_feats[:n].clone(), all_feats[n:].clone(), copies


def bench_coreset(
    model: PathoScopeModel, dm: Any, sizes: Sizes
) -> tuple[list[Row], dict[str, Any], Tensor, Tensor]:
    feats, heldout, copies = backbone_features(model, dm, sizes.coreset_features)
    n = min(sizes.anchors, feats.shape[0])
    gc.collect()
    with RssSampler() as rss:
        start = time.perf_counter()
        idx = greedy_coreset(feats, n, generator=torch.Generator().manual_seed(0))
        seconds = time.perf_counter() - start
    source = (
        f"backbone features (random-init ResNet18) of {dm.shots} synthetic BraTS slices + "
        f"{copies} augmented copies each (anchor_images), {dm.image_size}px"
    )
    label = f"coreset {feats.shape[0]} x {feats.shape[1]} -> {n} anchors"
    rows = [
        Row(
            "4a",
            label,
            seconds,
            "s",
            target=f"<= {CORESET_SECONDS:g}",
            passed=seconds <= CORESET_SECONDS,
        ),
        Row("4b", "coreset memory: peak RSS increase", rss.increase_mb, "MiB"),
        Row("4c", "coreset input features", feats.numel() * 4 / 2**20, "MiB"),
    ]
    raw = {
        "seconds": seconds,
        "features": list(feats.shape),
        "anchors": n,
        "features_source": source,
        "rss_increase_mib": rss.increase_mb,
        "threads_outside_loop": torch.get_num_threads(),
    }
    return rows, raw, feats[idx], heldout
