"""Section 1: inference GMAC per image (torch.utils.flop_counter; MAC = FLOP / 2) of the folded
detector as shipped, the unfolded model, and the backbone's share."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from pathoscope.app.bench.common import Row, Sizes
from pathoscope.folded import FoldedDetector
from pathoscope.torch_model import PathoScopeModel

GMAC_TARGET = 2.25  # per 256x256 image, folded


def count_gmac(fn: Callable[[], object]) -> float:
    """Multiply-accumulates (1e9) of one call, counted by torch.utils.flop_counter (FLOP / 2)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 2e9


def bench_flops(
    model: PathoScopeModel, folded: FoldedDetector, sizes: Sizes
) -> tuple[list[Row], dict[str, Any]]:
    s = sizes.image_size
    x = torch.randn(1, 3, s, s)
    with torch.inference_mode():
        gmac = {
            "folded": count_gmac(lambda: folded(x)),
            "unfolded": count_gmac(lambda: model(x)),
            "backbone": count_gmac(lambda: model.backbone(x)),
            "trunk": count_gmac(lambda: model.backbone.net(x)),
        }
    target = GMAC_TARGET * (s / 256) ** 2
    share = gmac["backbone"] / gmac["folded"]
    rows = [
        Row(
            "1a",
            f"inference GMAC/image {s}px, folded (as shipped)",
            gmac["folded"],
            "GMAC",
            target=f"<= {target:.3g}",
            passed=gmac["folded"] <= target,
        ),
        Row("1b", "inference GMAC/image, unfolded model", gmac["unfolded"], "GMAC"),
        Row("1c", "backbone GMAC/image (share of folded)", gmac["backbone"], f"GMAC ({share:.0%})"),
    ]
    raw = {**{f"gmac_{k}": v for k, v in gmac.items()}, "gflop_folded": 2 * gmac["folded"]}
    raw["gflop_unfolded"] = 2 * gmac["unfolded"]
    raw["backbone_share"] = share
    return rows, raw
