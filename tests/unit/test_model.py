"""PathoScope (LightningModule) and PathoScopeModel (torch): training wiring, checkpoints, folded
inference, hyperparameter groups."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from data_modules.brats import BraTSDataModule
from pathoscope.batches import ImageBatch
from pathoscope.checkpoint import CHECKPOINT_VERSION, CheckpointError, load_model
from pathoscope.folded import FoldedDetector
from pathoscope.hparams import PiEGParams
from pathoscope.joint_optimizer import JointOptimizer
from pathoscope.lightning_model import PathoScope
from pathoscope.postprocess import GaussianBlur, image_score

FAST = {
    "network": {"pretrained": False, "hidden_dim": 64},
    "pieg": {"steps": 2},
    "bank": {"max_anchors": 256, "copies": 1},
}


def _model(**groups: dict) -> PathoScope:
    """FAST, with each group's fields updated by `groups` (e.g. pieg={"eta": 0.05})."""
    merged = {g: {**FAST.get(g, {}), **groups.get(g, {})} for g in {*FAST, *groups}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return PathoScope(**merged)


def _datamodule(root: Path, **kw: object) -> BraTSDataModule:
    args = dict(shots=2, image_size=64, n_test_healthy=6, n_test_tumorous=6, batch_size=4)
    return BraTSDataModule(str(root), **{**args, **kw})


def _trainer(tmp_path: Path, max_steps: int) -> L.Trainer:
    return L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        enable_checkpointing=False,
    )


@pytest.fixture(scope="module")
def fitted(
    brats_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[PathoScope, Path, dict]:
    """One short fit shared by the tests: the model, its checkpoint and the backbone's state before."""
    L.seed_everything(0)
    tmp = tmp_path_factory.mktemp("fit")
    model = _model()
    before = {k: v.clone() for k, v in model.model.backbone.state_dict().items()}
    trainer = _trainer(tmp, max_steps=3)
    trainer.fit(model, _datamodule(brats_root))
    ckpt = tmp / "model.ckpt"
    trainer.save_checkpoint(ckpt)
    return model, ckpt, {"before": before, "global_step": trainer.global_step}


def test_global_step_counts_batches(fitted: tuple) -> None:
    model, _, info = fitted
    assert info["global_step"] == 3  # one JointOptimizer step per batch, not two


def test_backbone_unchanged_by_training(fitted: tuple) -> None:
    model, _, info = fitted
    after = model.model.backbone.state_dict()
    assert set(after) == set(info["before"])
    for k, v in info["before"].items():
        assert torch.equal(after[k], v), k
    assert model.model.bank.built and len(model.model.bank) <= 256


def test_checkpoint_round_trip_reproduces_maps(fitted: tuple, brats_root: Path) -> None:
    model, ckpt, _ = fitted
    loaded = PathoScope.from_checkpoint(ckpt)
    assert torch.equal(loaded.model.bank.anchors, model.model.bank.anchors)
    assert float(loaded.model.bank.distance_scale) == float(model.model.bank.distance_scale)
    assert loaded.preprocessing["dataset"] == "brats" and loaded.preprocessing["image_size"] == 64
    assert loaded.weights_tag == "random"
    batch = next(iter(_datamodule(brats_root).test_dataloader()))
    model.eval()
    with torch.no_grad():
        a = model(batch.image, batch.foreground)
        b = loaded(batch.image, batch.foreground)
    assert torch.equal(a.anomaly_map, b.anomaly_map)
    assert torch.equal(a.score, b.score)
    # The anchor-distance score also survives the round trip (the FAISS index is rebuilt).
    model = copy.deepcopy(model)  # changed below; the fixture is shared
    loaded.model.with_scoring(source="anchor_distance")
    model.model.with_scoring(source="anchor_distance")
    with torch.no_grad():
        assert torch.equal(model(batch.image).anomaly_map, loaded(batch.image).anomaly_map)


def test_torch_model_loads_without_a_trainer(fitted: tuple, brats_root: Path) -> None:
    """predict and export build from the torch model of a checkpoint: same maps, tau, metadata."""
    model, ckpt, _ = fitted
    torch_model = load_model(ckpt)
    assert not isinstance(torch_model, L.LightningModule)
    assert torch_model.preprocessing == model.preprocessing and torch_model.weights_tag == "random"
    assert torch_model.hp.pieg == model.model.hp.pieg and torch_model.hp.bank == model.model.hp.bank
    assert not torch_model.hp.network.pretrained  # the weights come from the checkpoint
    assert torch.equal(torch_model.tau.isnan(), model.tau.isnan())
    batch = next(iter(_datamodule(brats_root).test_dataloader()))
    model.eval()
    with torch.no_grad():
        a = model(batch.image, batch.foreground)
        b = torch_model(batch.image, batch.foreground)
    assert torch.equal(a.anomaly_map, b.anomaly_map) and torch.equal(a.score, b.score)


def test_checkpoint_stores_plain_grouped_hyperparameters(fitted: tuple) -> None:
    _, ckpt, _ = fitted
    data = torch.load(ckpt, weights_only=True)  # plain data only: no pickled classes
    hparams = data["hyper_parameters"]
    assert set(hparams) == {"network", "pieg", "losses", "bank", "scoring", "optim"}
    assert hparams["pieg"]["steps"] == 2 and hparams["pieg"]["direction"] == "descent"
    assert data["pathoscope"]["version"] == CHECKPOINT_VERSION == 2
    assert (
        "model.bank.anchors" in data["state_dict"] and "model.threshold.tau" in data["state_dict"]
    )


@pytest.mark.parametrize("version", [1, 999])
def test_checkpoint_of_another_version_is_refused_naming_file_and_versions(
    tmp_path: Path, fitted: tuple, version: int
) -> None:
    _, ckpt, _ = fitted
    data = torch.load(ckpt, weights_only=False)
    data["pathoscope"]["version"] = version
    bad = tmp_path / "old.ckpt"
    torch.save(data, bad)
    for load in (PathoScope.from_checkpoint, PathoScope.load_from_checkpoint, load_model):
        with pytest.raises(CheckpointError) as info:
            load(bad)
        message = str(info.value)
        assert str(bad) in message
        assert f"version {version}" in message and f"version {CHECKPOINT_VERSION}" in message


def test_file_that_is_not_a_checkpoint_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "x.ckpt"
    torch.save({"state_dict": {}}, bad)
    with pytest.raises(CheckpointError, match="x.ckpt: not a usable PathoSCOPE checkpoint"):
        load_model(bad)


@pytest.mark.parametrize("content", ["random", "pickled object"])
def test_unreadable_file_is_refused_in_our_words(tmp_path: Path, content: str) -> None:
    """A random file renamed .ckpt, or a pickle holding a non-tensor object: one message naming
    the file and what was expected, never torch's advice to load it with weights_only=False."""
    bad = tmp_path / "x.ckpt"
    if content == "random":
        bad.write_bytes(np.random.default_rng(0).bytes(4096))
    else:
        torch.save({"state_dict": {}, "obj": Path("somewhere")}, bad)
    with pytest.raises(CheckpointError) as info:
        load_model(bad)
    message = str(info.value)
    assert message.startswith(f"{bad}: not a readable checkpoint (expected a .ckpt")
    assert "weights_only" not in message and "arbitrary code" not in message


def test_folded_inference_equals_model(fitted: tuple) -> None:
    model = copy.deepcopy(fitted[0])  # changed below; the fixture is shared
    model.eval()
    net = model.model
    with (
        torch.no_grad()
    ):  # a non-identity adapter and non-trivial BatchNorm make folding non-trivial
        net.adapter.linear.weight.add_(0.01 * torch.randn_like(net.adapter.linear.weight))
        net.discriminator.bn.running_mean.add_(0.3)
        folded = FoldedDetector.from_model(net)
        x = torch.randn(3, 3, 64, 96)
        fg = torch.rand(3, 1, 64, 96) > 0.4
        ref = model(x, fg)
        score, amap = folded(x, fg)
    assert (amap - ref.anomaly_map).abs().max() < 1e-5
    assert (score - ref.score).abs().max() < 1e-5


def test_loss_is_sum_of_enabled_terms(brats_root: Path) -> None:
    L.seed_everything(0)
    dm = _datamodule(brats_root)
    batch = next(iter(dm.train_dataloader()))
    for switches, terms in [
        ({}, {"focal", "lc", "bce_n", "bce_s", "gc"}),
        ({"use_local_contrast": False}, {"focal", "bce_n", "bce_s", "gc"}),
        ({"use_global_contrast": False, "use_local_contrast": False}, {"focal", "bce_n", "bce_s"}),
    ]:
        model = _model(losses=switches).model
        anchors = dm.anchor_images(copies=1)
        model.build_bank(anchors.image, n_bank_images=2)
        out = model.training_losses(batch)
        assert terms <= set(out)
        assert not ({"focal", "lc", "bce_n", "bce_s", "gc"} - terms) & set(out)
        assert torch.allclose(out["loss"], sum(out[k] for k in terms))


def test_joint_optimizer_steps_both_and_round_trips() -> None:
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)
    opt = JointOptimizer(
        [torch.optim.Adam(a.parameters(), lr=0.1), torch.optim.AdamW(b.parameters(), lr=0.1)]
    )
    wa, wb = a.weight.clone(), b.weight.clone()
    b(a(torch.ones(1, 2))).sum().backward()
    opt.step()
    assert not torch.equal(wa, a.weight) and not torch.equal(wb, b.weight)
    assert len(opt.param_groups) == 2 and len(opt.state) == 4
    opt2 = JointOptimizer(
        [torch.optim.Adam(a.parameters(), lr=0.1), torch.optim.AdamW(b.parameters(), lr=0.1)]
    )
    opt2.load_state_dict(opt.state_dict())
    assert torch.equal(
        opt2.optimizers[0].state[a.weight]["exp_avg"], opt.optimizers[0].state[a.weight]["exp_avg"]
    )


def test_gaussian_blur_matches_dense_reference() -> None:
    blur = GaussianBlur(2.0)
    m = torch.rand(2, 1, 20, 24)
    radius = 8  # the rule: ceil(4 sigma), worked out here, not read from the module
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k1 = torch.exp(-0.5 * (x / 2.0) ** 2)
    k2 = (k1[:, None] * k1[None]) / k1.sum() ** 2  # the 2D kernel, separable
    padded = torch.nn.functional.pad(m, (radius,) * 4, mode="reflect")
    ref = torch.nn.functional.conv2d(padded, k2[None, None])
    assert torch.allclose(blur(m), ref, atol=1e-6)
    assert abs(float(blur(torch.ones(1, 1, 20, 24)).mean()) - 1.0) < 1e-6


def test_image_score_is_max_inside_foreground() -> None:
    m = torch.zeros(2, 1, 4, 4)
    m[0, 0, 0, 0] = 5.0  # outside the foreground of image 0
    m[0, 0, 2, 2] = 1.0
    m[1, 0, 3, 3] = 2.0
    fg = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    fg[0, 0, 1:, 1:] = True  # image 1: empty foreground -> whole map
    assert image_score(m, fg).tolist() == [1.0, 2.0]
    assert image_score(m).tolist() == [5.0, 2.0]


@pytest.mark.parametrize("units", ["absolute", "distance_scale"])
def test_pieg_units_scale_the_step(brats_root: Path, units: str) -> None:
    """One noiseless PiEG step moves every position by eta feature units ("absolute", the paper's)
    or by eta bank distance scales ("distance_scale"); train/pieg_shift is in distance scales."""
    L.seed_everything(0)
    dm = _datamodule(brats_root)
    batch = next(iter(dm.train_dataloader()))
    model = _model(pieg={"units": units, "eta": 0.05, "steps": 1, "noise_std": 0.0}).model
    model.build_bank(dm.anchor_images(copies=1).image, n_bank_images=2)
    scale = float(model.bank.distance_scale)
    assert scale > 0.0 and abs(scale - 1.0) > 0.1  # the two units must differ here
    shift = float(model.training_losses(batch)["pieg_shift"])
    expected = 0.05 if units == "distance_scale" else 0.05 / scale
    assert shift == pytest.approx(expected, rel=1e-4)


def test_pieg_units_rejects_unknown() -> None:
    with pytest.raises(ValueError, match="pieg.units"):
        PiEGParams(units="pixels")
    with pytest.raises(ValueError, match="pieg.units"):
        _model(pieg={"units": "pixels"})


def test_groups_accept_mappings_and_refuse_unknown_keys() -> None:
    model = _model(pieg={"eta": 0.05}, scoring={"tau_quantile": 0.9})
    assert model.model.hp.pieg == PiEGParams(eta=0.05, steps=2)
    assert model.tau_quantile == 0.9 and model.hparams["pieg"]["eta"] == 0.05
    with pytest.raises(ValueError, match="unknown key"):
        _model(pieg={"pieg_eta": 0.05})


def test_evaluation_steps_use_the_folded_detector_of_current_weights(fitted: tuple) -> None:
    """validation/test steps run the folded graph built at epoch start: same outputs as forward,
    rebuilt from the weights of that moment, and never part of the state_dict."""
    model = copy.deepcopy(fitted[0])  # changed below; the fixture is shared
    model.eval()
    keys = set(model.state_dict())
    x = torch.randn(2, 3, 64, 64)
    fg = torch.rand(2, 1, 64, 64) > 0.3
    with torch.no_grad():
        model.model.discriminator.fc2.bias.add_(0.5)  # weights after the previous epoch's training
        model.on_validation_epoch_start()
        assert isinstance(model._evaluator[0], FoldedDetector)  # folded.inference_net's choice
        out = model.validation_step(ImageBatch(image=x, foreground=fg), 0)
        ref = model(x, fg)
    assert (out["anomaly_map"] - ref.anomaly_map).abs().max() < 1e-5
    assert (out["score"] - ref.score).abs().max() < 1e-5
    assert set(model.state_dict()) == keys
    model.on_validation_epoch_end()
    assert model._evaluator == ()  # released


@pytest.mark.parametrize(
    ("pieg", "expected"), [({}, "descent"), ({"direction": "ascent"}, "ascent")]
)
def test_pieg_direction_reaches_pieg(
    brats_root: Path, monkeypatch: pytest.MonkeyPatch, pieg: dict, expected: str
) -> None:
    """The model's PiEG goes downhill by default (GPEs leave the normal anchors, the paper's text);
    `pieg.direction="ascent"` (Eq. 3's printed sign, the GLASS baselines) is passed through."""
    import pathoscope.torch_model as model_module

    seen: list[str] = []
    real = model_module.pieg

    def spy(*args: object, **kwargs: object) -> torch.Tensor:
        params = kwargs["params"]
        assert isinstance(params, PiEGParams)
        seen.append(params.direction)
        return real(*args, **kwargs)

    monkeypatch.setattr(model_module, "pieg", spy)
    L.seed_everything(0)
    dm = _datamodule(brats_root)
    model = _model(pieg=pieg).model
    model.build_bank(dm.anchor_images(copies=1).image, n_bank_images=2)
    model.training_losses(next(iter(dm.train_dataloader())))
    assert seen == [expected]


def test_synthetic_in_foreground_perturbs_and_scores_only_foreground_cells(
    brats_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With losses.synthetic_in_foreground, PiEG receives exactly the foreground cells of v_n (in
    order) and BCE(D(v_s), 1) is their mean; without it, every cell."""
    import pathoscope.torch_model as model_module
    from pathoscope.losses import bce, mask_to_grid

    seen: dict[str, torch.Tensor] = {}
    real = model_module.pieg

    def spy(base: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        seen["base"] = base.detach().clone()
        seen["v_s"] = real(base, *args, **kwargs)
        return seen["v_s"]

    monkeypatch.setattr(model_module, "pieg", spy)
    L.seed_everything(0)
    dm = _datamodule(brats_root)
    batch = next(iter(dm.train_dataloader()))
    for on in (False, True):
        model = _model(losses={"synthetic_in_foreground": on}).model
        model.build_bank(dm.anchor_images(copies=1).image, n_bank_images=2)
        out = model.training_losses(batch)
        v_n = model.embed(batch.image).detach()
        fg = mask_to_grid(batch.foreground, tuple(v_n.shape[1:3]), 0.5)
        expected = v_n[fg] if on else v_n.reshape(-1, v_n.shape[-1])
        assert 0 < fg.sum() < fg.numel()  # the batch has background cells
        torch.testing.assert_close(seen["base"].reshape(-1, v_n.shape[-1]), expected)
        model.discriminator.train()
        logits = model.discriminator(
            torch.cat(
                [
                    v_n.reshape(-1, 384),
                    model.embed(batch.lesion_image).detach().reshape(-1, 384),
                    seen["v_s"].detach().reshape(-1, 384),
                ]
            )
        )
        torch.testing.assert_close(out["bce_s"], bce(logits[2 * v_n[..., 0].numel() :], 1.0))


@pytest.mark.parametrize(("source", "warns"), [("discriminator", True), ("anchor_distance", False)])
def test_fit_of_zero_steps_warns_when_the_method_needs_training(
    brats_root: Path, tmp_path: Path, source: str, warns: bool
) -> None:
    """max_steps 0 leaves D untrained: its scores mean nothing, and the fit says so plainly; the
    nearest-anchor baseline needs no training and is not warned about."""
    model = _model(scoring={"source": source})
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _trainer(tmp_path, max_steps=0).fit(model, _datamodule(brats_root))
    flagged = [str(w.message) for w in seen if "0 training steps" in str(w.message)]
    assert len(flagged) == int(warns), flagged
    if warns:
        assert "scoring.source='discriminator'" in flagged[0] and "anchor_knn" in flagged[0]


def test_training_losses_wiring(brats_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PathoScopeModel.training_losses itself (not a copy of its steps): PiEG's passes through D
    use the BatchNorm statistics of the real features [v_n, v_p], detached, and leave D's running
    statistics alone (they move once, for the step's own pass); PiEG's terms hold no graph to the
    adapter (d_global_n and the statistics detached); v_s is v_n plus a constant, so it keeps the
    adapter's graph through v_n with an identity Jacobian; and the loss backpropagates."""
    import pathoscope.torch_model as model_module

    L.seed_everything(0)
    dm = _datamodule(brats_root)
    batch = next(iter(dm.train_dataloader()))
    model = _model(pieg={"steps": 3}).model.train()
    model.build_bank(dm.anchor_images(copies=1).image, n_bank_images=2)
    with torch.no_grad():  # away from the identity, so that the adapter's graph shows
        model.adapter.linear.weight.add_(0.05 * torch.randn_like(model.adapter.linear.weight))
    seen: dict = {}
    real_pieg = model_module.pieg

    def spy(v_n: torch.Tensor, terms: object, **kwargs: object) -> torch.Tensor:
        seen["v_n"], seen["terms"] = v_n, terms
        seen["v_s"] = real_pieg(v_n, terms, **kwargs)
        return seen["v_s"]

    monkeypatch.setattr(model_module, "pieg", spy)
    d = model.discriminator
    stats_of_calls: list = []
    real_forward = d.forward

    def forward(v: torch.Tensor, bn_stats: tuple | None = None) -> torch.Tensor:
        stats_of_calls.append(bn_stats)
        return real_forward(v, bn_stats=bn_stats)

    real_head = d.head
    head_rows: list = []

    def head(h: torch.Tensor) -> torch.Tensor:
        head_rows.append(h.shape[0])
        return real_head(h)

    monkeypatch.setattr(d, "forward", forward)
    monkeypatch.setattr(d, "head", head)
    tracked = int(d.bn.num_batches_tracked)
    out = model.training_losses(batch, step=1)

    # D: three PiEG passes with the real features' statistics, then the step's own pass on the
    # rows of v_n, v_p and v_s (one BatchNorm batch).
    assert [s is None for s in stats_of_calls] == [False, False, False]
    cells = batch.image.shape[0] * 8 * 8  # 64 px images: an 8 x 8 grid
    assert head_rows == [2 * cells + seen["v_s"].numel() // seen["v_s"].shape[-1]]
    with torch.no_grad():
        v_real = model.embed(torch.cat([batch.image, batch.lesion_image]))
        expected = d.batch_stats(v_real)
    for stats in stats_of_calls[:3]:
        assert not any(t.requires_grad for t in stats)
        for got, want in zip(stats, expected, strict=True):
            torch.testing.assert_close(got, want)
    assert int(d.bn.num_batches_tracked) == tracked + 1
    # PiEG's terms: a function of v_s alone.
    v = seen["v_s"].detach().requires_grad_(True)
    terms = seen["terms"](v)
    adapter_params = list(model.adapter.parameters())
    assert all(g is None for g in torch.autograd.grad(terms, adapter_params, allow_unused=True))
    # v_s = v_n + constant: identity Jacobian, and the adapter's graph through v_n.
    w = torch.randn_like(seen["v_s"])
    (g,) = torch.autograd.grad((seen["v_s"] * w).sum(), seen["v_n"], retain_graph=True)
    torch.testing.assert_close(g, w)
    (g_adapter,) = torch.autograd.grad(
        seen["v_s"].sum(), model.adapter.linear.weight, retain_graph=True
    )
    assert g_adapter.abs().sum() > 0
    assert float(torch.linalg.vector_norm(seen["v_s"] - seen["v_n"], dim=-1).min()) > 0
    out["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter_params)


def test_fusion_scores_are_d_times_the_anchor_distance(fitted: tuple) -> None:
    """scoring.source="fusion": each patch score is sigmoid(D(v)) times v's distance to its nearest
    anchor in units of distance_scale; the folded detector is not used for it."""
    import copy

    model = copy.deepcopy(fitted[0].model).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        d = model.patch_scores(x)  # discriminator
        model.with_scoring(source="anchor_distance")
        dist = model.patch_scores(x)
        model.with_scoring(source="fusion")
        fused = model.patch_scores(x)
    torch.testing.assert_close(fused, d * dist)
    assert not torch.allclose(fused, d) and not torch.allclose(fused, dist)
    from pathoscope.folded import inference_net

    assert inference_net(model) is model
