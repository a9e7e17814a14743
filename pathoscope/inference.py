"""The shipped inference path: adapter and BatchNorm folded exactly into D's first layer.

At inference the adapter (linear) and BatchNorm (fixed statistics) are affine maps, so
fc1(BN(adapter(e))) is one linear map: 2.23 instead of 2.39 GMAC per 256x256 image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pathoscope.backbone import Backbone
from pathoscope.heads import Adapter, Discriminator


def fold_heads(
    adapter: Adapter, discriminator: Discriminator
) -> tuple[nn.Conv2d, nn.Conv2d, float]:
    """Return (first 1x1 conv C -> hidden, second 1x1 conv hidden -> 1, LeakyReLU slope)."""
    wa, ba = adapter.linear.weight.detach().double(), adapter.linear.bias.detach().double()
    w1, b1 = discriminator.fc1.weight.detach().double(), discriminator.fc1.bias.detach().double()
    bn = discriminator.bn
    scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)  # (hidden,)
    w = scale[:, None] * (w1 @ wa)  # (hidden, C)
    b = scale * (w1 @ ba + b1 - bn.running_mean.double()) + bn.bias.detach().double()
    first = nn.Conv2d(w.shape[1], w.shape[0], 1)
    first.weight.data.copy_(w[:, :, None, None].float())
    first.bias.data.copy_(b.float())
    second = nn.Conv2d(w.shape[0], 1, 1)
    second.weight.data.copy_(discriminator.fc2.weight.detach()[:, :, None, None])
    second.bias.data.copy_(discriminator.fc2.bias.detach())
    return first, second, float(discriminator.act.negative_slope)


class FoldedDetector(nn.Module):
    """Image (B, 3, H, W) [+ foreground (B, 1, H, W)] -> (score (B,), anomaly_map (B, 1, H, W)).

    Same maps as `PathoScope.forward` in eval mode (within float rounding), fewer operations.
    """

    def __init__(
        self, backbone: Backbone, adapter: Adapter, discriminator: Discriminator, blur: nn.Module
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head1, self.head2, self.negative_slope = fold_heads(adapter, discriminator)
        self.blur = blur
        self.eval()

    @classmethod
    def from_model(cls, model: nn.Module) -> FoldedDetector:
        if getattr(model.hparams, "score_source", "discriminator") != "discriminator":
            raise ValueError("FoldedDetector: only the discriminator score can be folded")
        return cls(model.backbone, model.adapter, model.discriminator, model.blur)

    def forward(self, x: Tensor, foreground: Tensor | None = None) -> tuple[Tensor, Tensor]:
        e = self.backbone(x)  # (B, C, h, w)
        h = F.leaky_relu(self.head1(e), self.negative_slope)
        s = torch.sigmoid(self.head2(h))  # (B, 1, h, w)
        m = self.blur(F.interpolate(s, size=x.shape[-2:], mode="bilinear", align_corners=False))
        flat = m.flatten(1)
        if foreground is None:
            score = flat.amax(1)
        else:
            fg = foreground.flatten(1) > 0
            fg = fg | ~fg.any(1, keepdim=True)
            score = flat.masked_fill(~fg, float("-inf")).amax(1)
        return score, m
