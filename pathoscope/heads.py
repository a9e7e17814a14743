"""Feature adapter f and discriminator D (paper Section 2.1), per position on the feature grid."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Adapter(nn.Module):
    """Per-position linear map C -> C, initialised as the identity.

    Starting at the identity keeps anchor distances meaningful from step 0: the bank is built from
    backbone features, and f(e) = e before training. Input/output: (..., C).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        with torch.no_grad():
            self.linear.weight.copy_(torch.eye(dim))
            self.linear.bias.zero_()

    def forward(self, e: Tensor) -> Tensor:
        return self.linear(e)


class Discriminator(nn.Module):
    """Linear C -> hidden, BatchNorm1d, LeakyReLU(0.2), Linear hidden -> 1.

    `forward` returns logits (...,); the pathology score is sigmoid(logits), applied by the caller, so
    that the BCE and focal losses can use the numerically stable logit forms.
    With `bn_stats=(mean, var)` BatchNorm normalises with those fixed statistics and updates nothing:
    PiEG uses this to ascend on D without touching its running statistics.
    """

    def __init__(self, dim: int, hidden: int = 1024, negative_slope: float = 0.2) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.act = nn.LeakyReLU(negative_slope)
        self.fc2 = nn.Linear(hidden, 1)
        nn.init.xavier_normal_(self.fc1.weight)
        nn.init.xavier_normal_(self.fc2.weight)
        nn.init.zeros_(self.fc1.bias)
        nn.init.zeros_(self.fc2.bias)

    def batch_stats(self, v: Tensor) -> tuple[Tensor, Tensor]:
        """BatchNorm's batch mean and (biased) variance of fc1(v) over all positions of v (..., C)."""
        h = self.fc1(v.reshape(-1, v.shape[-1]))
        return h.mean(0), h.var(0, unbiased=False)

    def forward(self, v: Tensor, bn_stats: tuple[Tensor, Tensor] | None = None) -> Tensor:
        shape = v.shape[:-1]
        h = self.fc1(v.reshape(-1, v.shape[-1]))  # (N, hidden)
        if bn_stats is None:
            h = self.bn(h)
        else:
            mean, var = bn_stats
            h = F.batch_norm(h, mean, var, self.bn.weight, self.bn.bias, False, 0.0, self.bn.eps)
        return self.fc2(self.act(h)).reshape(shape)
