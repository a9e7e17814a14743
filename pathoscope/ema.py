"""Exponential moving average of the trained weights (the adapter's and the discriminator's).

The discriminator's map on unseen anatomy moves noticeably from one step to the next (few shots,
random lesions every batch); evaluating an average of the recent weights instead of the last ones
removes most of that step-to-step noise at no inference cost. Plain torch, no Lightning.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn


class WeightEMA:
    """A shadow copy of the floating-point tensors (parameters and buffers) of some modules.

    `update()` after each optimiser step moves the shadow towards the current values with weight
    1 - d, d = min(decay, (1 + n) / (10 + n)) at the n-th update (a short warm-up, so the shadow
    does not stay near the initial weights); `swap()` exchanges shadow and current values in place
    (call it twice to undo). Integer buffers (BatchNorm's counter) are left alone.
    """

    def __init__(self, modules: Mapping[str, nn.Module], decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self._live = {
            f"{prefix}.{name}": t
            for prefix, module in modules.items()
            for name, t in module.state_dict(keep_vars=True).items()
            if t.is_floating_point()
        }
        self.shadow = {k: t.detach().clone() for k, t in self._live.items()}

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        d = min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))
        for k, t in self._live.items():
            self.shadow[k].lerp_(t.detach(), 1.0 - d)

    @torch.no_grad()
    def swap(self) -> None:
        for k, t in self._live.items():
            tmp = t.detach().clone()
            t.detach().copy_(self.shadow[k])
            self.shadow[k].copy_(tmp)

    def state_dict(self) -> dict[str, Tensor | int]:
        return {"updates": self.updates, **{k: v.clone() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: Mapping[str, Tensor | int]) -> None:
        self.updates = int(state["updates"])
        for k in self.shadow:
            self.shadow[k].copy_(state[k])
