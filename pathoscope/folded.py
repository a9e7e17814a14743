"""The folded detector, the shipped inference path: adapter and BatchNorm folded into D's first layer.

At inference the adapter (linear) and BatchNorm (fixed statistics) are affine maps, so
fc1(BN(adapter(e))) is one linear map: 2.24 instead of 2.39 GMAC per 256x256 image. The rest is
the same computation as `PathoScopeModel.forward`, arranged for speed (see `make bench`):
  - the backbone is a copy with each convolution's BatchNorm folded into it, in channels_last
    (the input is converted once), which oneDNN's convolutions run fastest on CPU;
  - the heads are two matrix products on the (B*h*w, C) view of the channels_last features;
  - upsampling and Gaussian blur are linear and separable, so they are applied as one
    (H, h) and one (W, w) matrix per axis, built by running the model's own blur on unit vectors.
Every step is exact up to float rounding: maps equal the model's within 1e-5 (tested).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from pathoscope.backbone import Backbone
from pathoscope.heads import Adapter, Discriminator
from pathoscope.postprocess import GaussianBlur, image_score

CHANNELS_LAST = torch.channels_last


def fold_heads(
    adapter: Adapter, discriminator: Discriminator
) -> tuple[nn.Linear, nn.Linear, float]:
    """Return (first linear C -> hidden, second linear hidden -> 1, LeakyReLU slope)."""
    wa, ba = adapter.linear.weight.detach().double(), adapter.linear.bias.detach().double()
    w1, b1 = discriminator.fc1.weight.detach().double(), discriminator.fc1.bias.detach().double()
    bn = discriminator.bn
    scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)  # (hidden,)
    w = scale[:, None] * (w1 @ wa)  # (hidden, C)
    b = scale * (w1 @ ba + b1 - bn.running_mean.double()) + bn.bias.detach().double()
    first = nn.Linear(w.shape[1], w.shape[0])
    first.weight.data.copy_(w.float())
    first.bias.data.copy_(b.float())
    second = nn.Linear(w.shape[0], 1)
    second.weight.data.copy_(discriminator.fc2.weight.detach())
    second.bias.data.copy_(discriminator.fc2.bias.detach())
    return first, second, float(discriminator.act.negative_slope)


def fuse_conv_bn(net: nn.Module) -> int:
    """Fold each eval-mode BatchNorm2d into the Conv2d that feeds it, in place; returns the count.

    Pairs are found by name (timm/torchvision ResNets: `convN` + `bnN` in one module, and
    `Sequential(conv, bn)` for the downsample paths); the folded BatchNorm becomes an Identity.
    """
    fused = 0
    for module in list(net.modules()):
        children = dict(module.named_children())
        if isinstance(module, nn.Sequential):
            pairs = [(a, b) for a, b in zip(list(children), list(children)[1:], strict=False)]
        else:
            pairs = [(n, "bn" + n[4:]) for n in children if n.startswith("conv")]
        for conv_name, bn_name in pairs:
            conv, bn = children.get(conv_name), children.get(bn_name)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                setattr(module, conv_name, fuse_conv_bn_eval(conv.eval(), bn.eval()))
                setattr(module, bn_name, nn.Identity())
                fused += 1
    return fused


def inference_backbone(backbone: Backbone, fuse: bool = True) -> Backbone:
    """A frozen copy of `backbone` with BatchNorm folded into its convolutions, in channels_last.

    The copy is checked against the original on a random image; if folding changed its output
    (a network whose BatchNorm does not directly follow its convolution), the unfolded copy is used.
    """
    fast = copy.deepcopy(backbone).eval()
    if fuse and fuse_conv_bn(fast.net):
        probe = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ref = backbone(probe.to(_device_of(backbone)))
            out = fast(probe.to(_device_of(fast)))
        if not torch.allclose(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max())):
            fast = copy.deepcopy(backbone).eval()
    for p in fast.parameters():
        p.requires_grad_(False)
    return fast.to(memory_format=CHANNELS_LAST)


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


class FoldedDetector(nn.Module):
    """Image (B, 3, H, W) [+ foreground (B, 1, H, W)] -> (score (B,), anomaly_map (B, 1, H, W)).

    Same maps as `PathoScopeModel.forward` in eval mode (within float rounding), fewer operations.
    Holds its own (folded, channels_last) copy of the backbone; the model is left untouched.
    """

    def __init__(
        self, backbone: Backbone, adapter: Adapter, discriminator: Discriminator, blur: nn.Module
    ) -> None:
        super().__init__()
        self.backbone = inference_backbone(backbone)
        self.head1, self.head2, self.negative_slope = fold_heads(adapter, discriminator)
        self.head1.to(_device_of(self.backbone))
        self.head2.to(_device_of(self.backbone))
        for p in self.parameters():
            p.requires_grad_(False)
        self.blur = blur
        self.eval()

    @classmethod
    def from_model(cls, model: nn.Module) -> FoldedDetector:
        """The folded detector of a `PathoScopeModel`'s current weights (built without a Trainer)."""
        if model.hp.scoring.source != "discriminator":
            raise ValueError("FoldedDetector: only the discriminator score can be folded")
        return cls(model.backbone, model.adapter, model.discriminator, model.blur)

    def patch_scores(self, x: Tensor) -> Tensor:
        """x (B, 3, H, W) -> sigmoid(D(f(E(x)))) on the feature grid, (B, h, w)."""
        e = self.backbone(x.contiguous(memory_format=CHANNELS_LAST))  # (B, C, h, w) channels_last
        # The two linear layers as 1x1 convolutions of the channels_last grid: the same products,
        # run by the convolution kernels that run the trunk. On this project's CPU (oneDNN) that
        # is twice the rate of the plain matrix product of (B h w, C) rows (BENCHMARKS.md, run G).
        w1, w2 = self.head1.weight[:, :, None, None], self.head2.weight[:, :, None, None]
        hidden = F.leaky_relu_(F.conv2d(e, w1, self.head1.bias), self.negative_slope)
        return torch.sigmoid(F.conv2d(hidden, w2, self.head2.bias))[:, 0]  # (B, h, w)

    def upsample_blur(self, s: Tensor, size: tuple[int, int]) -> Tensor:
        """s (B, h, w) -> blur(bilinear upsample(s)) (B, 1, H, W), as `postprocess.anomaly_map`."""
        if not isinstance(self.blur, GaussianBlur | nn.Identity):  # unknown blur: apply it as is
            up = F.interpolate(s[:, None], size=size, mode="bilinear", align_corners=False)
            return self.blur(up)
        rows = self._axis_operator(s.shape[1], size[0], s)  # (H, h)
        cols = self._axis_operator(s.shape[2], size[1], s)  # (W, w)
        return torch.matmul(torch.matmul(rows, s), cols.T)[:, None]  # (B, 1, H, W)

    def _axis_operator(self, n_in: int, n_out: int, like: Tensor) -> Tensor:
        """(n_out, n_in) matrix of upsample-then-blur along one axis: the model's own operations
        applied to the n_in unit vectors laid along that axis (the other axis has length 1)."""
        eye = torch.eye(n_in, dtype=like.dtype, device=like.device)[:, None, :, None]
        up = F.interpolate(eye, size=(n_out, 1), mode="bilinear", align_corners=False)
        return self.blur(up)[:, 0, :, 0].T  # (n_out, n_in)

    def forward(self, x: Tensor, foreground: Tensor | None = None) -> tuple[Tensor, Tensor]:
        s = self.patch_scores(x)  # (B, h, w)
        m = self.upsample_blur(s, (x.shape[-2], x.shape[-1]))  # (B, 1, H, W)
        return image_score(m, foreground), m


def inference_net(model: nn.Module) -> nn.Module:
    """The fastest exact inference path of a `PathoScopeModel`: its folded detector when it scores
    with D, else the model itself (the anchor-distance score needs the bank's search).

    Both map (image (B, 3, S, S), foreground (B, 1, S, S)) -> (score (B,), anomaly_map (B, 1, S, S)).
    """
    if model.hp.scoring.source == "discriminator":
        return FoldedDetector.from_model(model).eval()
    return model.eval()
