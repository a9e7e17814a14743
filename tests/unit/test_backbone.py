"""pathoscope.backbone: weight loading (timm / torchvision files), offline errors, shapes, freezing,
and the 3x3 aggregation + upsampling against a slow reference."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import save_file
from torch import Tensor, nn

import pathoscope.backbone as backbone_module
from pathoscope.backbone import FEATURE_DIM, Backbone, BackboneWeightsError

IGNORED_PREFIXES = ("layer4.", "fc.")


def random_backbone() -> Backbone:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Backbone: pretrained=False")
        return Backbone(pretrained=False)


@pytest.fixture(scope="module")
def timm_state() -> dict[str, Tensor]:
    torch.manual_seed(1)
    return timm.create_model("resnet18", pretrained=False).state_dict()


@pytest.fixture(scope="module")
def torchvision_state() -> dict[str, Tensor]:
    torch.manual_seed(2)
    state = torchvision.models.resnet18(weights=None).state_dict()
    # Non-trivial BatchNorm statistics, so that a skipped buffer would show.
    for k, v in state.items():
        if k.endswith(("running_mean", "running_var")):
            state[k] = torch.rand_like(v) + 0.5
    return state


@pytest.fixture(scope="module")
def truncated_state(timm_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Layers up to 3 only (layer4/fc are optional): small files for the error cases."""
    return {k: v for k, v in timm_state.items() if not k.startswith(IGNORED_PREFIXES)}


def write(state: dict[str, Tensor], path: Path) -> Path:
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


# ---------------------------------------------------------------- loading weights files


@pytest.mark.parametrize(("layout", "suffix"), [("timm", ".pth"), ("torchvision", ".safetensors")])
def test_full_resnet18_state_dict_loads_every_backbone_tensor(
    layout: str,
    suffix: str,
    timm_state: dict[str, Tensor],
    torchvision_state: dict[str, Tensor],
    tmp_path: Path,
) -> None:
    state = timm_state if layout == "timm" else torchvision_state
    path = write(state, tmp_path / f"resnet18_{layout}{suffix}")
    bb = Backbone(pretrained=True, weights=path)  # the file wins over pretrained=True
    loaded = bb.net.state_dict()
    for k, v in loaded.items():
        assert torch.equal(v, state[k]), k
    ignored = set(state) - set(loaded)
    assert ignored, "layer4/fc should be left over"
    assert all(k.startswith(IGNORED_PREFIXES) for k in ignored), sorted(ignored)
    # Every layer4/fc tensor is the only thing left over; nothing of layers 1-3 is ignored.
    assert ignored == {k for k in state if k.startswith(IGNORED_PREFIXES)}
    assert bb.weights_tag.startswith(path.name)
    assert all(not p.requires_grad for p in bb.parameters())


def test_file_without_num_batches_tracked_loads(
    truncated_state: dict[str, Tensor], tmp_path: Path
) -> None:
    # torchvision's published resnet18 file predates BatchNorm's counter buffer.
    state = {k: v for k, v in truncated_state.items() if not k.endswith("num_batches_tracked")}
    bb = Backbone(weights=write(state, tmp_path / "old.pth"))
    for k, v in bb.net.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(v, state[k]), k


def test_wrapped_and_ddp_prefixed_state_dict_loads(
    truncated_state: dict[str, Tensor], tmp_path: Path
) -> None:
    wrapped = {"state_dict": {f"module.{k}": v for k, v in truncated_state.items()}}
    path = tmp_path / "wrapped.pth"
    torch.save(wrapped, path)
    bb = Backbone(weights=path)
    for k, v in bb.net.state_dict().items():
        assert torch.equal(v, truncated_state[k]), k


def _expect_error(path: Path, match: str) -> None:
    with pytest.raises(BackboneWeightsError) as err:
        Backbone(weights=path)
    assert str(path) in str(err.value)
    assert match in str(err.value)


def test_missing_layer3_tensor_raises(truncated_state: dict[str, Tensor], tmp_path: Path) -> None:
    state = dict(truncated_state)
    del state["layer3.1.conv2.weight"]
    _expect_error(write(state, tmp_path / "missing.pth"), "layer3.1.conv2.weight")


def test_wrong_shape_raises(truncated_state: dict[str, Tensor], tmp_path: Path) -> None:
    state = dict(truncated_state)
    state["layer2.0.conv1.weight"] = torch.zeros(128, 64, 5, 5)
    _expect_error(write(state, tmp_path / "shape.safetensors"), "layer2.0.conv1.weight")


def test_unexpected_extra_keys_raise(truncated_state: dict[str, Tensor], tmp_path: Path) -> None:
    state = dict(truncated_state)
    state["head.proj.weight"] = torch.zeros(3, 3)
    _expect_error(write(state, tmp_path / "extra.pth"), "head.proj.weight")
    state = dict(truncated_state)  # a deeper ResNet's layer3 (resnet34 has 6 blocks)
    state["layer3.2.conv1.weight"] = torch.zeros(256, 256, 3, 3)
    _expect_error(write(state, tmp_path / "deeper.pth"), "layer3.2.conv1.weight")


def test_missing_and_unreadable_files_raise(tmp_path: Path) -> None:
    _expect_error(tmp_path / "nowhere.pth", "not found")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint")
    _expect_error(garbage, "could not read")
    not_tensors = tmp_path / "dict.pth"
    torch.save({"a": 1}, not_tensors)
    _expect_error(not_tensors, "mapping of parameter names to tensors")


def test_pretrained_offline_names_the_alternatives(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backbone_module, "_cached_pretrained_file", lambda: None)
    monkeypatch.setattr(backbone_module, "_hub_reachable", lambda *a, **k: False)

    def no_download(*args: object, **kwargs: object) -> nn.Module:
        raise AssertionError("must not try to download when offline")

    monkeypatch.setattr(backbone_module.timm, "create_model", no_download)
    with pytest.raises(BackboneWeightsError) as err:
        Backbone(pretrained=True)
    msg = str(err.value)
    assert "weights=PATH" in msg
    assert "pretrained=False" in msg
    assert backbone_module.PRETRAINED_TAG in msg


def test_weights_file_wins_without_touching_the_hub(
    monkeypatch: pytest.MonkeyPatch, truncated_state: dict[str, Tensor], tmp_path: Path
) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("the hub must not be consulted when weights=PATH is given")

    monkeypatch.setattr(backbone_module, "_cached_pretrained_file", fail)
    monkeypatch.setattr(backbone_module, "_hub_reachable", fail)
    bb = Backbone(pretrained=True, weights=write(truncated_state, tmp_path / "w.pth"))
    assert torch.equal(bb.net.state_dict()["conv1.weight"], truncated_state["conv1.weight"])


def test_pretrained_false_warns() -> None:
    with pytest.warns(UserWarning, match="far below the paper"):
        bb = Backbone(pretrained=False)
    assert bb.weights_tag == "random"


# ---------------------------------------------------------------- forward


@pytest.fixture(scope="module")
def bb() -> Backbone:
    torch.manual_seed(0)
    return random_backbone()


@pytest.mark.parametrize(("h", "w"), [(64, 64), (256, 256), (96, 160), (72, 40)])
def test_output_shape(bb: Backbone, h: int, w: int) -> None:
    x = torch.randn(1, 3, h, w)
    with torch.no_grad():
        e = bb(x)
    assert e.shape == (x.shape[0], FEATURE_DIM, math.ceil(h / 8), math.ceil(w / 8))
    assert bb.out_channels == FEATURE_DIM == 384
    assert torch.isfinite(e).all()


def test_frozen_under_train_mode(bb: Backbone) -> None:
    parent = nn.Sequential(bb)
    parent.train()
    assert all(not p.requires_grad for p in bb.parameters())
    assert not any(m.training for m in bb.net.modules())
    before = {k: v.clone() for k, v in bb.net.state_dict().items()}
    bb(torch.randn(2, 3, 64, 64) * 3.0 + 1.0)
    bb.train()  # called directly, too
    bb(torch.randn(2, 3, 64, 64))
    after = bb.net.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k


def ref_neighbourhood_mean(f: Tensor) -> Tensor:
    """3x3 mean over the neighbours inside the map (the border averages fewer cells)."""
    _, _, h, w = f.shape
    out = torch.empty_like(f)
    for i in range(h):
        for j in range(w):
            total = torch.zeros_like(f[:, :, 0, 0])
            count = 0
            for di in (-1, 0, 1):
                for dj in (-1, 0, 1):
                    y, x = i + di, j + dj
                    if 0 <= y < h and 0 <= x < w:
                        total = total + f[:, :, y, x]
                        count += 1
            out[:, :, i, j] = total / count
    return out


def ref_bilinear(f: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize with half-pixel centres (align_corners=False), edges clamped."""
    _, _, h, w = f.shape
    oh, ow = size

    def taps(n_out: int, n_in: int) -> list[tuple[int, int, float]]:
        out = []
        for o in range(n_out):
            src = max((o + 0.5) * n_in / n_out - 0.5, 0.0)
            i0 = min(int(math.floor(src)), n_in - 1)
            i1 = min(i0 + 1, n_in - 1)
            out.append((i0, i1, src - i0))
        return out

    out = torch.empty(f.shape[0], f.shape[1], oh, ow, dtype=f.dtype)
    for oy, (y0, y1, ly) in enumerate(taps(oh, h)):
        for ox, (x0, x1, lx) in enumerate(taps(ow, w)):
            out[:, :, oy, ox] = (
                (1 - ly) * (1 - lx) * f[:, :, y0, x0]
                + (1 - ly) * lx * f[:, :, y0, x1]
                + ly * (1 - lx) * f[:, :, y1, x0]
                + ly * lx * f[:, :, y1, x1]
            )
    return out


@pytest.mark.parametrize(("h", "w"), [(64, 48), (72, 40)])
def test_aggregation_and_upsampling_match_reference(bb: Backbone, h: int, w: int) -> None:
    x = torch.randn(2, 3, h, w)
    with torch.no_grad():
        e = bb(x)
        f2, f3 = bb.net(x)  # layer2 (B,128,H/8,W/8), layer3 (B,256,H/16,W/16)
    assert f2.shape[1] == 128 and f3.shape[1] == 256
    expected = torch.cat(
        [ref_neighbourhood_mean(f2), ref_bilinear(ref_neighbourhood_mean(f3), f2.shape[-2:])], 1
    )
    torch.testing.assert_close(e, expected, rtol=1e-5, atol=1e-5)
    # The aggregation is not a no-op on these maps.
    assert not torch.allclose(e[:, :128], f2, atol=1e-3)


def test_references_themselves() -> None:
    # A sanity check of the references themselves: constant maps stay constant.
    f = torch.full((1, 2, 3, 5), 7.0)
    torch.testing.assert_close(ref_neighbourhood_mean(f), f)
    torch.testing.assert_close(ref_bilinear(f, (6, 9)), torch.full((1, 2, 6, 9), 7.0))
    g = torch.arange(15.0).reshape(1, 1, 3, 5)
    torch.testing.assert_close(
        ref_bilinear(g, (7, 11)),
        F.interpolate(g, size=(7, 11), mode="bilinear", align_corners=False),
    )
