"""pathoscope.heads: the adapter starts as the identity; the discriminator's shapes, its BatchNorm
and the frozen-statistics path PiEG uses, against manual computations."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from pathoscope.anchor_bank import AnchorBank
from pathoscope.backbone import Backbone
from pathoscope.heads import Adapter, Discriminator
from pathoscope.losses import local_distance


def test_adapter_is_the_identity_at_init() -> None:
    adapter = Adapter(24)
    e = torch.randn(2, 3, 5, 24) * 20.0
    torch.testing.assert_close(adapter(e), e, rtol=0, atol=1e-5)
    assert torch.equal(adapter.linear.weight, torch.eye(24))
    assert torch.equal(adapter.linear.bias, torch.zeros(24))
    assert adapter.linear.weight.requires_grad  # trainable, only initialised as the identity


def test_adapter_keeps_local_distance_on_backbone_features() -> None:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Backbone: pretrained=False")
        bb = Backbone(pretrained=False)
    # Smooth images, so that the features look like real ones rather than noise.
    x = F.interpolate(torch.randn(3, 3, 8, 8), size=(64, 64), mode="bilinear")
    with torch.no_grad():
        e = bb(x).permute(0, 2, 3, 1)  # (3, 8, 8, 384)
    bank = AnchorBank.from_features(
        e[:2].reshape(-1, 384), coreset_ratio=0.25, heldout=e[2].reshape(-1, 384)
    )
    lesion = torch.zeros(3, 8, 8, dtype=torch.bool)
    lesion[:, 2:5, 3:7] = True
    adapter = Adapter(384)
    with torch.no_grad():
        d_e = local_distance(e, lesion, bank)
        d_f = local_distance(adapter(e), lesion, bank)
    assert d_e > 0
    torch.testing.assert_close(d_f, d_e, rtol=1e-5, atol=1e-6)
    # A perturbed adapter would not keep it: the check is not vacuous.
    with torch.no_grad():
        adapter.linear.weight.mul_(1.1)
        assert abs(local_distance(adapter(e), lesion, bank) - d_e) > 1e-3


# ---------------------------------------------------------------- discriminator


@pytest.fixture
def disc() -> Discriminator:
    torch.manual_seed(0)
    d = Discriminator(16, hidden=32)
    with torch.no_grad():  # non-trivial BatchNorm affine parameters and statistics
        d.bn.weight.uniform_(0.5, 1.5)
        d.bn.bias.uniform_(-0.5, 0.5)
        d.bn.running_mean.uniform_(-1.0, 1.0)
        d.bn.running_var.uniform_(0.5, 2.0)
    return d


def manual_d(d: Discriminator, v: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    """fc1 -> (h - mean) / sqrt(var + eps) * gamma + beta -> LeakyReLU(0.2) -> fc2, by hand."""
    h = v.reshape(-1, v.shape[-1]) @ d.fc1.weight.T + d.fc1.bias
    h = (h - mean) / torch.sqrt(var + d.bn.eps) * d.bn.weight + d.bn.bias
    h = torch.where(h > 0, h, 0.2 * h)
    return (h @ d.fc2.weight.T + d.fc2.bias).reshape(v.shape[:-1])


def test_discriminator_layers_and_shapes(disc: Discriminator) -> None:
    assert (disc.fc1.in_features, disc.fc1.out_features) == (16, 32)
    assert disc.bn.num_features == 32
    assert (disc.fc2.in_features, disc.fc2.out_features) == (32, 1)
    assert Discriminator(384).fc1.out_features == 1024  # the paper's hidden width
    assert disc(torch.randn(2, 3, 4, 16)).shape == (2, 3, 4)
    assert disc(torch.randn(7, 16)).shape == (7,)


def test_discriminator_train_mode_uses_batch_statistics(disc: Discriminator) -> None:
    disc.train()
    v = torch.randn(2, 3, 4, 16)
    h = v.reshape(-1, 16) @ disc.fc1.weight.T + disc.fc1.bias
    old_mean = disc.bn.running_mean.clone()
    out = disc(v)
    torch.testing.assert_close(out, manual_d(disc, v, h.mean(0), h.var(0, unbiased=False)))
    # ... and updates its running statistics (the frozen path below must not).
    torch.testing.assert_close(
        disc.bn.running_mean, 0.9 * old_mean + 0.1 * h.mean(0).detach(), rtol=1e-5, atol=1e-6
    )


def test_discriminator_eval_mode_uses_running_statistics(disc: Discriminator) -> None:
    disc.eval()
    v = torch.randn(5, 16)
    expected = manual_d(disc, v, disc.bn.running_mean, disc.bn.running_var)
    torch.testing.assert_close(disc(v), expected)


def test_batch_stats(disc: Discriminator) -> None:
    v = torch.randn(2, 3, 4, 16)
    mean, var = disc.batch_stats(v)
    h = v.reshape(-1, 16) @ disc.fc1.weight.T + disc.fc1.bias
    torch.testing.assert_close(mean, h.mean(0))
    torch.testing.assert_close(var, ((h - h.mean(0)) ** 2).mean(0))  # biased, as BatchNorm


def test_discriminator_with_bn_stats_touches_no_buffer(disc: Discriminator) -> None:
    disc.train()
    real = torch.randn(2, 3, 4, 16)
    stats = tuple(s.detach() for s in disc.batch_stats(real))
    buffers = {k: b.clone() for k, b in disc.named_buffers()}
    v = (torch.randn(1, 3, 4, 16) * 2.0 + 1.0).requires_grad_(True)
    out = disc(v, bn_stats=stats)
    for k, b in disc.named_buffers():
        assert torch.equal(b, buffers[k]), k
    torch.testing.assert_close(out, manual_d(disc, v, *stats))
    # Given statistics, not v's own batch statistics and not the running ones.
    assert not torch.allclose(out, manual_d(disc, v, *disc.batch_stats(v)), atol=1e-3)
    assert not torch.allclose(
        out, manual_d(disc, v, disc.bn.running_mean, disc.bn.running_var), atol=1e-3
    )
    out.sum().backward()  # differentiable w.r.t. the input
    assert v.grad is not None and torch.isfinite(v.grad).all() and v.grad.abs().sum() > 0


@pytest.mark.parametrize("shape", [(2, 3, 5), (1, 7, 1)])
def test_fc1_grid_is_fc1_of_the_rows_in_order_with_the_same_gradients(shape: tuple) -> None:
    """The 1x1-convolution form of D's first layer: the rows of fc1(v.reshape(-1, C)) in the same
    order (a non-square grid and a (1, N, 1) column, PiEG's layout), and the same gradients for
    v, the weight and the bias."""
    torch.manual_seed(0)
    d = Discriminator(6, hidden=4)
    v = torch.randn(*shape, 6, requires_grad=True)
    probe = torch.randn(shape[0] * shape[1] * shape[2], 4)  # a non-uniform upstream gradient
    ref = d.fc1(v.reshape(-1, 6))
    grads_ref = torch.autograd.grad((ref * probe).sum(), [v, d.fc1.weight, d.fc1.bias])
    out = d.fc1_grid(v)
    grads = torch.autograd.grad((out * probe).sum(), [v, d.fc1.weight, d.fc1.bias])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 3, 5), (1, 7, 1)])
def test_adapter_on_a_grid_is_the_per_position_linear_map_with_the_same_gradients(
    shape: tuple,
) -> None:
    """The adapter's 1x1-convolution path for grids (N, h, w, C) gives the per-position linear map
    in the same layout, and the same gradients for e, the weight and the bias."""
    torch.manual_seed(0)
    adapter = Adapter(6)
    with torch.no_grad():  # away from the identity start, so a transposed weight would show
        adapter.linear.weight.add_(torch.randn(6, 6))
        adapter.linear.bias.add_(torch.randn(6))
    e = torch.randn(*shape, 6, requires_grad=True)
    probe = torch.randn(*shape, 6)
    params = [e, adapter.linear.weight, adapter.linear.bias]
    ref = e @ adapter.linear.weight.T + adapter.linear.bias
    grads_ref = torch.autograd.grad((ref * probe).sum(), params)
    out = adapter(e)
    grads = torch.autograd.grad((out * probe).sum(), params)
    assert out.shape == e.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6)
