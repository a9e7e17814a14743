"""The decision at tau: one rule (`postprocess.pathological`, score >= tau), owned by the model's
`ImageThreshold` and used by every path that turns a score or a map into a decision. Each path is
pinned at a value exactly equal to tau: it must decide as just above tau, not as just below."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

from callbacks.metrics import EvalData, compute_metrics
from callbacks.panels import _title
from pathoscope.app.predict.common import decision
from pathoscope.app.predict.images import ImageResult
from pathoscope.app.predict.montage import montage_image
from pathoscope.postprocess import ImageThreshold, pathological

TAU = 0.5  # exact in float32, so the stored buffer and the float compare equal
BELOW = float(np.nextafter(np.float32(TAU), np.float32(0)))
ABOVE = float(np.nextafter(np.float32(TAU), np.float32(1)))
ROOT = Path(__file__).resolve().parents[2]


def test_the_rule_at_tau_for_floats_arrays_and_tensors() -> None:
    assert pathological(TAU, TAU) and pathological(ABOVE, TAU) and not pathological(BELOW, TAU)
    values = np.array([BELOW, TAU, ABOVE], np.float32)
    assert pathological(values, TAU).tolist() == [False, True, True]
    assert pathological(torch.from_numpy(values), TAU).tolist() == [False, True, True]


def test_image_threshold_fits_stores_and_decides() -> None:
    threshold = ImageThreshold()
    assert threshold.value is None and threshold.decide(1.0) is None  # unset: no decision
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 9.0])
    labels = np.array([0, 0, 0, 0, 0, 1])
    # The 0.75 quantile of the five normals: position 0.75 * 4 = 3, exactly the fourth, 0.4.
    assert threshold.fit(scores, labels, 0.75) == pytest.approx(0.4)
    assert threshold.decide(np.float32(threshold.value)) and not threshold.decide(0.39)
    assert "tau" in threshold.state_dict()
    assert threshold.fit(scores[5:], labels[5:], 0.75) is None  # no normal item: unset again
    assert torch.isnan(threshold.tau)


def test_checkpoints_from_before_the_threshold_object_load_their_tau() -> None:
    from pathoscope.torch_model import PathoScopeModel

    with pytest.warns(UserWarning, match="randomly initialised"):
        model = PathoScopeModel(network={"pretrained": False})
    state = model.state_dict()
    state["tau"] = torch.tensor(0.25)  # the key older checkpoints carry
    del state["threshold.tau"]
    model.load_state_dict(state)
    assert model.threshold.value == 0.25 and float(model.tau) == 0.25


def _eval_data(score: float, map_value: float) -> EvalData:
    """One normal item scoring `score` and one pathological item; maps constant at map_value."""
    maps = np.full((2, 4, 4), map_value, np.float32)
    gt = np.zeros((2, 4, 4), bool)
    gt[1] = True
    return EvalData(
        scores=np.array([score, 2.0], np.float32),
        labels=np.array([0, 1]),
        maps=maps,
        gt_masks=gt,
        foreground=np.ones((2, 4, 4), bool),
        has_mask=np.ones(2, bool),
        index=np.arange(2),
        subject=np.array(["a", "b"]),
        slice=np.zeros(2, np.int64),
    )


def test_metrics_at_tau() -> None:
    at = compute_metrics(_eval_data(TAU, TAU), TAU)
    above = compute_metrics(_eval_data(ABOVE, ABOVE), TAU)
    below = compute_metrics(_eval_data(BELOW, BELOW), TAU)
    assert at["specificity"] == above["specificity"] == 0.0 and below["specificity"] == 1.0
    assert at["dice_at_tau"] == above["dice_at_tau"] > below["dice_at_tau"] == 0.0


def test_predict_paths_at_tau() -> None:
    assert decision(TAU, TAU) == decision(ABOVE, TAU) == "1" and decision(BELOW, TAU) == "0"
    image = np.zeros((4, 4), np.float32)
    at = ImageResult(Path("x.png"), image, np.full((4, 4), TAU, np.float32), TAU, TAU)
    below = ImageResult(Path("x.png"), image, np.full((4, 4), BELOW, np.float32), BELOW, TAU)
    assert at.pathological is True and below.pathological is False
    assert at.pred_mask is not None and at.pred_mask.all()
    assert below.pred_mask is not None and not below.pred_mask.any()


def test_montage_at_tau_is_drawn_as_above() -> None:
    def draw(score: float) -> np.ndarray:
        images = np.full((1, 16, 16), 0.5, np.float32)
        maps = np.linspace(0, 1, 256, dtype=np.float32).reshape(1, 16, 16)
        fg = np.ones((1, 16, 16), bool)
        return montage_image("v", images, maps, fg, [3], np.array([score], np.float32), TAU)

    at, above, below = draw(TAU), draw(ABOVE), draw(BELOW)
    assert np.array_equal(at, above) and not np.array_equal(at, below)


def test_panel_title_at_tau() -> None:
    data = _eval_data(TAU, TAU)
    assert _title("miss", 1, data, 1, TAU)[1].endswith("IoU 1.00")
    below = _eval_data(BELOW, BELOW)
    assert _title("miss", 1, below, 1, TAU)[1].endswith("IoU 0.00")


def test_no_comparison_with_tau_outside_the_rule() -> None:
    """Outside tests, `pathological` in postprocess.py is the only code that orders a value
    against tau (<, <=, >, >= with a name or attribute called tau)."""
    found = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in {"tests", "runs", "data"} or rel.parts[0].startswith(".venv"):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare) and _orders(node) and _names_tau(node):
                found.append(f"{rel}:{node.lineno}: {ast.unparse(node)}")
    assert found == [f"pathoscope/postprocess.py:{_rule_line()}: values >= tau"]


def _rule_line() -> int:
    tree = ast.parse((ROOT / "pathoscope/postprocess.py").read_text())
    fn = next(
        n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "pathological"
    )
    return next(n.lineno for n in ast.walk(fn) if isinstance(n, ast.Compare))


def _orders(node: ast.Compare) -> bool:
    return any(isinstance(op, (ast.Lt, ast.LtE, ast.Gt, ast.GtE)) for op in node.ops)


def _names_tau(node: ast.Compare) -> bool:
    return any(
        (isinstance(n, ast.Name) and n.id == "tau")
        or (isinstance(n, ast.Attribute) and n.attr == "tau")
        for n in ast.walk(node)
    )
