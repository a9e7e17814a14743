"""Section 2: throughput of the shipped path (the folded detector: image -> blurred map + score)
vs the bare ResNet18 trunk up to layer 3 in the same memory format (channels_last), and vs the
bare timm trunk as timm gives it (eager NCHW)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import timm
import torch

from pathoscope.app.bench.common import Row, Sizes, interleaved, median_spread, paired_ratios
from pathoscope.folded import CHANNELS_LAST, FoldedDetector
from pathoscope.torch_model import PathoScopeModel

THROUGHPUT_VS_SAME_FORMAT = 0.78
THROUGHPUT_VS_TIMM = 1.0


def bench_inference(
    model: PathoScopeModel, folded: FoldedDetector, sizes: Sizes
) -> tuple[list[Row], dict[str, Any]]:
    b, s = sizes.infer_batch, sizes.image_size
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, 3, s, s, generator=gen)  # NCHW, as a dataloader gives it
    foreground = torch.rand(b, 1, s, s, generator=gen) > 0.3
    trunk_cl = copy.deepcopy(model.backbone.net).eval().to(memory_format=CHANNELS_LAST)
    trunk_timm = timm.create_model(
        "resnet18", pretrained=False, features_only=True, out_indices=(2, 3)
    ).eval()
    trunk_timm.load_state_dict(model.backbone.net.state_dict())
    variants: dict[str, Callable[[], object]] = {
        "pathoscope": lambda: folded(x, foreground),
        "trunk_channels_last": lambda: trunk_cl(x.contiguous(memory_format=CHANNELS_LAST)),
        "trunk_timm_nchw": lambda: trunk_timm(x),
        "model_unfolded_nchw": lambda: model(x, foreground),
    }
    with torch.inference_mode():
        times = interleaved(variants, sizes.infer_rounds)
    ours = times["pathoscope"]
    same = paired_ratios(times["trunk_channels_last"], ours)  # throughput ratio = time ratio^-1
    timm_ratio = paired_ratios(times["trunk_timm_nchw"], ours)
    unfolded = paired_ratios(times["trunk_timm_nchw"], times["model_unfolded_nchw"])
    rows = []
    for key, label, vals, target in [
        (
            "2a",
            "throughput vs bare trunk, same format (channels_last)",
            same,
            THROUGHPUT_VS_SAME_FORMAT,
        ),
        ("2b", "throughput vs bare timm trunk (eager NCHW)", timm_ratio, THROUGHPUT_VS_TIMM),
    ]:
        med, spread = median_spread(vals)
        rows.append(Row(key, label, med, "x", spread, f">= {target}", med >= target))
    med, spread = median_spread(unfolded)
    rows.append(Row("2c", "unfolded model (eager NCHW) vs bare timm trunk", med, "x", spread))
    for name, ts in times.items():
        med, spread = median_spread([b / t for t in ts])
        rows.append(Row("2.", f"images/s: {name}", med, "img/s", spread))
    raw = {
        "seconds_per_batch": times,
        "batch": b,
        "image_size": s,
        "threads": torch.get_num_threads(),
    }
    return rows, raw
