"""pathoscope.app.bench (`make bench`) machinery at tiny sizes, and the speed-only parts of the shipped
inference path (BatchNorm folded into the backbone's convolutions, upsample + blur as matrices).
No timing is asserted: only counts, orders, bookkeeping and exactness."""

from __future__ import annotations

import json
import math
import mmap
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pathoscope.app.bench import common, rss, run, training
from pathoscope.app.bench.common import Sizes, Timers, interleaved, median_spread, paired_ratios
from pathoscope.app.bench.flops import count_gmac
from pathoscope.folded import FoldedDetector, fuse_conv_bn, inference_backbone
from pathoscope.hparams import NetworkParams, PiEGParams
from pathoscope.postprocess import GaussianBlur
from pathoscope.torch_model import PathoScopeModel

TINY = Sizes(
    image_size=64,
    infer_batch=2,
    infer_rounds=1,
    train_batch=2,
    shots=2,
    pieg_steps=2,
    anchors=32,
    hidden_dim=32,
    train_rounds=1,
    coreset_features=600,
    rss_train_steps=1,
    test_healthy=4,
    test_tumorous=4,
)


def _model() -> PathoScopeModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return PathoScopeModel(NetworkParams(pretrained=False, hidden_dim=32))


# ---------------------------------------------------------------- timing helpers


def test_interleaved_warms_up_then_rotates_the_order() -> None:
    calls: list[str] = []
    variants = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = interleaved(variants, rounds=4, warmup=1)
    assert calls[:3] == ["a", "b", "c"]  # warm-up, not recorded
    assert calls[3:] == list("abcbcacababc")
    assert {k: len(v) for k, v in times.items()} == {"a": 4, "b": 4, "c": 4}
    assert all(t >= 0 for ts in times.values() for t in ts)


def test_paired_ratios_and_median_spread() -> None:
    assert paired_ratios([2.0, 3.0, 8.0], [1.0, 2.0, 4.0]) == [2.0, 1.5, 2.0]
    assert median_spread([3.0, 1.0, 2.0, 10.0]) == (2.5, (1.0, 10.0))
    with pytest.raises(ValueError):
        paired_ratios([1.0], [1.0, 2.0])  # rounds must pair up


def test_count_gmac_counts_multiply_accumulates() -> None:
    linear = nn.Linear(10, 20)
    assert count_gmac(lambda: linear(torch.randn(3, 10))) == pytest.approx(3 * 10 * 20 / 1e9)
    conv = nn.Conv2d(4, 8, 3, padding=1)
    assert count_gmac(lambda: conv(torch.randn(2, 4, 5, 5))) == pytest.approx(
        2 * 8 * 5 * 5 * 4 * 9 / 1e9
    )


def test_timers_count_the_outermost_call_and_search_inside_pieg() -> None:
    ticks = iter(range(100))  # each reading of the clock advances one second
    timers = Timers(clock=lambda: float(next(ticks)))
    search = timers.wrap("search", lambda inner: inner())  # nested search: counted once
    inner_search = timers.wrap("search", lambda: None)
    pieg = timers.wrap("pieg", lambda: search(inner_search))
    search(inner_search)  # outside PiEG: the clock reads 0 and 1
    pieg()  # pieg 2..5, its search 3..4
    assert timers.seconds == {"search": 2.0, "pieg": 3.0, "search_in_pieg": 1.0}
    timers.reset()
    assert timers.seconds == {}


def test_rss_helpers_see_a_new_allocation() -> None:
    # A fresh anonymous mapping, every page written: resident whatever the allocator has cached
    # (a torch tensor here may reuse pages freed by earlier tests and leave RSS unchanged).
    size = 64 * 2**20
    with common.RssSampler(interval=0.001) as rss:
        block = mmap.mmap(-1, size)
        block.write(b"\x01" * size)
    if rss.increase_mb is None:  # no /proc: not Linux
        pytest.skip("RSS sampling needs /proc/self/statm")
    assert rss.increase_mb >= 48.0
    assert common.peak_rss_mb() >= rss.peak_mb - 1.0
    block.close()


# ---------------------------------------------------------------- the shipped inference path


def test_fuse_conv_bn_folds_every_resnet_batchnorm_exactly() -> None:
    model = _model()
    with torch.no_grad():  # non-trivial statistics, so that folding has something to do
        for m in model.backbone.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    fast = inference_backbone(model.backbone)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.backbone.modules())
    assert n_bn == 15  # stem + 2x2 per layer (1..3) + 2 downsample paths
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    assert all(not p.requires_grad for p in fast.parameters())
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        ref, out = model.backbone(x), fast(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert isinstance(model.backbone.net.bn1, nn.BatchNorm2d)  # the model's own copy untouched


def test_fuse_conv_bn_leaves_batchnorm_that_does_not_follow_its_conv() -> None:
    net = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1))  # BN before the conv
    assert fuse_conv_bn(net) == 0
    assert isinstance(net[0], nn.BatchNorm2d)


@pytest.mark.parametrize(
    ("grid", "size"), [((8, 8), (64, 64)), ((7, 9), (50, 70)), ((3, 2), (5, 40))]
)
def test_upsample_blur_matrices_equal_interpolate_then_blur(
    grid: tuple[int, int], size: tuple[int, int]
) -> None:
    model = _model()
    folded = FoldedDetector.from_model(model.eval())
    s = torch.rand(3, *grid)
    ref = model.blur(F.interpolate(s[:, None], size=size, mode="bilinear", align_corners=False))
    out = folded.upsample_blur(s, size)
    assert out.shape == ref.shape == (3, 1, *size)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def test_upsample_blur_applies_an_unknown_blur_module_as_is() -> None:
    model = _model()
    folded = FoldedDetector.from_model(model.eval())
    folded.blur = nn.AvgPool2d(3, stride=1, padding=1)  # not GaussianBlur: no matrix form
    s = torch.rand(2, 8, 8)
    up = F.interpolate(s[:, None], size=(64, 64), mode="bilinear", align_corners=False)
    torch.testing.assert_close(folded.upsample_blur(s, (64, 64)), folded.blur(up))
    assert isinstance(model.blur, GaussianBlur)


# ---------------------------------------------------------------- the bench itself


@pytest.mark.slow
def test_bench_sections_at_tiny_sizes(brats_root: Path) -> None:
    result = run.run(TINY, ("flops", "infer", "coreset", "train"), str(brats_root))
    rows = {r["key"]: r for r in result["rows"]}
    for key in ("1a", "1b", "1c", "2a", "2b", "2c", "3a", "3b", "3c", "3d", "4a", "4b", "4c"):
        assert key in rows, key
    raw = result["raw"]
    # Folding removes the adapter and BatchNorm: fewer MACs, the backbone's the same.
    assert raw["flops"]["gmac_folded"] < raw["flops"]["gmac_unfolded"]
    assert raw["flops"]["gmac_trunk"] <= raw["flops"]["gmac_backbone"] < raw["flops"]["gmac_folded"]
    assert math.isclose(rows["1a"]["value"], raw["flops"]["gmac_folded"])
    # Every variant timed warm-up + rounds; ratios are per round.
    assert all(len(ts) == TINY.infer_rounds for ts in raw["infer"]["seconds_per_batch"].values())
    assert len(raw["train"]["ratios"]) == TINY.train_rounds
    # The coreset picked the bank's size; the candidate search agreed with the exact one.
    assert raw["coreset"]["features"] == [TINY.coreset_features, 384]
    assert raw["train"]["anchors"] == TINY.anchors
    checks = raw["train"]["candidate_check"]
    check, small = checks["as configured"], checks["eta, noise / 10"]
    for c in (check, small):
        assert c["queries"] > 0 and c["mismatches"] == 0
        assert 0 < c["searched_rows"] <= c["queries"]  # the set-up searched each row once
    # With eta and noise / 10, PiEG moved less.
    assert small["pieg_shift_over_scale"] < check["pieg_shift_over_scale"]
    assert rows["3c"]["passed"] is True and rows["3d"]["passed"] is True
    seconds = raw["train"]["median_seconds"]
    assert 0.0 < seconds["pathoscope"]["backbone"] < seconds["pathoscope"]["total"]
    assert seconds["pathoscope"]["search"] > 0.0
    assert seconds["glass_baseline"]["search"] == 0.0  # the baseline searches no anchor at all
    assert math.isclose(sum(raw["train"]["full_step_shares"].values()), 1.0)
    assert check["pieg_shift_over_scale"] > 0.0
    # 3a's ratio in two more PiEG regimes, paired per round, information only.
    regimes = raw["train"]["regimes"]
    small_regime = next(v for k, v in regimes.items() if k.startswith("eta, noise / 10"))
    yaml_regime = next(v for k, v in regimes.items() if k.startswith("as brats.yaml"))
    assert small_regime["pieg"]["eta"] == pytest.approx(PiEGParams().eta / 10)
    shipped = training.shipped_pieg()
    assert shipped["steps"] != TINY.pieg_steps  # the YAML's, not the bench's
    assert {k: yaml_regime["pieg"][k] for k in shipped} == shipped
    for regime in (small_regime, yaml_regime):
        assert len(regime["ratios"]) == TINY.train_rounds
    info = [
        r for r in result["rows"] if r["label"].startswith("train step full / GLASS-style, PiEG")
    ]
    assert len(info) == 2 and all(r["target"] == "" for r in info)
    for row in result["rows"]:  # a target always comes with a verdict
        assert (row["target"] == "") == (row["passed"] is None), row
    json.dumps({k: v for k, v in result.items() if k != "_rows"})  # bench.json is plain JSON


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["train", "test"])
def test_rss_child_runs_in_process(brats_root: Path, kind: str) -> None:
    out = rss.child_main(kind, brats_root, TINY)
    assert out["peak_rss_mib"] >= out["rss_after_imports_mib"] > 0
    if kind == "train":
        assert out["steps"] == TINY.rss_train_steps and out["anchors"] == TINY.anchors
    else:
        assert out["items"] == TINY.test_healthy + TINY.test_tumorous


def test_main_writes_bench_json(
    brats_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "bench.json"
    code = run.main(
        ["--quick", "--only", "flops", "--data-root", str(brats_root), "--out", str(out)]
    )
    assert code == 0
    data = json.loads(out.read_text())
    assert data["sections"] == ["flops"] and data["sizes"]["image_size"] == 64
    assert [r["key"] for r in data["rows"]] == ["1a", "1b", "1c"]
    assert data["command"].startswith("pathoscope bench --quick")
    printed = capsys.readouterr().out
    assert "1a" in printed and ("PASS" in printed or "FAIL" in printed)


@pytest.mark.slow
def test_seed_section_times_both_seeds_and_the_training_steps(brats_root: Path) -> None:
    """Section 6 at tiny sizes: each round runs a real seed of brats.yaml and one of anchor_knn
    (metrics.json of both), 6a is their paired ratio, 6b times exactly the steps asked for."""
    sizes = replace(TINY, seed_rounds=2, seed_steps=3, seed_overrides=common.QUICK.seed_overrides)
    result = run.run(sizes, ("seed",), str(brats_root))
    rows = {r["key"]: r for r in result["rows"]}
    assert [r["key"] for r in result["rows"]] == ["6a", "6.", "6b"]
    raw = result["raw"]["seed"]
    assert {k: len(v) for k, v in raw["seconds"].items()} == {"anchor_knn": 2, "pathoscope": 2}
    full, knn = raw["seconds"]["pathoscope"], raw["seconds"]["anchor_knn"]
    expected = [a / b for a, b in zip(full, knn, strict=True)]
    assert raw["ratios"] == pytest.approx(expected)
    assert rows["6a"]["value"] == pytest.approx(sorted(expected)[0] / 2 + sorted(expected)[1] / 2)
    assert rows["6a"]["target"] == "<= 8" and rows["6a"]["passed"] == (rows["6a"]["value"] <= 8)
    assert all(0.0 <= a <= 1.0 for ms in raw["image_auroc"].values() for a in ms)
    assert raw["training_steps"] == 3 and 0.0 < rows["6b"]["value"] == raw["training_steps_seconds"]
