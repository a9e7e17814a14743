"""The wiring of one training step, pinned against the paper's equations worked out here by hand:
which features enter which side of each tritanh (Eq. 1, 2, 4), which lambda multiplies which
distance, the eps, the targets of the focal loss and of both BCE terms (Eq. 5, 6), and their sum.

The features are set by hand (the frozen backbone is replaced by fixed tensors, the adapter is the
identity), the bank is built from hand-made anchors, and PiEG's output v_s is taken from the step
itself (PiEG's own maths is tested elsewhere); every expected value below comes from plain torch
(cdist, exp, sigmoid, log), not from the project's loss helpers. Non-default lambdas, eps and
gamma make each swap visible: swapping either tritanh's arguments, the two lambdas, dropping eps,
or inverting a target changes some value.
"""

from __future__ import annotations

import pytest
import torch

import pathoscope.torch_model as model_module
from pathoscope.batches import TrainBatch
from pathoscope.torch_model import PathoScopeModel

B, H, W, C = 2, 4, 4, 384  # feature grid; images are 8x larger (FEATURE_STRIDE)
L0, L1, EPS, GAMMA = 0.7, 1.9, 0.3, 1.5


def _tritanh(pull: torch.Tensor, push: torch.Tensor) -> torch.Tensor:
    a, b = torch.exp(L0 * pull), torch.exp(L1 * push)
    return (a - b + EPS) / (a + b + EPS)


def _nearest(x: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    return torch.cdist(x.double(), anchors.double()).min(1).values


def _d_forward(d: torch.nn.Module, rows: torch.Tensor) -> torch.Tensor:
    """GLASS's discriminator by hand: Linear, BatchNorm with the batch's statistics, LeakyReLU 0.2."""
    z = rows.double() @ d.fc1.weight.double().T + d.fc1.bias.double()
    mean, var = z.mean(0), z.var(0, unbiased=False)
    z = (z - mean) / torch.sqrt(var + d.bn.eps) * d.bn.weight.double() + d.bn.bias.double()
    z = torch.where(z > 0, z, 0.2 * z)
    return (z @ d.fc2.weight.double().T + d.fc2.bias.double())[:, 0]


@pytest.fixture()
def step(monkeypatch: pytest.MonkeyPatch) -> dict:
    gen = torch.Generator().manual_seed(0)
    anchors = torch.randn(40, C, generator=gen)
    heldout = anchors[:10] + 0.3 * torch.randn(10, C, generator=gen)
    v_n = anchors[torch.randint(0, 40, (B, H, W), generator=gen)]
    v_n = v_n + 0.2 * torch.randn(B, H, W, C, generator=gen)
    v_p = v_n + 0.8 * torch.randn(B, H, W, C, generator=gen)  # the lesion moved them further
    model = PathoScopeModel(
        network={"pretrained": False, "hidden_dim": 32},
        pieg={"steps": 2},
        # PiEG and BCE(D(v_s), 1) on every cell (the paper's reading; the shipped default keeps
        # the foreground cells only, which the equations below would index the same way)
        losses={
            "lambda_pull": L0,
            "lambda_push": L1,
            "eps": EPS,
            "focal_gamma": GAMMA,
            "synthetic_in_foreground": False,
        },
        bank={"backend": "torch"},
    ).train()
    with torch.no_grad():
        model.adapter.linear.weight.copy_(torch.eye(C))
        model.adapter.linear.bias.zero_()
    model.bank.build(anchors, coreset_ratio=1.0, max_anchors=4096, heldout=heldout)
    features = torch.cat([v_n, v_p])
    monkeypatch.setattr(model, "pooled_features", lambda x_n, x_p, draws: features.clone())
    captured: list[torch.Tensor] = []
    real = model_module.pieg

    def spy(*args: object, **kwargs: object) -> torch.Tensor:
        v_s = real(*args, **kwargs)
        captured.append(v_s.detach().clone())
        return v_s

    monkeypatch.setattr(model_module, "pieg", spy)
    lesion = torch.zeros(B, 1, 8 * H, 8 * W)
    lesion[0, :, 8:16, 8:24] = 1.0  # image 0: cells (1, 1) and (1, 2)
    lesion[1, :, 16:24, 24:32] = 1.0  # image 1: cell (2, 3)
    foreground = torch.ones(B, 1, 8 * H, 8 * W, dtype=torch.bool)
    foreground[0, :, 24:] = False  # image 0: the last row of cells is background
    batch = TrainBatch(
        image=torch.zeros(B, 3, 8 * H, 8 * W),
        lesion_image=torch.zeros(B, 3, 8 * H, 8 * W),
        lesion_mask=lesion,
        foreground=foreground,
        index=torch.arange(B),
    )
    out = model.training_losses(batch, step=3)
    assert len(captured) == 1
    return {
        "out": out,
        "model": model,
        "anchors": anchors,
        "heldout": heldout,
        "v_n": v_n,
        "v_p": v_p,
        "v_s": captured[0].reshape(B, H, W, C),
        "lesion_cells": lesion[:, 0, ::8, ::8] > 0,  # (B, H, W)
        "fg_cells": foreground[:, 0, ::8, ::8],
    }


def test_the_step_s_losses_are_the_equations(step: dict) -> None:
    out, model, anchors = step["out"], step["model"], step["anchors"]
    v_n, v_p, v_s = step["v_n"], step["v_p"], step["v_s"]
    lesion, fg = step["lesion_cells"], step["fg_cells"]
    scale = _nearest(step["heldout"], anchors).median()  # distance_scale: the held-out median

    # Eq. 1: per image, the mean nearest-anchor distance over its lesion cells; then the mean
    # over images; v_n is pulled (lambda_pull), v_p pushed (lambda_push).
    def local(v: torch.Tensor) -> torch.Tensor:
        per_image = [_nearest(v[i][lesion[i]], anchors).mean() for i in range(B)]
        return torch.stack(per_image).mean() / scale

    lc = _tritanh(local(v_n), local(v_p))

    # Eq. 4: the same over the foreground cells, for v_n (pulled) and v_s (pushed).
    def global_(v: torch.Tensor) -> torch.Tensor:
        per_image = [_nearest(v[i][fg[i]], anchors).mean() for i in range(B)]
        return torch.stack(per_image).mean() / scale

    gc = _tritanh(global_(v_n), global_(v_s))

    # Eq. 5, 6: D on [v_n, v_p, v_s] in one BatchNorm batch; focal on v_p against the lesion
    # cells, BCE(D(v_n), 0) and BCE(D(v_s), 1).
    rows = torch.cat([v_n.reshape(-1, C), v_p.reshape(-1, C), v_s.reshape(-1, C)])
    logits = _d_forward(model.discriminator, rows)
    n = B * H * W
    p_n, p_p, p_s = torch.sigmoid(logits).split([n, n, n])
    y = lesion.reshape(-1).double()
    p_t = y * p_p + (1 - y) * (1 - p_p)
    focal = (-((1 - p_t) ** GAMMA) * torch.log(p_t)).mean()
    bce_n = -torch.log(1 - p_n).mean()
    bce_s = -torch.log(p_s).mean()

    expected = {"lc": lc, "gc": gc, "focal": focal, "bce_n": bce_n, "bce_s": bce_s}
    expected["loss"] = sum(expected.values())
    assert 0.05 < float(y.mean()) < 0.2  # a real lesion target: both classes present
    assert abs(float(lc)) < 0.99 and abs(float(gc)) < 0.99  # tritanh is not saturated
    for key, value in expected.items():
        torch.testing.assert_close(out[key].double(), value, rtol=1e-4, atol=1e-5, msg=key)
