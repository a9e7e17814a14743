"""What makes a training step cheaper must leave the method's maths alone, or change it only as
its switch says: PiEG's cell subset (pieg.max_cells), D's first layer shared between PiEG's
statistics and the step's pass, the cosine learning-rate schedule, and the CPU process settings."""

from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch

import pathoscope.torch_model as model_module
from data_modules.brats import BraTSDataModule
from pathoscope.app import cpu
from pathoscope.batches import TrainBatch
from pathoscope.heads import Discriminator, hidden_stats
from pathoscope.lightning_model import PathoScope, cosine_factor
from pathoscope.losses import bce, focal_loss, global_distance, mask_to_grid


def _module(**groups: dict) -> PathoScope:
    base = {
        "network": {"pretrained": False, "hidden_dim": 64},
        "pieg": {"steps": 2},
        "bank": {"max_anchors": 256, "copies": 1},
    }
    merged = {g: {**base.get(g, {}), **groups.get(g, {})} for g in {*base, *groups}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return PathoScope(**merged)


@pytest.fixture(scope="module")
def batch_and_dm(brats_root: Path) -> tuple[TrainBatch, BraTSDataModule]:
    L.seed_everything(0)
    dm = BraTSDataModule(
        str(brats_root), shots=2, image_size=64, n_test_healthy=6, n_test_tumorous=6, batch_size=4
    )
    return next(iter(dm.train_dataloader())), dm


def _trainer(tmp_path: Path, **kwargs: object) -> L.Trainer:
    """A quiet CPU Trainer without validation, checkpoints or logger."""
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        **kwargs,  # type: ignore[arg-type]
    )


def _spy_pieg(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, torch.Tensor]]:
    calls: list[dict[str, torch.Tensor]] = []
    real = model_module.pieg

    def spy(base: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        v_s = real(base, *args, **kwargs)
        calls.append({"base": base.detach().clone(), "v_s": v_s.detach().clone()})
        return v_s

    monkeypatch.setattr(model_module, "pieg", spy)
    return calls


def _rows_of(rows: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """For each row of `rows` (M, C), its index in `table` (N, C); -1 where it is not there."""
    same = (rows[:, None, :] == table[None, :, :]).all(-1)  # (M, N)
    return torch.where(same.any(1), same.float().argmax(1), torch.full_like(same[:, 0], -1).long())


# ---------------------------------------------------------------- PiEG on a subset of cells


@pytest.mark.parametrize("in_foreground", [True, False])
def test_max_cells_perturbs_a_fresh_random_subset_of_the_cells_pieg_would_perturb(
    batch_and_dm: tuple, monkeypatch: pytest.MonkeyPatch, in_foreground: bool
) -> None:
    """pieg.max_cells = m: PiEG receives m distinct cells drawn from the ones it perturbs without it
    (the foreground cells, or every cell), in their order; the draw is seeded by the step (the same
    step gives the same cells, another step others); BCE(D(v_s), 1) is the mean over those m."""
    batch, dm = batch_and_dm
    calls = _spy_pieg(monkeypatch)
    m = 24
    model = _module(pieg={"max_cells": m}, losses={"synthetic_in_foreground": in_foreground}).model
    model.build_bank(dm.anchor_images(copies=1).image, n_bank_images=2)
    outs = [model.training_losses(batch, step=s) for s in (3, 3, 4)]
    v_n = model.embed(batch.image, fast_backbone=True).detach()
    fg = mask_to_grid(batch.foreground, tuple(v_n.shape[1:3]), 0.5)
    pool = v_n[fg] if in_foreground else v_n.reshape(-1, v_n.shape[-1])
    assert pool.shape[0] > 2 * m  # the subset is a real choice
    picked = [_rows_of(c["base"].reshape(-1, pool.shape[1]), pool) for c in calls]
    for idx in picked:
        assert idx.shape == (m,) and bool((idx >= 0).all())  # cells of the pool ...
        assert bool((idx[1:] > idx[:-1]).all())  # ... distinct, in the pool's order
    assert torch.equal(picked[0], picked[1]) and not torch.equal(picked[0], picked[2])
    model.discriminator.train()
    v_p = model.embed(batch.lesion_image, fast_backbone=True).detach()
    rows = torch.cat([v_n.reshape(-1, 384), v_p.reshape(-1, 384), calls[2]["v_s"].reshape(-1, 384)])
    logits = model.discriminator(rows)
    torch.testing.assert_close(outs[2]["bce_s"], bce(logits[-m:], 1.0))


def test_max_cells_keeps_eq4_on_the_foreground_of_the_chosen_cells(
    batch_and_dm: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PiEG over every cell (synthetic_in_foreground off) with Eq. 4 inside the foreground: the
    subset's v_n term of L_GC is the mean anchor distance over the chosen cells that lie in the
    foreground, worked out here from the bank's plain search."""
    batch, dm = batch_and_dm
    calls = _spy_pieg(monkeypatch)
    model = _module(pieg={"max_cells": 40}, losses={"synthetic_in_foreground": False}).model
    model.build_bank(dm.anchor_images(copies=1).image, n_bank_images=2)
    v_n = model.embed(batch.image, fast_backbone=True).detach()
    fg = mask_to_grid(batch.foreground, tuple(v_n.shape[1:3]), 0.5).reshape(-1)
    synth = model.synthesize(
        v_n,
        model.embed(batch.lesion_image, fast_backbone=True).detach(),
        fg.reshape(v_n.shape[:3]),
        step=5,
    )
    idx = _rows_of(calls[0]["base"].reshape(-1, 384), v_n.reshape(-1, 384))
    inside = fg[idx]
    assert 0 < int(inside.sum()) < 40  # the draw holds foreground and background cells
    dist, _ = model.bank.nearest(v_n.reshape(-1, 384)[idx][inside])
    expected = dist.mean() / model.bank.distance_scale
    torch.testing.assert_close(synth.d_global_n, expected)
    assert synth.region is not None and torch.equal(synth.region.reshape(-1), inside)


def test_stop_at_scores_with_d_under_pieg_frozen_statistics(batch_and_dm: tuple) -> None:
    """pieg.stop_at in the model: with the target at the median of D(start), scored here as PiEG
    sees D (BatchNorm frozen at [v_n, v_p]'s statistics), exactly the positions whose start is at
    or above the target stay at the start, and the others move."""
    batch, dm = batch_and_dm
    model = _module(pieg={"steps": 3, "eta": 0.05}).model
    model.build_bank(dm.anchor_images(copies=1).image, n_bank_images=2)
    model.discriminator.train()
    v_n = model.embed(batch.image, fast_backbone=True).detach()
    v_p = model.embed(batch.lesion_image, fast_backbone=True).detach()
    fg = mask_to_grid(batch.foreground, tuple(v_n.shape[1:3]), 0.5)

    def v_s_with(**pieg: object) -> torch.Tensor:
        model.hp = dataclasses.replace(model.hp, pieg=dataclasses.replace(model.hp.pieg, **pieg))
        return model.synthesize(v_n, v_p, fg, step=7).v_s

    start = v_s_with(enabled=False)
    stats = model.discriminator.batch_stats(torch.cat([v_n, v_p]))
    with torch.no_grad():
        p0 = torch.sigmoid(model.discriminator(start, bn_stats=stats))
    target = float(p0.median())
    v_s = v_s_with(enabled=True, stop_at=target)
    still = (v_s == start).all(-1)
    assert torch.equal(still, p0 >= target)
    assert 0 < int(still.sum()) < still.numel()


def test_max_cells_at_or_above_the_cell_count_changes_nothing(batch_and_dm: tuple) -> None:
    """A subset as large as the cells PiEG perturbs is all of them: the step is the paper's,
    exactly (no draw is made, so even PiEG's Gaussian start is the same)."""
    batch, dm = batch_and_dm
    outs = []
    for max_cells in (0, 100_000):
        torch.manual_seed(0)  # the same initial D
        model = _module(pieg={"max_cells": max_cells}).model
        model.build_bank(dm.anchor_images(copies=1).image, n_bank_images=2)
        outs.append(model.training_losses(batch, step=2))
    for key in ("loss", "bce_s", "gc", "pieg_shift"):
        torch.testing.assert_close(outs[0][key], outs[1][key], rtol=0, atol=0)


# ---------------------------------------------------------------- D's first layer, once


def test_head_of_fc1_is_forward_and_hidden_stats_are_batchnorms() -> None:
    """forward(v) = head(fc1(v)) in training and evaluation mode; hidden_stats gives BatchNorm's
    own batch mean and biased variance (its running statistics move by exactly them)."""
    torch.manual_seed(0)
    d = Discriminator(16, 32)
    v = torch.randn(50, 16) * 3.0 + 1.0
    for mode in (True, False):
        d.train(mode)
        before = d.bn.running_var.clone()
        ref = d(v)
        d.bn.running_var.copy_(before)
        torch.testing.assert_close(d.head(d.fc1(v)), ref)
    d.train()
    mean, var = hidden_stats(d.fc1(v))
    d.bn.reset_running_stats()
    d.bn.momentum = 1.0  # the running statistics become the batch's own
    d.head(d.fc1(v))
    torch.testing.assert_close(mean, d.bn.running_mean)
    torch.testing.assert_close(var * 50 / 49, d.bn.running_var)  # BatchNorm stores it unbiased


def test_frozen_statistics_pass_equals_batchnorm_with_those_statistics() -> None:
    """D(v, bn_stats) folds BatchNorm into fc1: the same values and input gradient as BatchNorm in
    evaluation mode with those statistics, and no gradient for D's parameters is accumulated."""
    torch.manual_seed(1)
    d = Discriminator(16, 32)
    with torch.no_grad():
        d.bn.weight.uniform_(0.5, 2.0)
        d.bn.bias.uniform_(-1.0, 1.0)
    stats = (torch.randn(32), torch.rand(32) + 0.5)
    v = torch.randn(40, 16, requires_grad=True)
    ref_in = v.detach().clone().requires_grad_(True)
    h = torch.nn.functional.batch_norm(
        d.fc1(ref_in), stats[0], stats[1], d.bn.weight, d.bn.bias, False, 0.0, d.bn.eps
    )
    ref = d.fc2(d.act(h))[:, 0]
    (g_ref,) = torch.autograd.grad(ref.sum(), ref_in)
    out = d(v, bn_stats=stats)
    (g,) = torch.autograd.grad(out.sum(), v)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(g, g_ref)
    assert all(p.grad is None for p in d.parameters())


# ---------------------------------------------------------------- the learning-rate schedule


def test_cosine_factor_by_hand() -> None:
    assert cosine_factor(0, 100) == 1.0
    assert cosine_factor(50, 100) == pytest.approx(0.5)
    assert cosine_factor(25, 100) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert cosine_factor(100, 100) == pytest.approx(0.0, abs=1e-12)
    assert cosine_factor(150, 100) == pytest.approx(0.0, abs=1e-12)


def test_cosine_schedule_runs_both_rates_down_over_max_steps(
    batch_and_dm: tuple, tmp_path: Path
) -> None:
    """optim.schedule cosine: after step t of T = trainer.max_steps, each optimiser's rate is its
    configured rate times cosine_factor(t, T); "constant" leaves them alone."""
    _, dm = batch_and_dm
    seen: list[list[float]] = []

    class Rates(L.Callback):
        def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
            seen.append([g["lr"] for g in trainer.optimizers[0].param_groups])

    for schedule in ("cosine", "constant"):
        seen.clear()
        module = _module(optim={"schedule": schedule, "lr_adapter": 1e-4})
        trainer = _trainer(tmp_path, max_steps=4, callbacks=[Rates()])
        trainer.fit(module, dm)
        base = [1e-4, 1e-4, 2e-4, 2e-4]  # the adapter's weight and bias, then D's groups
        factors = [cosine_factor(t, 4) if schedule == "cosine" else 1.0 for t in range(1, 5)]
        flat = [[lr for lr in step] for step in seen]
        assert len(flat) == 4
        for rates, factor in zip(flat, factors, strict=True):
            assert len(set(rates[: len(rates) // 2])) == 1  # one rate per optimiser
            assert rates[0] == pytest.approx(base[0] * factor, abs=1e-12)
            assert rates[-1] == pytest.approx(base[-1] * factor, abs=1e-12)


def test_cosine_schedule_needs_a_finite_fit(batch_and_dm: tuple, tmp_path: Path) -> None:
    _, dm = batch_and_dm
    trainer = _trainer(tmp_path, max_steps=-1, max_epochs=-1)
    with pytest.raises(ValueError, match="optim.schedule='cosine' needs a finite fit"):
        trainer.fit(_module(optim={"schedule": "cosine"}), dm)


def test_schedule_choice_is_checked() -> None:
    with pytest.raises(ValueError, match="optim.schedule must be one of"):
        _module(optim={"schedule": "linear"})


# ---------------------------------------------------------------- CPU process settings


def test_cpu_settings_leave_a_users_choice_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int]] = []

    class FakeLibc:
        def mallopt(self, param: int, value: int) -> int:
            calls.append((param, value))
            return 1

    monkeypatch.setattr(cpu.ctypes, "CDLL", lambda _name: FakeLibc())
    monkeypatch.setattr(cpu.platform, "system", lambda: "Linux")
    monkeypatch.setattr(cpu.platform, "libc_ver", lambda: ("glibc", "2.36"))
    for key in ("PATHOSCOPE_CPU_DEFAULTS", "GLIBC_TUNABLES", "MALLOC_ARENA_MAX"):
        monkeypatch.delenv(key, raising=False)
    assert cpu.keep_freed_memory() is True
    assert calls == [(-4, 0), (-1, 2**31 - 1)]  # M_MMAP_MAX = 0, M_TRIM_THRESHOLD = max int
    for key, value in (
        ("PATHOSCOPE_CPU_DEFAULTS", "1"),
        ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0"),
        ("MALLOC_ARENA_MAX", "2"),
    ):
        calls.clear()
        with monkeypatch.context() as m:
            m.setenv(key, value)
            assert cpu.keep_freed_memory() is False and calls == []
    monkeypatch.setattr(cpu.platform, "libc_ver", lambda: ("", ""))  # musl, macOS: nothing
    assert cpu.keep_freed_memory() is False and calls == []


def test_skip_nan_fill_keeps_deterministic_algorithms(monkeypatch: pytest.MonkeyPatch) -> None:
    flag = torch.utils.deterministic
    monkeypatch.setattr(flag, "fill_uninitialized_memory", True)
    monkeypatch.setenv("PATHOSCOPE_CPU_DEFAULTS", "1")
    cpu.skip_nan_fill()
    assert flag.fill_uninitialized_memory is True
    monkeypatch.delenv("PATHOSCOPE_CPU_DEFAULTS")
    cpu.skip_nan_fill()
    assert flag.fill_uninitialized_memory is False


def test_global_distance_of_a_subset_region_layout() -> None:
    """The (1, M, 1, C) layout PiEG's subset uses: Eq. 4 with a (1, M, 1) region is the mean over
    the region's rows (the layout the foreground-only synthesis already used, with a region)."""
    from pathoscope.anchor_bank import AnchorBank

    gen = torch.Generator().manual_seed(0)
    bank = AnchorBank.from_features(torch.randn(30, 8, generator=gen), backend="torch")
    v = torch.randn(1, 10, 1, 8, generator=gen)
    region = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 0, 1], dtype=torch.bool).reshape(1, 10, 1)
    dist = torch.cdist(v.reshape(10, 8), bank.anchors).min(1).values
    torch.testing.assert_close(global_distance(v, bank, region), dist[region.reshape(-1)].mean())


def test_training_backbone_is_e_folded_and_follows_es_weights() -> None:
    """Training embeds with E's folded channels_last copy: the same features within float
    rounding; the copy is rebuilt when E's weights change (a checkpoint loaded into the model)."""
    model = _module().model
    with torch.no_grad():  # BatchNorm statistics worth folding
        for m in model.backbone.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        model.embed(x, fast_backbone=True), model.embed(x), rtol=1e-4, atol=1e-4
    )
    first = model._fast_backbone()
    assert model._fast_backbone() is first  # cached
    assert not any(k.startswith("_fast") for k in model.state_dict())
    other = _module().model.backbone.state_dict()
    model.backbone.load_state_dict(other)
    assert model._fast_backbone() is not first
    torch.testing.assert_close(
        model.embed(x, fast_backbone=True), model.embed(x), rtol=1e-4, atol=1e-4
    )


# ---------------------------------------------------------------- D's step on a subset of cells


def _spy_fc1(model: torch.nn.Module) -> list[torch.Tensor]:
    """The inputs of D's first layer, in call order (the real rows come first in a step)."""
    seen: list[torch.Tensor] = []
    model.discriminator.fc1.register_forward_hook(
        lambda m, args, out: seen.append(args[0].detach())
    )
    return seen


def test_losses_max_cells_takes_focal_and_bce_n_over_the_same_seeded_cells_of_v_n_and_v_p(
    batch_and_dm: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    """losses.max_cells = m: D's step sees m distinct cells of v_n and the same m cells of v_p, in
    grid order, drawn per step (the same step draws the same cells, another step others); the
    focal loss and BCE(D(v_n), 0) are the means over them, against the lesion target of those
    cells, in one BatchNorm batch with v_s (worked out here from D's own forward)."""
    batch, dm = batch_and_dm
    calls = _spy_pieg(monkeypatch)
    m = 40
    model = _module(losses={"max_cells": m}).model
    model.build_bank(dm.anchor_images(copies=1).image, n_bank_images=2)
    seen = _spy_fc1(model)
    outs, real_rows = [], []
    for step in (3, 3, 4):
        seen.clear()
        outs.append(model.training_losses(batch, step=step))
        real_rows.append(seen[0])
    v_n = model.embed(batch.image, fast_backbone=True).detach()
    v_p = model.embed(batch.lesion_image, fast_backbone=True).detach()
    flat_n, flat_p = v_n.reshape(-1, 384), v_p.reshape(-1, 384)
    assert flat_n.shape[0] > 2 * m
    picked = []
    for rows in real_rows:
        assert rows.shape == (2 * m, 384)
        idx_n, idx_p = _rows_of(rows[:m], flat_n), _rows_of(rows[m:], flat_p)
        assert bool((idx_n >= 0).all()) and torch.equal(idx_n, idx_p)  # the same cells of both
        assert bool((idx_n[1:] > idx_n[:-1]).all())
        picked.append(idx_n)
    assert torch.equal(picked[0], picked[1]) and not torch.equal(picked[0], picked[2])

    idx = picked[2]
    lesion = mask_to_grid(batch.lesion_mask, tuple(v_n.shape[1:3]), 0.5).reshape(-1)[idx]
    assert 0 < int(lesion.sum()) < m or int(lesion.sum()) == 0  # a real target either way
    model.discriminator.train()
    v_s = calls[2]["v_s"].reshape(-1, 384)
    logits = model.discriminator(torch.cat([flat_n[idx], flat_p[idx], v_s]))
    torch.testing.assert_close(outs[2]["bce_n"], bce(logits[:m], 0.0))
    torch.testing.assert_close(outs[2]["focal"], focal_loss(logits[m : 2 * m], lesion, 2.0))
    torch.testing.assert_close(outs[2]["bce_s"], bce(logits[2 * m :], 1.0))


def test_losses_max_cells_at_or_above_the_cell_count_changes_nothing(batch_and_dm: tuple) -> None:
    batch, dm = batch_and_dm
    outs = []
    for max_cells in (0, 100_000):
        torch.manual_seed(0)
        model = _module(losses={"max_cells": max_cells}).model
        model.build_bank(dm.anchor_images(copies=1).image, n_bank_images=2)
        outs.append(model.training_losses(batch, step=2))
    for key in ("loss", "focal", "bce_n", "bce_s", "gc", "lc"):
        torch.testing.assert_close(outs[0][key], outs[1][key], rtol=0, atol=0)


# ---------------------------------------------------------------- the training feature pool


def test_train_pool_repeats_the_stream_and_marks_each_draw(brats_root: Path) -> None:
    """data.train_pool = P: global index g gives the item of g mod P, marked `draw` = g mod P;
    without it items have no draw and never repeat."""
    small = {
        "shots": 2,
        "image_size": 64,
        "batch_size": 2,
        "n_test_healthy": 6,
        "n_test_tumorous": 6,
    }
    pooled = BraTSDataModule(str(brats_root), train_pool=6, **small)
    plain = BraTSDataModule(str(brats_root), **small)
    ds, fresh = pooled.train_dataset(), plain.train_dataset()
    for g in (1, 4):
        a, b = ds[g], ds[g + 6]
        assert a["draw"] == b["draw"] == g
        assert torch.equal(a["lesion_image"], b["lesion_image"])
        assert torch.equal(a["lesion_image"], fresh[g]["lesion_image"])  # the same g, the same item
    assert "draw" not in fresh[1]
    assert not torch.equal(fresh[1]["lesion_image"], fresh[7]["lesion_image"])
    with pytest.raises(ValueError, match="train_pool"):
        BraTSDataModule(str(brats_root), shots=2, train_pool=-1)


def _fit_weights(dm: BraTSDataModule, tmp_path: Path, steps: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    module = _module(losses={"max_cells": 50})
    trainer = _trainer(tmp_path, max_steps=steps, deterministic=True)
    trainer.fit(module, dm)
    assert module.model.__dict__.get("_feature_pool") is None  # forgotten after the fit
    return {k: v.clone() for k, v in module.model.state_dict().items()}


def test_feature_pool_trains_exactly_as_the_backbone_would(
    brats_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three epochs over a pool of one epoch: the pooled features replace the frozen backbone's
    without changing a weight of the fit, and the backbone runs only in the first epoch."""
    dm = BraTSDataModule(
        str(brats_root),
        shots=2,
        image_size=64,
        batch_size=2,
        steps_per_epoch=2,
        train_pool=4,
        n_test_healthy=6,
        n_test_tumorous=6,
    )
    runs = {"pooled": 0, "backbone": 0}
    real = model_module.PathoScopeModel.frozen_features

    def counted(name: str):
        def frozen(self, x, fast_backbone=False):  # noqa: ANN001, ANN202
            if fast_backbone:
                runs[name] += 1
            return real(self, x, fast_backbone)

        return frozen

    monkeypatch.setattr(model_module.PathoScopeModel, "frozen_features", counted("pooled"))
    pooled = _fit_weights(dm, tmp_path, steps=6)
    assert runs["pooled"] == 2  # epoch 0's two batches; epochs 1 and 2 from the pool
    real_pooled = model_module.PathoScopeModel.pooled_features
    monkeypatch.setattr(model_module.PathoScopeModel, "frozen_features", counted("backbone"))
    monkeypatch.setattr(
        model_module.PathoScopeModel,
        "pooled_features",
        lambda self, x_n, x_p, draws: real_pooled(self, x_n, x_p, None),
    )
    fresh = _fit_weights(dm, tmp_path, steps=6)
    assert runs["backbone"] == 6
    for key in pooled:
        torch.testing.assert_close(pooled[key], fresh[key], rtol=0, atol=0, equal_nan=True, msg=key)
