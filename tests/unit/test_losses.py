"""pathoscope.losses against hand-worked values and high-precision references; and the reason
distances are read in units of the bank's distance_scale (tritanh's gradient at real scales)."""

from __future__ import annotations

import math
from decimal import Decimal, getcontext

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from pathoscope.anchor_bank import AnchorBank
from pathoscope.heads import Adapter
from pathoscope.losses import (
    bce,
    focal_loss,
    global_distance,
    local_distance,
    mask_to_grid,
    positional_mean,
    tritanh,
)

# ---------------------------------------------------------------- tritanh (Eq. 2)


def naive_tritanh(
    a: Tensor, b: Tensor, l0: float = 1.0, l1: float = 1.0, eps: float = 1e-6
) -> Tensor:
    ea, eb = torch.exp(l0 * a), torch.exp(l1 * b)
    return (ea - eb + eps) / (ea + eb + eps)


def decimal_tritanh(
    a: float, b: float, l0: float = 1.0, l1: float = 1.0, eps: float = 1e-6
) -> float:
    """Eq. 2 in 60-digit decimal arithmetic (e^10000 is an ordinary number there)."""
    getcontext().prec = 60
    ea = (Decimal(l0) * Decimal(a)).exp()
    eb = (Decimal(l1) * Decimal(b)).exp()
    e = Decimal(eps)
    return float((ea - eb + e) / (ea + eb + e))


def t(*xs: float, dtype: torch.dtype = torch.float64) -> Tensor:
    return torch.tensor(xs, dtype=dtype)


def test_tritanh_hand_values() -> None:
    # d_pull = d_push = x: the exponentials cancel in the numerator -> eps / (2 e^x + eps).
    for x in (0.0, 1.0, 3.0):
        expected = 0.5 / (2.0 * math.exp(x) + 0.5)
        assert tritanh(t(x), t(x), eps=0.5).item() == pytest.approx(expected, rel=1e-12)
    # (e^{ln 2} - e^0 + 0) / (2 + 1 + 0) = 1/3
    assert tritanh(t(math.log(2.0)), t(0.0), eps=0.0).item() == pytest.approx(1 / 3, rel=1e-12)
    # lambdas: e^{2 ln 2} = 4, e^{ln 2} = 2, eps = 1: (4 - 2 + 1) / (4 + 2 + 1) = 3/7
    value = tritanh(t(math.log(2.0)), t(math.log(2.0)), lambda_pull=2.0, lambda_push=1.0, eps=1.0)
    assert value.item() == pytest.approx(3 / 7, rel=1e-12)
    # pull far below push: -1 + tiny; far above: +1.
    assert tritanh(t(0.0), t(30.0)).item() == pytest.approx(-1.0, abs=1e-12)
    assert tritanh(t(30.0), t(0.0)).item() == pytest.approx(1.0, abs=1e-12)


def test_tritanh_without_eps_is_tanh_of_half_the_gap() -> None:
    a = torch.linspace(0, 5, 11, dtype=torch.float64)
    b = torch.linspace(3, -1, 11, dtype=torch.float64).abs()
    torch.testing.assert_close(
        tritanh(a, b, 0.7, 1.3, eps=0.0), torch.tanh((0.7 * a - 1.3 * b) / 2)
    )


def test_tritanh_equals_naive_formula_where_it_does_not_overflow() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.rand(200, generator=g, dtype=torch.float64) * 20
    b = torch.rand(200, generator=g, dtype=torch.float64) * 20
    for l0, l1, eps in ((1.0, 1.0, 1e-6), (0.5, 2.0, 0.1), (1.0, 1.0, 0.0)):
        torch.testing.assert_close(
            tritanh(a, b, l0, l1, eps), naive_tritanh(a, b, l0, l1, eps), rtol=1e-12, atol=1e-12
        )
    a32, b32 = a.float(), b.float()
    torch.testing.assert_close(tritanh(a32, b32), naive_tritanh(a32, b32), rtol=1e-5, atol=1e-6)


LARGE = [
    (1e4, 1e4),
    (1e4, 1e4 - 1.0),
    (1e4 - 0.5, 1e4),
    (5000.0, 5003.0),
    (100.0, 100.0),
    (0.0, 1e4),
    (1e4, 0.0),
    (700.0, 712.0),
    (90.0, 89.0),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tritanh_large_distances_match_high_precision(dtype: torch.dtype) -> None:
    a = torch.tensor([p[0] for p in LARGE], dtype=dtype, requires_grad=True)
    b = torch.tensor([p[1] for p in LARGE], dtype=dtype, requires_grad=True)
    with torch.no_grad():
        assert torch.isnan(naive_tritanh(a, b)).any()  # the naive form breaks here
    value = tritanh(a, b)
    expected = torch.tensor([decimal_tritanh(x, y) for x, y in LARGE], dtype=torch.float64)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(value.double(), expected, rtol=tol, atol=tol)
    value.sum().backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
    # With eps negligible, tritanh = tanh((a - b) / 2): d/da = (1 - t^2) / 2 = -d/db.
    gap = torch.tensor([x - y for x, y in LARGE], dtype=torch.float64)
    expected_grad = 0.5 * (1.0 - torch.tanh(gap / 2) ** 2)
    torch.testing.assert_close(a.grad.double(), expected_grad, rtol=1e-5, atol=tol)
    torch.testing.assert_close(b.grad.double(), -expected_grad, rtol=1e-5, atol=tol)


def test_tritanh_gradient_matches_naive_where_finite() -> None:
    a = torch.tensor([0.3, 2.0, 7.5], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([1.1, 2.0, 3.0], dtype=torch.float64, requires_grad=True)
    tritanh(a, b, 1.5, 0.5, 0.2).sum().backward()
    a2, b2 = a.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    naive_tritanh(a2, b2, 1.5, 0.5, 0.2).sum().backward()
    torch.testing.assert_close(a.grad, a2.grad)
    torch.testing.assert_close(b.grad, b2.grad)


# ---------------------------------------------------------------- distances (Eq. 1, Eq. 4)


@pytest.fixture
def bank() -> AnchorBank:
    """Two anchors in 2-D, (0, 0) and (10, 0), read in units of 2."""
    b = AnchorBank.from_features(torch.tensor([[0.0, 0.0], [10.0, 0.0]]))
    b.distance_scale = torch.tensor(2.0)
    return b


def grid(*rows: list[tuple[float, float]]) -> Tensor:
    """Images of 1 x 3 positions from lists of points: (B, 1, 3, 2)."""
    return torch.tensor([[row] for row in rows])


def test_local_distance_by_hand(bank: AnchorBank) -> None:
    v = grid(
        [(1.0, 0.0), (0.0, 3.0), (5.0, 90.0)],  # lesion at 0, 1: distances 1, 3 -> mean 2
        [(10.0, 4.0), (50.0, 0.0), (4.0, 0.0)],  # lesion at 0: distance 4 -> mean 4
        [(30.0, 0.0), (40.0, 0.0), (0.0, 70.0)],  # empty lesion mask: left out
    )
    lesion = torch.tensor([[[1, 1, 0]], [[1, 0, 0]], [[0, 0, 0]]], dtype=torch.bool)
    v.requires_grad_(True)
    d = local_distance(v, lesion, bank)
    # Per image then batch mean: (2 + 4) / 2 = 3, in units of 2 -> 1.5 (pooled would be 8/3 / 2).
    assert d.item() == pytest.approx(1.5)
    d.backward()
    # Image 0's two lesion cells weigh 1/2 each, image 1's one cell 1: times 1/2 (batch) / 2 (scale).
    assert torch.equal(v.grad[~lesion], torch.zeros(6, 2))
    torch.testing.assert_close(v.grad[0, 0, 0], torch.tensor([0.125, 0.0]))  # unit (1,0) * 1/8
    torch.testing.assert_close(v.grad[0, 0, 1], torch.tensor([0.0, 0.125]))
    torch.testing.assert_close(v.grad[1, 0, 0], torch.tensor([0.0, 0.25]))


def test_local_distance_with_no_lesion_is_a_differentiable_zero(bank: AnchorBank) -> None:
    v = grid([(1.0, 1.0), (2.0, 2.0), (3.0, 3.0)]).requires_grad_(True)
    d = local_distance(v, torch.zeros(1, 1, 3, dtype=torch.bool), bank)
    assert d.item() == 0.0
    d.backward()
    assert torch.equal(v.grad, torch.zeros_like(v))


def test_global_distance_by_hand(bank: AnchorBank) -> None:
    v = grid(
        [(1.0, 0.0), (0.0, 3.0), (10.0, 8.0)],  # distances 1, 3, 8
        [(6.0, 0.0), (4.0, 0.0), (10.0, 0.0)],  # distances 4, 4, 0
    )
    # All positions: means 4 and 8/3 -> batch mean 10/3, in units of 2 -> 5/3.
    assert global_distance(v, bank).item() == pytest.approx(5 / 3)
    fg = torch.tensor([[[1, 1, 0]], [[0, 0, 1]]], dtype=torch.bool)
    # Inside the foreground: means 2 and 0 -> 1 -> 0.5.
    assert global_distance(v, bank, fg).item() == pytest.approx(0.5)
    # An image with an empty foreground uses all its positions: means 2 and 8/3 -> 7/3 -> 7/6.
    fg_empty = torch.tensor([[[1, 1, 0]], [[0, 0, 0]]], dtype=torch.bool)
    assert global_distance(v, bank, fg_empty).item() == pytest.approx(7 / 6)


def test_global_distance_uses_the_given_search(bank: AnchorBank) -> None:
    v = grid([(1.0, 0.0), (0.0, 3.0), (10.0, 8.0)])
    calls: list[int] = []

    def search(x: Tensor) -> tuple[Tensor, Tensor]:
        calls.append(x.shape[0])
        return bank.nearest(x)

    assert global_distance(v, bank, search=search).item() == pytest.approx(2.0)
    assert calls == [3]


def test_global_distance_searches_only_the_foreground(bank: AnchorBank) -> None:
    """With a foreground, only its positions are searched (search(x, rows), rows = their flat
    indices; an image with an empty foreground: all of its positions), and value and gradient are
    those of the mean over all positions restricted to the region."""
    v = grid(
        [(1.0, 0.0), (0.0, 3.0), (10.0, 8.0)],
        [(6.0, 0.0), (4.0, 0.0), (10.0, 0.0)],
        [(2.0, 2.0), (9.0, 1.0), (7.0, 0.0)],
    ).requires_grad_(True)
    fg = torch.tensor([[[1, 1, 0]], [[0, 0, 1]], [[0, 0, 0]]], dtype=torch.bool)
    seen: list[Tensor] = []

    def search(x: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
        seen.append(rows)
        torch.testing.assert_close(x, v.reshape(-1, 2)[rows])
        return bank.nearest(x)

    d = global_distance(v, bank, fg, search=search)
    assert torch.equal(seen[0], torch.tensor([0, 1, 5, 6, 7, 8]))
    dist_all = bank.nearest(v.reshape(-1, 2))[0].reshape(3, 3)
    expected = positional_mean(dist_all, fg.reshape(3, 3)).mean() / 2.0
    (grad,) = torch.autograd.grad(d, v)
    (grad_ref,) = torch.autograd.grad(expected, v)
    torch.testing.assert_close(d, expected)
    torch.testing.assert_close(grad, grad_ref)
    assert bool((grad[0, 0, 2] == 0).all()) and bool((grad[2, 0, 2] != 0).any())
    # Without a search, the bank searches the same positions.
    torch.testing.assert_close(global_distance(v, bank, fg), expected)


def test_positional_mean_by_hand() -> None:
    dist = torch.tensor([[1.0, 2.0, 6.0], [3.0, 5.0, 7.0]])
    torch.testing.assert_close(positional_mean(dist, None), torch.tensor([3.0, 5.0]))
    region = torch.tensor([[True, False, True], [False, False, False]])
    torch.testing.assert_close(positional_mean(dist, region), torch.tensor([3.5, 5.0]))


def test_mask_to_grid_by_area_fraction() -> None:
    # A 4 x 4 mask -> 2 x 2 cells with lesion fractions 0, 1/4 (top right), 1/2, 1.
    mask = torch.zeros(1, 1, 4, 4)
    mask[0, 0, 0, 3] = 1  # top-right cell: 1 of 4 pixels
    mask[0, 0, 2, 0:2] = 1  # bottom-left cell: 2 of 4
    mask[0, 0, 2:4, 2:4] = 1  # bottom-right cell: all 4
    assert mask_to_grid(mask, (2, 2)).tolist() == [[[False, False], [True, True]]]
    assert mask_to_grid(mask, (2, 2), 0.25).tolist() == [[[False, True], [True, True]]]
    assert mask_to_grid(mask, (2, 2), 0.75).tolist() == [[[False, False], [False, True]]]
    assert mask_to_grid(mask.bool(), (2, 2)).dtype == torch.bool  # bool masks accepted
    assert mask_to_grid(mask.repeat(3, 1, 1, 1), (2, 2)).shape == (3, 2, 2)


# ---------------------------------------------------------------- focal loss and BCE


def test_focal_loss_by_hand() -> None:
    logits = torch.tensor([0.0, math.log(3.0), math.log(3.0)])  # p = 1/2, 3/4, 3/4
    target = torch.tensor([True, True, False])
    # p_t = 1/2, 3/4, 1/4: (1 - p_t)^2 * (-log p_t)
    expected = (0.25 * math.log(2) + 0.0625 * -math.log(0.75) + 0.5625 * math.log(4)) / 3
    assert focal_loss(logits, target).item() == pytest.approx(expected, rel=1e-6)
    assert focal_loss(logits, target, gamma=1.0).item() == pytest.approx(
        (0.5 * math.log(2) + 0.25 * -math.log(0.75) + 0.75 * math.log(4)) / 3, rel=1e-6
    )


def test_focal_loss_with_gamma_0_is_bce() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 5, generator=g) * 3
    target = torch.rand(2, 5, 5, generator=g) > 0.5
    expected = F.binary_cross_entropy(torch.sigmoid(logits), target.float())
    torch.testing.assert_close(focal_loss(logits, target, gamma=0.0), expected)


def test_focal_loss_large_logits_are_finite() -> None:
    logits = torch.tensor([100.0, -100.0], requires_grad=True)
    loss = focal_loss(logits, torch.tensor([0.0, 0.0]))  # first: confidently wrong, 100 nats
    assert loss.item() == pytest.approx(50.0, rel=1e-4)
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_bce_by_hand() -> None:
    logits = torch.tensor([0.0, math.log(3.0)])
    assert bce(logits, 1.0).item() == pytest.approx((math.log(2) - math.log(0.75)) / 2, rel=1e-6)
    assert bce(logits, 0.0).item() == pytest.approx((math.log(2) + math.log(4)) / 2, rel=1e-6)


# ---------------------------------------------------------------- why distance_scale exists


def test_adapter_gradient_does_not_vanish_at_init_with_distance_scale() -> None:
    """At real ResNet scales (feature norms in the tens, nearest distances 20-50), tritanh of raw
    distances is saturated at -1 and the adapter learns nothing; in units of the held-out median
    nearest distance it is not."""
    g = torch.Generator().manual_seed(0)
    c = 64

    def features(n: int) -> Tensor:  # non-negative, as post-ReLU features
        return torch.relu(torch.randn(n, c, generator=g) + 0.5)

    normal, heldout, e_n = features(400), features(100), features(2 * 6 * 6).reshape(2, 6, 6, c)
    to_25 = 25.0 / AnchorBank.from_features(normal, heldout=heldout).distance_scale
    normal, heldout, e_n = normal * to_25, heldout * to_25, e_n * to_25
    bank = AnchorBank.from_features(normal, coreset_ratio=0.5, heldout=heldout)
    lesion = torch.zeros(2, 6, 6, dtype=torch.bool)
    lesion[:, 1:4, 2:5] = True
    direction = torch.randn(c, generator=g)
    e_p = e_n.clone()
    e_p[lesion] += 40.0 * direction / direction.norm()  # a lesion moves features far away

    scale = bank.distance_scale.clone()
    assert 20.0 < scale < 50.0
    assert 10.0 < e_n.norm(dim=-1).mean() < 100.0

    grad_norms = {}
    for name, s in (("scaled", scale), ("raw", torch.tensor(1.0))):
        bank.distance_scale = s
        adapter = Adapter(c)
        d_n = local_distance(adapter(e_n), lesion, bank)
        d_p = local_distance(adapter(e_p), lesion, bank)
        if name == "raw":
            assert 20.0 < d_n < 50.0 and d_p - d_n > 10.0  # raw distances, gap over 10
        tritanh(d_n, d_p).backward()
        grad_norms[name] = adapter.linear.weight.grad.norm().item()
    assert grad_norms["scaled"] > 1e-2
    assert grad_norms["raw"] < 1e-4
    assert grad_norms["scaled"] > 1e3 * grad_norms["raw"]
