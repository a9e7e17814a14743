"""pathoscope.pieg: PiEG's steps (Eq. 3, both directions) one by one, its step lengths, start, units,
projections and side effects on D; the gradient the training loss sees; and the exact candidate
search."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from pathoscope.anchor_bank import AnchorBank
from pathoscope.heads import Adapter, Discriminator
from pathoscope.hparams import PiEGParams
from pathoscope.losses import bce, global_distance, tritanh
from pathoscope.pieg import CandidateSearch, pieg

C = 8
SHAPE = (2, 3, 4, C)  # (B, h, w, C)


def norms(x: Tensor) -> Tensor:
    """Per-position norms (..., C) -> (...)."""
    return torch.linalg.vector_norm(x, dim=-1)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def v_n() -> Tensor:
    return torch.randn(SHAPE, generator=gen(1)) * 3.0


@pytest.fixture
def linear_d() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(C, 1)


def bce_terms(d: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """The v_s-dependent BCE term of L_global: BCE(D(v_s), 1), D giving logits (..., 1) or (...)."""
    return lambda v: bce(d(v).reshape(v.shape[:-1]), 1.0)


def ascent(eta: float, **fields: Any) -> PiEGParams:
    """PiEG's settings with Eq. 3's printed sign (`direction="ascent"`), which most tests below
    follow step by step; the other fields as given, else `PiEGParams`' defaults."""
    return PiEGParams(eta=eta, direction="ascent", **fields)


def grad_of(terms: Callable[[Tensor], Tensor], v: Tensor) -> Tensor:
    v = v.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(terms(v), v)
    return g


# ---------------------------------------------------------------- the ascent


@pytest.mark.parametrize("keep_noise", [True, False])
def test_each_step_raises_the_terms_by_at_least_half_the_first_order_gain(
    v_n: Tensor, linear_d: nn.Linear, keep_noise: bool
) -> None:
    # BCE(w.v + b, 1) with a linear D is convex in v: a step s gains at least g.s, and the
    # normalised step gains eta * sum_p ||g_p|| >= eta * ||g||.
    terms = bce_terms(linear_d)
    eta, steps = 0.3, 6
    trajectory = [
        pieg(v_n, terms, ascent(eta, steps=t, keep_noise=keep_noise), generator=gen(7))
        for t in range(steps + 1)
    ]
    # The prefixes are one trajectory: steps=t + 1 continues steps=t by one move, from v_s
    # including the start noise (dropped from the result only when keep_noise=False).
    noise = pieg(v_n, terms, ascent(0.0, keep_noise=True), generator=gen(7)) - v_n
    for t in range(steps):
        v_t = trajectory[t] if keep_noise else trajectory[t] + noise
        v_next = trajectory[t + 1] if keep_noise else trajectory[t + 1] + noise
        g = grad_of(terms, v_t)
        gain = (terms(v_next) - terms(v_t)).item()
        assert gain >= 0.5 * eta * g.norm().item() > 0, t
        # Every position moves exactly eta per step.
        torch.testing.assert_close(norms(v_next - v_t), torch.full(SHAPE[:-1], eta))
        # ... along its own normalised gradient.
        torch.testing.assert_close(v_next - v_t, eta * g / norms(g)[..., None])


def test_descent_moves_down_the_same_gradient_and_lowers_the_terms(
    v_n: Tensor, linear_d: nn.Linear
) -> None:
    # direction="descent" (PiEGParams' default, so pieg's and the model's) is the mirror of the
    # ascent: each position moves eta against its own normalised gradient, and the terms fall
    # (D(v_s) rises towards the label 1) by about the first-order amount.
    terms = bce_terms(linear_d)
    eta, steps = 0.05, 5
    trajectory = [
        pieg(v_n, terms, PiEGParams(eta=eta, steps=t), generator=gen(3)) for t in range(steps + 1)
    ]
    for t in range(steps):
        g = grad_of(terms, trajectory[t])
        torch.testing.assert_close(
            trajectory[t + 1] - trajectory[t], -eta * g / norms(g)[..., None]
        )
        first_order = eta * norms(g).sum().item()
        drop = (terms(trajectory[t]) - terms(trajectory[t + 1])).item()
        assert 0.5 * first_order <= drop <= first_order, t  # convex: never more than first order
    logits = [linear_d(v).mean().item() for v in (trajectory[0], trajectory[-1])]
    assert logits[1] > logits[0]
    assert PiEGParams().direction == "descent"
    with pytest.raises(ValueError, match="pieg.direction"):  # never reaches pieg
        PiEGParams(direction="up")


@pytest.mark.parametrize("keep_noise", [True, False])
def test_gradient_is_taken_at_the_current_v_s_start_noise_included(
    v_n: Tensor, keep_noise: bool
) -> None:
    # An objective whose gradient direction depends on where it is evaluated: the distance to
    # points c close to v_n, so that the start noise (std 0.5) changes every direction.
    c = v_n + torch.randn(SHAPE, generator=gen(8))

    def terms(v: Tensor) -> Tensor:
        return norms(v - c).sum()

    def run(eta: float, steps: int, keep: bool = keep_noise) -> Tensor:
        params = ascent(eta, steps=steps, noise_std=0.5, keep_noise=keep)
        return pieg(v_n, terms, params, generator=gen(9))

    noisy = run(0.0, 0, keep=True)  # v_n + the start noise
    v_prev = noisy
    for t in range(1, 4):
        current = run(0.2, t) if keep_noise else run(0.2, t) + (noisy - v_n)
        unit = (v_prev - c) / norms(v_prev - c)[..., None]  # the gradient at v_prev, normalised
        torch.testing.assert_close(current - v_prev, 0.2 * unit, rtol=1e-4, atol=1e-5)
        v_prev = current


def test_one_step_moves_every_position_by_eta_with_the_real_discriminator(v_n: Tensor) -> None:
    torch.manual_seed(0)
    d = Discriminator(C, hidden=16)
    stats = tuple(s.detach() for s in d.batch_stats(v_n))
    terms = bce_terms(lambda v: d(v, bn_stats=stats))
    for eta in (0.01, 0.5):
        v_s = pieg(v_n, terms, ascent(eta, steps=1, keep_noise=False), generator=gen())
        torch.testing.assert_close(norms(v_s - v_n), torch.full(SHAPE[:-1], eta))


def test_fixed_direction_objective_moves_steps_times_eta(v_n: Tensor) -> None:
    w = torch.randn(SHAPE, generator=gen(3))  # a different fixed direction at each position

    def terms(v: Tensor) -> Tensor:
        return (v * w).sum()

    v_s = pieg(v_n, terms, ascent(0.05, steps=20, keep_noise=False), generator=gen())
    torch.testing.assert_close(norms(v_s - v_n), torch.full(SHAPE[:-1], 20 * 0.05))
    torch.testing.assert_close(v_s - v_n, 20 * 0.05 * w / norms(w)[..., None])


def test_positions_without_gradient_stay_put(v_n: Tensor) -> None:
    def terms(v: Tensor) -> Tensor:  # only the first image counts
        return v[0].sum()

    v_s = pieg(v_n, terms, ascent(0.1, steps=3, keep_noise=False), generator=gen())
    assert torch.isfinite(v_s).all()
    assert torch.equal(v_s[1], v_n[1])
    torch.testing.assert_close(norms(v_s[0] - v_n[0]), torch.full(SHAPE[1:-1], 0.3))


def test_no_step_leaves_the_start(v_n: Tensor) -> None:
    def never(v: Tensor) -> Tensor:
        raise AssertionError("no ascent step should evaluate the terms")

    start = {"noise_std": 0.5, "noise_mean": 0.2}
    a = pieg(v_n, never, ascent(0.0, steps=20, **start), generator=gen(4))
    b = pieg(v_n, never, ascent(0.3, steps=0, **start), generator=gen(4))
    c = pieg(v_n, never, ascent(0.3, steps=20, enabled=False, **start), generator=gen(4))
    assert torch.equal(a, b) and torch.equal(a, c)
    noise = a - v_n
    assert not torch.equal(noise, torch.zeros_like(noise))
    big = pieg(torch.zeros(64, 64, 16), never, ascent(0.0, **start), generator=gen())
    assert big.mean().item() == pytest.approx(0.2, abs=0.02)
    assert big.std().item() == pytest.approx(0.5, rel=0.03)
    for eta, steps in ((0.0, 20), (0.3, 0)):
        v_s = pieg(v_n, never, ascent(eta, steps=steps, keep_noise=False), generator=gen(4))
        assert torch.equal(v_s, v_n)


def test_same_generator_same_result_and_noise_changes_with_seed(
    v_n: Tensor, linear_d: nn.Linear
) -> None:
    terms = bce_terms(linear_d)
    params = ascent(0.1, steps=3)
    a = pieg(v_n, terms, params, generator=gen(5))
    assert torch.equal(a, pieg(v_n, terms, params, generator=gen(5)))
    assert not torch.equal(a, pieg(v_n, terms, params, generator=gen(6)))


# ---------------------------------------------------------------- stopping at a target D(v_s)


def _steps_to_target(logit: float, gain: float, steps: int, target: float, up: bool) -> int:
    """Steps a position takes when each step changes its logit by +gain (up) or -gain, checked
    before each step: it moves while sigmoid(logit) < target (up) or > target (down)."""
    taken = 0
    while taken < steps:
        p = 1.0 / (1.0 + math.exp(-logit))
        if (p >= target) if up else (p <= target):
            break
        logit += gain if up else -gain
        taken += 1
    return taken


@pytest.mark.parametrize("direction", ["descent", "ascent"])
def test_stop_at_stops_each_position_when_d_reaches_the_target(
    v_n: Tensor, linear_d: nn.Linear, direction: str
) -> None:
    """A linear D: each step moves a position eta along +-w/|w|, so its logit changes by eta |w|
    per step and the number of steps to the target is counted by hand; positions differ in it."""
    eta, steps, target = 0.3, 12, 0.5
    w = linear_d.weight.detach()[0]
    up = direction == "descent"  # descent raises D(v_s), ascent lowers it
    gain = eta * float(w.norm())
    # Start each position on the far side of the target, 0.5 to 10 steps from it (logit 0 is
    # D = 0.5): v_n moved along w to the logit -k gain (descent) or +k gain (ascent).
    k = 0.5 + 9.5 * torch.rand(SHAPE[:-1], generator=gen(8))
    wanted = (-k if up else k) * gain
    with torch.no_grad():
        v = v_n + ((wanted - linear_d(v_n)[..., 0]) / w.norm() ** 2)[..., None] * w
    params = PiEGParams(eta=eta, steps=steps, direction=direction, stop_at=target)  # type: ignore[arg-type]

    def score(x: Tensor) -> Tensor:
        return torch.sigmoid(linear_d(x)[..., 0])

    v_s = pieg(v, bce_terms(linear_d), params, generator=gen(2), score=score)
    start = pieg(v, bce_terms(linear_d), PiEGParams(eta=0.0), generator=gen(2))
    with torch.no_grad():
        l0 = linear_d(start)[..., 0]
    taken = torch.tensor(
        [_steps_to_target(float(x), gain, steps, target, up) for x in l0.flatten()]
    ).reshape(l0.shape)
    assert int(taken.min()) > 0 and int(taken.max()) < steps and taken.unique().numel() > 2
    sign = 1.0 if up else -1.0
    expected = start + sign * eta * taken[..., None].float() * w / w.norm()
    torch.testing.assert_close(v_s, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        p = score(v_s)
    assert bool((p >= target).all()) if up else bool((p <= target).all())


def test_stop_at_zero_is_the_paper_and_needs_a_score(v_n: Tensor, linear_d: nn.Linear) -> None:
    terms = bce_terms(linear_d)
    with pytest.raises(ValueError, match="stop_at needs `score`"):
        pieg(v_n, terms, PiEGParams(stop_at=0.5), generator=gen())

    def reject(x: Tensor) -> Tensor:
        raise AssertionError("stop_at 0 must not score")

    a = pieg(v_n, terms, PiEGParams(eta=0.1, steps=3), generator=gen(1), score=reject)
    assert torch.equal(a, pieg(v_n, terms, PiEGParams(eta=0.1, steps=3), generator=gen(1)))


# ---------------------------------------------------------------- side effects and gradients


def test_pieg_leaves_discriminator_grads_and_buffers_untouched(v_n: Tensor) -> None:
    torch.manual_seed(0)
    d = Discriminator(C, hidden=16).train()
    adapter = Adapter(C)
    e = v_n.clone()
    v = adapter(e)  # v_n with a graph to the adapter, as in training
    stats = tuple(s.detach() for s in d.batch_stats(v))
    d.fc1.weight.grad = torch.full_like(d.fc1.weight, 0.5)  # an earlier gradient must survive
    buffers = {k: b.clone() for k, b in d.named_buffers()}
    v_s = pieg(v, bce_terms(lambda x: d(x, bn_stats=stats)), ascent(0.1, steps=5), generator=gen())
    assert torch.equal(d.fc1.weight.grad, torch.full_like(d.fc1.weight, 0.5))
    for name, p in d.named_parameters():
        if name != "fc1.weight":
            assert p.grad is None, name
    for name, b in d.named_buffers():
        assert torch.equal(b, buffers[name]), name
    assert all(p.grad is None for p in adapter.parameters())
    assert v_s.requires_grad and v_s.grad_fn is not None  # differentiable through v_n


def test_training_loss_gradient_treats_delta_as_a_constant() -> None:
    g = gen(11)
    e = torch.randn(SHAPE, generator=g) * 2.0
    bank = AnchorBank.from_features(
        torch.randn(60, C, generator=g) * 2.0, heldout=torch.randn(20, C, generator=g) * 2.0
    )
    torch.manual_seed(0)
    adapter = Adapter(C)
    with torch.no_grad():  # away from the identity, so that every gradient term shows
        adapter.linear.weight.add_(0.1 * torch.randn(C, C, generator=g))
        adapter.linear.bias.add_(0.1 * torch.randn(C, generator=g))
    d = Discriminator(C, hidden=16)
    adapter_ref, d_ref = copy.deepcopy(adapter), copy.deepcopy(d)

    def loss_of(adapter: Adapter, d: Discriminator, v_s_of: Callable[[Tensor], Tensor]) -> Tensor:
        v_n = adapter(e)
        v_s = v_s_of(v_n)
        d_n = global_distance(v_n, bank)
        logits = d(torch.cat([v_n, v_s]))
        l_n, l_s = logits.split(SHAPE[0])
        return bce(l_n, 0.0) + bce(l_s, 1.0) + tritanh(d_n, global_distance(v_s, bank))

    def with_pieg(v_n: Tensor) -> Tensor:
        stats = tuple(s.detach() for s in d.batch_stats(v_n))
        d_n = global_distance(v_n, bank).detach()

        def terms(v: Tensor) -> Tensor:
            return bce(d(v, bn_stats=stats), 1.0) + tritanh(d_n, global_distance(v, bank))

        return pieg(v_n, terms, ascent(0.2, steps=5), generator=gen(3))

    captured: dict[str, Tensor] = {}

    def capture(v_n: Tensor) -> Tensor:
        v_s = with_pieg(v_n)
        captured["delta"] = (v_s - v_n).detach()
        return v_s

    loss_of(adapter, d, capture).backward()
    delta = captured["delta"]
    assert norms(delta).min() > 0.5  # PiEG moved every position
    loss_of(adapter_ref, d_ref, lambda v_n: v_n + delta).backward()
    for (name, p), p_ref in zip(adapter.named_parameters(), adapter_ref.parameters(), strict=True):
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-5, atol=1e-7)
    for p, p_ref in zip(d.parameters(), d_ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- minimum distance and projections


def test_min_distance_lifts_short_deltas_only(v_n: Tensor, linear_d: nn.Linear) -> None:
    terms = bce_terms(linear_d)
    one = {"steps": 1, "keep_noise": False}
    short = pieg(v_n, terms, ascent(0.01, **one), generator=gen())
    lifted = pieg(v_n, terms, ascent(0.01, min_distance=0.05, **one), generator=gen())
    torch.testing.assert_close(norms(lifted - v_n), torch.full(SHAPE[:-1], 0.05))
    torch.testing.assert_close(lifted - v_n, 5.0 * (short - v_n))  # same direction
    long = pieg(v_n, terms, ascent(0.1, **one), generator=gen())
    same = pieg(v_n, terms, ascent(0.1, min_distance=0.05, **one), generator=gen())
    assert torch.equal(same, long)
    zero = pieg(v_n, terms, ascent(0.0, keep_noise=False, min_distance=0.05), generator=gen())
    assert torch.equal(zero, v_n)  # no direction to lift along: stays, no NaN


def test_units_scale_eta_the_start_and_min_distance_by_the_bank_scale(
    v_n: Tensor, linear_d: nn.Linear
) -> None:
    # The model passes its bank's distance_scale: eta and the Gaussian start are multiplied by it
    # with units="distance_scale" only; min_distance always (its unit is the bank's scale).
    terms = bce_terms(linear_d)
    scale = 2.5
    start = {"steps": 2, "noise_std": 0.2, "noise_mean": 0.1}
    scaled = ascent(0.1, units="distance_scale", **start)
    by_hand = ascent(0.1 * scale, steps=2, noise_std=0.2 * scale, noise_mean=0.1 * scale)
    expected = pieg(v_n, terms, by_hand, generator=gen(2))
    assert torch.equal(pieg(v_n, terms, scaled, distance_scale=scale, generator=gen(2)), expected)
    absolute = ascent(0.1, **start)
    assert torch.equal(
        pieg(v_n, terms, absolute, distance_scale=scale, generator=gen(2)),
        pieg(v_n, terms, absolute, generator=gen(2)),
    )
    lifted = ascent(0.01, steps=1, keep_noise=False, min_distance=0.04)
    v_s = pieg(v_n, terms, lifted, distance_scale=scale, generator=gen())
    torch.testing.assert_close(norms(v_s - v_n), torch.full(SHAPE[:-1], 0.04 * scale))


def test_hypersphere_projection_clamps_to_r_2r(v_n: Tensor) -> None:
    w = torch.randn(SHAPE, generator=gen(3))

    def terms(v: Tensor) -> Tensor:
        return (v * w).sum()

    for eta, steps, expected in ((0.01, 1, 0.1), (0.05, 3, 0.15), (0.1, 5, 0.2)):
        params = ascent(
            eta, steps=steps, keep_noise=False, min_distance=0.1, projection="hypersphere"
        )
        v_s = pieg(v_n, terms, params, generator=gen())
        torch.testing.assert_close(norms(v_s - v_n), torch.full(SHAPE[:-1], expected))
        torch.testing.assert_close((v_s - v_n) / expected, w / norms(w)[..., None])


def test_manifold_projection_puts_v_s_at_r_to_2r_from_the_anchors() -> None:
    bank = AnchorBank.from_features(torch.randn(50, C, generator=gen(2)) * 3.0)
    # Image 0 starts right next to anchors (lifted out to r), image 1 far away (pulled in to 2r).
    near = bank.anchors[:12] + 0.01 * torch.randn(12, C, generator=gen(4))
    far = bank.anchors[12:24] + 3.0 * torch.randn(12, C, generator=gen(5))
    v_n = torch.cat([near, far]).reshape(SHAPE)
    w = torch.randn(SHAPE, generator=gen(3))

    def terms(v: Tensor) -> Tensor:
        return (v * w).sum()

    r = 0.4
    free = pieg(v_n, terms, ascent(0.01, steps=2, noise_std=0.0), generator=gen()).reshape(-1, C)
    free_dist, free_idx = bank.nearest(free)
    assert (free_dist[:12] < r).all() and (free_dist[12:] > 2 * r).all()
    v_s = pieg(
        v_n,
        terms,
        ascent(0.01, steps=2, noise_std=0.0, min_distance=r, projection="manifold"),
        nearest=bank.nearest,
        anchors=bank.anchors,
        generator=gen(),
    ).reshape(-1, C)
    # Along the ray from the nearest anchor, at the distance clamped to [r, 2r].
    a = bank.anchors[free_idx]
    target = torch.cat([torch.full((12,), r), torch.full((12,), 2 * r)])
    unit = (free - a) / free_dist[:, None]
    torch.testing.assert_close(v_s, a + unit * target[:, None])
    dist, idx = bank.nearest(v_s)
    torch.testing.assert_close(dist, target)
    assert torch.equal(idx, free_idx)
    with pytest.raises(ValueError, match="pieg.projection"):
        ascent(0.1, projection="sphere")
    with pytest.raises(ValueError, match="nearest"):
        pieg(v_n, terms, ascent(0.1, min_distance=r, projection="manifold"), generator=gen())


# ---------------------------------------------------------------- candidate search


@pytest.fixture(scope="module")
def search_data() -> dict[str, Tensor]:
    g = gen(21)
    centres = torch.randn(10, 16, generator=g) * 4.0
    feats = centres[torch.randint(10, (500,), generator=g)] + torch.randn(500, 16, generator=g)
    reference = centres[torch.randint(10, (300,), generator=g)] + torch.randn(300, 16, generator=g)
    direction = torch.randn(300, 16, generator=g)
    return {
        "features": feats,
        "reference": reference,
        "direction": direction / norms(direction)[:, None],
    }


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_candidate_search_is_exact_for_shifted_queries(
    search_data: dict[str, Tensor], backend: str
) -> None:
    bank = AnchorBank.from_features(search_data["features"], coreset_ratio=0.5, backend=backend)
    ref = search_data["reference"]
    search = CandidateSearch(bank, ref, k=8)
    assert torch.equal(search.nearest_to_reference(), bank.nearest(ref)[1])
    d0, i0 = search.nearest(ref)
    assert search.fallbacks == 0  # the references themselves are always certified
    assert torch.equal(i0, bank.nearest(ref)[1])
    # PiEG-sized shifts (eta 0.05 x 20 steps), then shifts far beyond the candidates' reach.
    for shift, expect_fallbacks in ((0.05 * 20, False), (5.0, True), (40.0, True)):
        before = search.fallbacks
        x = (ref + shift * search_data["direction"]).requires_grad_(True)
        dist, idx = search.nearest(x)
        x_ref = x.detach().clone().requires_grad_(True)
        ref_dist, ref_idx = bank.nearest(x_ref)
        assert torch.equal(idx, ref_idx), shift
        torch.testing.assert_close(dist, ref_dist)
        (dist.sum()).backward()
        ref_dist.sum().backward()
        torch.testing.assert_close(x.grad, x_ref.grad)
        if expect_fallbacks:
            assert search.fallbacks > before, shift


def test_candidate_search_with_every_anchor_a_candidate_never_falls_back(
    search_data: dict[str, Tensor],
) -> None:
    bank = AnchorBank.from_features(search_data["features"], coreset_ratio=0.01)  # 5 anchors
    search = CandidateSearch(bank, search_data["reference"], k=8)
    x = search_data["reference"] + 100.0 * search_data["direction"]
    dist, idx = search.nearest(x)
    assert search.fallbacks == 0
    assert torch.equal(idx, bank.nearest(x)[1])


def test_pieg_with_candidate_search_equals_pieg_with_the_bank(
    search_data: dict[str, Tensor],
) -> None:
    bank = AnchorBank.from_features(
        search_data["features"], coreset_ratio=0.5, heldout=search_data["features"][:50] + 0.3
    )
    v_n = search_data["reference"][:48].reshape(2, 4, 6, 16)
    search = CandidateSearch(bank, v_n.reshape(-1, 16), k=8)
    d_n = global_distance(v_n, bank)
    results = []
    for nearest in (search.nearest, bank.nearest):

        def terms(
            v: Tensor, nearest: Callable[[Tensor], tuple[Tensor, Tensor]] = nearest
        ) -> Tensor:
            return tritanh(d_n, global_distance(v, bank, search=nearest))

        results.append(pieg(v_n, terms, ascent(0.05, steps=20), generator=gen()))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=1e-6)
    assert norms(results[0] - v_n).mean() > 0.5


def exact_nearest(x: Tensor, anchors: Tensor) -> tuple[Tensor, Tensor]:
    """Reference in float64: (distance to the nearest anchor, its index) of each row of x."""
    d = torch.cdist(x.double(), anchors.double())
    best, idx = d.min(1)
    return best, idx


def assert_same_as_exact(idx: Tensor, x: Tensor, anchors: Tensor, tie: float = 0.0) -> None:
    """idx equals the float64 nearest anchor, except where both are within `tie` (a float tie)."""
    best, ref = exact_nearest(x, anchors)
    differ = idx != ref
    if tie == 0.0:
        assert not bool(differ.any()), int(differ.sum())
    ours = torch.linalg.vector_norm(x.double() - anchors[idx].double(), dim=-1)
    assert bool((ours[differ] - best[differ] <= tie).all())


def test_candidate_search_rereferences_along_ascent_paths(search_data: dict[str, Tensor]) -> None:
    """PiEG-like paths (a noise jump, then 40 steps of 0.15 along slowly turning directions): every
    answer is the exact nearest anchor; rows whose candidates cannot certify the answer are
    re-referenced (one k-search) and later steps are certified from there, so far fewer rows are
    searched than queries are answered."""
    bank = AnchorBank.from_features(search_data["features"], coreset_ratio=0.5)
    ref = search_data["reference"]
    g = gen(5)
    search = CandidateSearch(bank, ref, k=8)
    _, idx = search.nearest(ref)
    assert search.searches == ref.shape[0] and search.fallbacks == 0  # set-up, no fallback
    x = ref + torch.randn(ref.shape, generator=g)  # the noise jump: most rows re-referenced
    _, idx = search.nearest(x)
    assert_same_as_exact(idx, x, bank.anchors)
    assert search.fallbacks > ref.shape[0] // 2
    direction = search_data["direction"].clone()
    before = search.searches
    for _ in range(40):
        turn = torch.randn(ref.shape, generator=g)
        direction = direction + 0.2 * turn / norms(turn)[:, None]
        direction = direction / norms(direction)[:, None]
        x = x + 0.15 * direction
        dist, idx = search.nearest(x)
        assert_same_as_exact(idx, x, bank.anchors)
        torch.testing.assert_close(dist, bank.nearest(x)[0])
    searched = search.searches - before
    assert 0 < searched < 40 * ref.shape[0] // 4, searched  # re-references happen, rarely
    assert search.searches - ref.shape[0] == search.fallbacks  # each fallback: one k-search


def test_candidate_search_sets_up_only_the_rows_asked_for(search_data: dict[str, Tensor]) -> None:
    """rows=...: a subset is set up lazily (the others cost nothing), other subsets and all rows
    mix new and known rows, in any order; every answer is exact and differentiable."""
    bank = AnchorBank.from_features(search_data["features"], coreset_ratio=0.5)
    ref = search_data["reference"]
    step = 0.3 * search_data["direction"]
    search = CandidateSearch(bank, ref, k=4)
    first = torch.arange(0, 300, 3)  # 100 rows
    _, idx = search.nearest(ref[first], first)
    assert search.searches == 100
    assert torch.equal(idx, bank.nearest(ref[first])[1])
    mixed = torch.arange(299, -1, -2)  # 150 rows, 50 known, in reverse order
    x = (ref + step)[mixed].requires_grad_(True)
    dist, idx = search.nearest(x, mixed)
    assert search.searches == 200 + search.fallbacks  # the 100 new rows (+ re-references)
    x_ref = x.detach().clone().requires_grad_(True)
    ref_dist, ref_idx = bank.nearest(x_ref)
    assert torch.equal(idx, ref_idx)
    dist.sum().backward()
    ref_dist.sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    x = ref + 2 * step  # all rows: the last 100 are new
    dist, idx = search.nearest(x)
    assert torch.equal(idx, bank.nearest(x)[1])
    assert torch.equal(search.nearest_to_reference(), bank.nearest(ref)[1])
    with pytest.raises(ValueError, match="expected"):
        search.nearest(ref[:10])
    with pytest.raises(ValueError, match="repeat"):
        CandidateSearch(bank, ref).nearest(ref[[1, 1]], torch.tensor([1, 1]))


def test_candidate_search_is_exact_far_from_the_origin(search_data: dict[str, Tensor]) -> None:
    """Features whose norms dwarf their spacing (real features: ~50x the distance scale). The
    search's squared distances |x|^2 + |a|^2 - 2 x.a then lose digits, so its (k+1)-th distance
    may overstate how far the other anchors are; the bound L keeps a margin for that: it is never
    above a left-out anchor's float64 distance. Every answer is the full search's, and (within
    float32 rounding of |x|^2 ~ 1.4e6, about 0.7 on squared distances of about 18, where more than
    half the queries have their second-nearest anchor within 2.9) the float64 nearest anchor."""
    offset = 300.0 * torch.ones(16)  # |x|^2 ~ 1.4e6: float32 rounding ~0.1 on squared distances
    bank = AnchorBank.from_features(search_data["features"] + offset, coreset_ratio=0.5)
    ref = search_data["reference"] + offset
    search = CandidateSearch(bank, ref, k=8)
    search.nearest(ref)
    d = torch.cdist(search._ref.double(), bank.anchors.double())  # (M, A), the set-up's refs
    d.scatter_(1, search._cand, math.inf)  # only the anchors left out of the candidates
    assert bool((search._bound.double() <= d.min(1).values).all())
    for shift in (0.02, 0.2, 1.0):
        x = ref + shift * search_data["direction"]
        dist, idx = search.nearest(x)
        assert torch.equal(idx, bank.nearest(x)[1]), shift  # the full search's anchor, always
        best, _ = exact_nearest(x, bank.anchors)
        ours = torch.linalg.vector_norm(x.double() - bank.anchors[idx].double(), dim=-1)
        # |x|^2 and |a|^2, each rounded to float32 (2 eps), bound the rounding of |x - a|^2.
        rounding = 2 * torch.finfo(torch.float32).eps * 2 * float((x.double() ** 2).sum(1).max())
        assert rounding < 1.0
        assert bool((ours**2 - best**2 <= rounding).all()), shift
        torch.testing.assert_close(dist.double(), ours, rtol=0, atol=1e-3)
