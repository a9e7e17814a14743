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
        return grid_linear(e, self.linear) if e.dim() == 4 else self.linear(e)


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
        return hidden_stats(self.fc1(v.reshape(-1, v.shape[-1])))

    def fc1_grid(self, v: Tensor) -> Tensor:
        """fc1 of every position of a grid v (N, h, w, C), as rows (N h w, hidden) in v's order.

        The same products as `fc1(v.reshape(-1, C))`, by `grid_linear`.
        """
        return grid_linear(v, self.fc1).reshape(-1, self.fc1.out_features)

    def head(self, h: Tensor) -> Tensor:
        """Logits (N,) of fc1's output h (N, hidden): BatchNorm as the mode says, LeakyReLU, fc2.
        `forward(v)` is `head(fc1(v))`; a caller that already has fc1(v) saves that product."""
        return self.fc2(self.act(self.bn(h)))[:, 0]

    def forward(self, v: Tensor, bn_stats: tuple[Tensor, Tensor] | None = None) -> Tensor:
        shape = v.shape[:-1]
        flat = v.reshape(-1, v.shape[-1])
        if bn_stats is None:
            return self.head(self.fc1(flat)).reshape(shape)
        # BatchNorm with fixed statistics is an affine map, folded into fc1: the same function,
        # and its backward is one matrix product (F.batch_norm's eval-mode backward costs a
        # third of PiEG's time on CPU).
        mean, var = bn_stats
        scale = self.bn.weight * torch.rsqrt(var + self.bn.eps)  # (hidden,)
        weight = self.fc1.weight * scale[:, None]  # (hidden, C)
        bias = (self.fc1.bias - mean) * scale + self.bn.bias
        return self.fc2(self.act(F.linear(flat, weight, bias))).reshape(shape)


def grid_linear(v: Tensor, layer: nn.Linear) -> Tensor:
    """`layer` at every position of a grid v (N, h, w, C) -> (N, h, w, out).

    The same products as `layer(v)`, computed as one 1x1 convolution of v's channels_last view:
    on CPU, oneDNN runs it (forward and backward) at up to twice the rate of the row matrix
    product for a training batch's shapes (BENCHMARKS.md, runs G and H).
    """
    y = F.conv2d(v.permute(0, 3, 1, 2), layer.weight[:, :, None, None], layer.bias)
    return y.permute(0, 2, 3, 1)


def hidden_stats(h: Tensor) -> tuple[Tensor, Tensor]:
    """(mean, biased variance) over the rows of fc1's output h (N, hidden), as BatchNorm takes
    them in training mode."""
    mean = h.mean(0)
    return mean, (h - mean).square_().mean(0)  # two passes: half of torch.var_mean's time on CPU
