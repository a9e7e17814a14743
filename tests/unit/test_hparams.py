"""Range checks of the hyperparameter groups: every numeric setting has an interval, checked at
construction with a message naming the setting (group.field)."""

from __future__ import annotations

import math
import re
from dataclasses import fields
from typing import Any

import pytest

from pathoscope.hparams import (
    BankParams,
    LossParams,
    ModelParams,
    NetworkParams,
    OptimParams,
    PiEGParams,
    ScoringParams,
    check_range,
)

GROUPS = {
    "network": NetworkParams,
    "pieg": PiEGParams,
    "losses": LossParams,
    "bank": BankParams,
    "scoring": ScoringParams,
    "optim": OptimParams,
}


def _outside(interval: str, integer: bool) -> list[Any]:
    """Values just outside `interval` (and NaN for floats)."""
    left, lo, hi, right = re.match(r"^([\[(])(\S+), (\S+)([\])])$", interval).groups()  # type: ignore[union-attr]
    lo_v, hi_v = float(lo), float(hi)
    step = 1 if integer else 1e-9
    out: list[Any] = []
    if math.isfinite(lo_v):
        out.append(lo_v - step if left == "[" else lo_v)
    if math.isfinite(hi_v):
        out.append(hi_v + step if right == "]" else hi_v)
    if not integer:
        out.append(math.nan)
        if math.isinf(hi_v):
            out.append(math.inf)
    return [int(v) if integer and math.isfinite(v) else v for v in out]


def _numeric_fields(cls: type) -> dict[str, type]:
    defaults = cls()
    return {
        f.name: type(getattr(defaults, f.name))
        for f in fields(cls)
        if type(getattr(defaults, f.name)) in (int, float)
    }


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_every_numeric_setting_has_a_range(group: str) -> None:
    cls = GROUPS[group]
    assert set(_numeric_fields(cls)) == set(cls.RANGES), group
    cls()  # the defaults lie inside


@pytest.mark.parametrize(
    ("group", "name", "interval"),
    [(g, n, i) for g, cls in sorted(GROUPS.items()) for n, i in cls.RANGES.items()],
)
def test_values_outside_the_range_are_refused_naming_the_setting(
    group: str, name: str, interval: str
) -> None:
    cls = GROUPS[group]
    integer = _numeric_fields(cls)[name] is int
    bad = _outside(interval, integer)
    assert bad, interval
    for value in bad:
        with pytest.raises(ValueError, match=rf"^{group}\.{name} must be .*, got "):
            cls(**{name: value})


@pytest.mark.parametrize(
    ("value", "interval", "message"),
    [
        (-1.0, "[0, inf)", "x must be >= 0, got -1.0"),
        (0, "(0, inf)", "x must be > 0, got 0"),
        (1.5, "(0, 1]", "x must be in (0, 1], got 1.5"),
        (math.nan, "(-inf, inf)", "x must be a finite number, got nan"),
        (True, "[0, inf)", "x must be >= 0, got True"),  # a bool is not a number here
        ("1", "[0, inf)", "x must be >= 0, got '1'"),
    ],
)
def test_check_range_messages(value: Any, interval: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        check_range("x", value, interval)
    check_range("x", 1, "[1, inf)")  # inside: nothing
    check_range("x", 1.0, "(0, 1]")


def test_negative_pieg_steps_and_eta_are_refused() -> None:
    """Negative steps used to mean "no PiEG" silently, a negative eta to walk backwards."""
    with pytest.raises(ValueError, match=r"pieg\.eta must be >= 0, got -1"):
        ModelParams(pieg={"eta": -1.0})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"pieg\.steps must be >= 0, got -5"):
        ModelParams(pieg={"steps": -5})  # type: ignore[arg-type]
    assert ModelParams(pieg={"steps": 0, "eta": 0.0}).pieg.steps == 0  # type: ignore[arg-type]
