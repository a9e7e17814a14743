"""PathoScope's hyperparameters, one frozen dataclass per concern.

The LightningModule takes one argument per group, so a YAML nests them and any key can be
overridden from the command line (`--model.pieg.eta 0.05`, `--model.bank.max_anchors 1024`).
Defaults are the paper's unless marked (GLASS) or (ours); docs/configs.md says how to add one.
Each group also accepts a plain mapping (`coerce`), which is how checkpoints store them.
Every numeric field has its allowed range in its class's RANGES (interval notation), checked at
construction with a message naming the setting (`check_range`, also used by the data modules).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, Literal, TypeVar

GroupT = TypeVar("GroupT")
_INTERVAL = re.compile(r"^([\[(])\s*(\S+)\s*,\s*(\S+)\s*([\])])$")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_range(name: str, value: Any, interval: str) -> None:
    """ValueError naming the setting `name` unless `value` is a number in `interval`.

    `interval` is written as in mathematics: "[0, inf)" (>= 0), "(0, inf)" (> 0), "(0, 1]", "[1, inf)"
    and so on; NaN is never inside, and an open "inf" end refuses infinity.
    """
    match = _INTERVAL.match(interval)
    if match is None:
        raise ValueError(f"check_range: bad interval {interval!r}")
    left, lo_text, hi_text, right = match.groups()
    lo, hi = float(lo_text), float(hi_text)
    number = isinstance(value, int | float) and not isinstance(value, bool)
    inside = number and (
        (lo <= value if left == "[" else lo < value)
        and (value <= hi if right == "]" else value < hi)
    )
    if inside:
        return
    if math.isinf(hi) and right == ")":
        expected = f"{'>=' if left == '[' else '>'} {lo_text}"
        if math.isinf(lo):
            expected = "a finite number"
    else:
        expected = f"in {interval}"
    raise ValueError(f"{name} must be {expected}, got {value!r}")


def check_ranges(group: str, params: Any) -> None:
    """Each field of `params` named in its class's RANGES lies in its interval."""
    for name, interval in type(params).RANGES.items():
        check_range(f"{group}.{name}", getattr(params, name), interval)


@dataclass(frozen=True)
class NetworkParams:
    """The networks E and D.

    Args:
        pretrained: load timm's `resnet18.tv_in1k` into the frozen backbone E.
        weights: a local ResNet18 state dict (.pth / .safetensors); wins over `pretrained`.
        hidden_dim: width of the discriminator D's hidden layer (GLASS: 1024).
    """

    pretrained: bool = True
    weights: str | None = None
    hidden_dim: int = 1024

    RANGES: ClassVar[dict[str, str]] = {"hidden_dim": "[1, inf)"}

    def __post_init__(self) -> None:
        check_ranges("network", self)


@dataclass(frozen=True)
class PiEGParams:
    """Pathology-informed Embedding Generation (Eq. 3).

    Args:
        enabled: run the gradient steps; False leaves v_s = v_n plus the Gaussian start only
            (the SimpleNet-style ablation).
        eta: step size (paper Fig. 5: 0.01 BraTS2020, 0.05 ChestXray8).
        steps: T, the number of steps (paper: 20).
        direction: "descent" (ours, the default): each step moves v_s down the gradient of its
            L_global terms, so D(v_s) rises and v_s leaves the normal anchors, as the paper's text
            describes the generated embeddings. "ascent": Eq. 3's printed sign (GLASS's hard
            negatives; the GLASS baselines use it). docs/design.md gives the measurements.
        noise_std: std of the Gaussian start (GLASS / SimpleNet: 0.015).
        noise_mean: mean of the Gaussian start (ours: 0).
        keep_noise: keep the start in v_s (the iterative reading); False = Eq. 3 as printed.
        units: "absolute" (the paper's: eta and the noise in feature units, sized for ImageNet
            ResNet18 features) or "distance_scale" (ours: multiplied by the bank's
            distance_scale, the same fraction of the anchor spacing for any backbone).
        min_distance: radius r in units of the bank's distance_scale (ours; 0 = off): the minimum
            ||v_s - v_n|| per position, or with `projection` GLASS's bounded forms.
        projection: "none", "hypersphere" (||v_s - v_n|| in [r, 2r]) or "manifold" (the distance
            of v_s to its nearest anchor in [r, 2r]); see `pathoscope.pieg.project`.
        max_cells: at most this many cells of the batch are perturbed per step, drawn at random
            from those PiEG would perturb (ours; 0 = all of them, the paper). BCE(D(v_s), 1) and
            Eq. 4 are means over cells, so a random subset estimates them without bias at a
            fraction of PiEG's discriminator passes and searches.
        stop_at: a target D(v_s) in (0, 1) at which a position stops moving (ours; 0 = off, the
            paper: every position takes all `steps`). With "descent" a position moves while
            D(v_s) < stop_at, with "ascent" while D(v_s) > stop_at; 0.5 keeps v_s at D's
            boundary instead of walking it to where D already says 1.0.
    """

    enabled: bool = True
    eta: float = 0.01
    steps: int = 20
    direction: Literal["descent", "ascent"] = "descent"
    noise_std: float = 0.015
    noise_mean: float = 0.0
    keep_noise: bool = True
    units: Literal["absolute", "distance_scale"] = "absolute"
    min_distance: float = 0.0
    projection: Literal["none", "hypersphere", "manifold"] = "none"
    max_cells: int = 0
    stop_at: float = 0.0

    RANGES: ClassVar[dict[str, str]] = {
        "eta": "[0, inf)",
        "steps": "[0, inf)",
        "noise_std": "[0, inf)",
        "noise_mean": "(-inf, inf)",
        "min_distance": "[0, inf)",
        "max_cells": "[0, inf)",
        "stop_at": "[0, 1)",
    }

    def __post_init__(self) -> None:
        check_ranges("pieg", self)
        _check_choice("pieg.direction", self.direction, ("descent", "ascent"))
        _check_choice("pieg.units", self.units, ("absolute", "distance_scale"))
        _check_choice("pieg.projection", self.projection, ("none", "hypersphere", "manifold"))


@dataclass(frozen=True)
class LossParams:
    """The training losses (Eq. 1, 2, 4, 5, 6).

    Args:
        use_local_contrast: the L_LC term (Eq. 1); off in the paper's "L_GC" ablation.
        use_global_contrast: the L_GC term (Eq. 4); off in the paper's "L_LC" ablation.
        lambda_pull: tritanh's lambda_0 on distances / distance_scale (ours; the paper leaves it open).
        lambda_push: tritanh's lambda_1 (ours).
        eps: tritanh's epsilon (ours).
        focal_gamma: focal loss gamma (GLASS: 2).
        lesion_min_fraction: a feature cell is lesion when this fraction of its pixels is (ours;
            GLASS max-pools). The data's lesion synthesis uses the same value (linked by the CLI).
        global_in_foreground: Eq. 4 averages inside the foreground (ours; the paper averages all).
        synthetic_in_foreground: PiEG generates v_s only at the foreground cells, and BCE(D(v_s), 1)
            is taken there (ours; the paper perturbs every cell, `False`). Background cells of an
            MRI slice are all alike and never anomalous; perturbing them teaches D nothing about
            anatomy and costs half of PiEG's discriminator passes (the same quality in fewer
            steps: benchmarks/ABLATION.md, `synthetic_all_cells`). A no-op where the foreground
            is the whole image (radiographs).
        max_cells: at most this many cells of each of v_n and v_p enter D's step (the focal loss,
            BCE(D(v_n), 0) and the BatchNorm statistics PiEG freezes), drawn at random per step
            (ours; 0 = every cell, the paper). Both losses are means over cells, which a random
            subset estimates without bias; a speed switch (D's first layer on every cell of the
            batch was 40 % of a step).
    """

    use_local_contrast: bool = True
    use_global_contrast: bool = True
    lambda_pull: float = 1.0
    lambda_push: float = 1.0
    eps: float = 1e-6
    focal_gamma: float = 2.0
    lesion_min_fraction: float = 0.5
    global_in_foreground: bool = True
    synthetic_in_foreground: bool = True
    max_cells: int = 0

    RANGES: ClassVar[dict[str, str]] = {
        "max_cells": "[0, inf)",
        "lambda_pull": "(0, inf)",
        "lambda_push": "(0, inf)",
        "eps": "[0, inf)",
        "focal_gamma": "[0, inf)",
        "lesion_min_fraction": "(0, 1]",
    }

    def __post_init__(self) -> None:
        check_ranges("losses", self)


@dataclass(frozen=True)
class BankParams:
    """The prototypical anchor bank.

    Args:
        coreset_ratio: fraction of the features kept as anchors (PatchCore: 10%).
        max_anchors: at most this many anchors (ours).
        copies: augmented copies of each of the K shots that go into the bank (ours).
        heldout_copies: further copies, never in the bank, that set its distance_scale (ours).
        seed: seed of the copies and of the coreset's random projection (ours).
        backend: "faiss" (CPU index) or "torch" (chunked search, same answers, GPU friendly).
        knn_candidates: candidates per position for PiEG's exact search (ours; speed only).
    """

    coreset_ratio: float = 0.1
    max_anchors: int = 4096
    copies: int = 4
    heldout_copies: int = 1
    seed: int = 0
    backend: Literal["faiss", "torch"] = "faiss"
    knn_candidates: int = 8

    RANGES: ClassVar[dict[str, str]] = {
        "coreset_ratio": "(0, 1]",
        "max_anchors": "[1, inf)",
        "copies": "[0, inf)",
        "heldout_copies": "[0, inf)",
        "seed": "[0, inf)",  # numpy seeds the augmented copies: no negative seeds
        "knn_candidates": "[1, inf)",
    }

    def __post_init__(self) -> None:
        check_ranges("bank", self)
        _check_choice("bank.backend", self.backend, ("faiss", "torch"))


SCORE_SOURCES = ("discriminator", "anchor_distance", "fusion")
SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class ScoringParams:
    """From patch scores to the anomaly map, the image score and the threshold tau.

    Args:
        source: "discriminator" (the method), "anchor_distance" (the PatchCore-style
            nearest-anchor baseline: the distance in units of distance_scale, no training needed)
            or "fusion" (ours): D's probability times the anchor distance of the same features, a
            calibration-free product of the two (it needs the bank's search at inference, so
            it is not folded and not exported).
        blur_sigma: Gaussian blur of the upsampled map, in pixels (GLASS: 4).
        tau_quantile: quantile of the validation normals' scores used as tau (ours).
    """

    source: Literal["discriminator", "anchor_distance", "fusion"] = "discriminator"
    blur_sigma: float = 4.0
    tau_quantile: float = 0.95

    RANGES: ClassVar[dict[str, str]] = {"blur_sigma": "[0, inf)", "tau_quantile": "[0, 1]"}

    def __post_init__(self) -> None:
        check_ranges("scoring", self)
        _check_choice("scoring.source", self.source, SCORE_SOURCES)


@dataclass(frozen=True)
class OptimParams:
    """The two optimisers (GLASS's values).

    Args:
        lr_adapter: Adam learning rate of the adapter f (GLASS: 1e-4).
        weight_decay_adapter: its weight decay (GLASS: 1e-5).
        lr_discriminator: AdamW learning rate of the discriminator D (GLASS: 2e-4).
        weight_decay_discriminator: its weight decay (AdamW's default 0.01).
        ema_decay: validate, test and save an exponential moving average of the adapter's and
            D's weights with this decay per step (ours; 0 = off, the last weights).
        schedule: the learning rates over the fit: "constant" (GLASS) or "cosine" (ours): both
            rates fall from their value to 0 along half a cosine over trainer.max_steps, so the
            last weights settle instead of stopping mid-stride.
    """

    lr_adapter: float = 1e-4
    weight_decay_adapter: float = 1e-5
    lr_discriminator: float = 2e-4
    weight_decay_discriminator: float = 0.01
    ema_decay: float = 0.0
    schedule: Literal["constant", "cosine"] = "constant"

    RANGES: ClassVar[dict[str, str]] = {
        "lr_adapter": "(0, inf)",
        "weight_decay_adapter": "[0, inf)",
        "lr_discriminator": "(0, inf)",
        "weight_decay_discriminator": "[0, inf)",
        "ema_decay": "[0, 1)",
    }

    def __post_init__(self) -> None:
        check_ranges("optim", self)
        _check_choice("optim.schedule", self.schedule, SCHEDULES)


@dataclass(frozen=True)
class ModelParams:
    """Every group the torch model needs (the optimisers belong to the LightningModule)."""

    network: NetworkParams = NetworkParams()
    pieg: PiEGParams = PiEGParams()
    losses: LossParams = LossParams()
    bank: BankParams = BankParams()
    scoring: ScoringParams = ScoringParams()

    def __post_init__(self) -> None:
        for f in fields(self):  # mappings (from checkpoints) become their group's dataclass
            object.__setattr__(self, f.name, coerce(type(f.default), getattr(self, f.name)))

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain nested dicts, as checkpoints and YAML hold them."""
        return asdict(self)


def coerce(cls: type[GroupT], value: GroupT | Mapping[str, Any]) -> GroupT:
    """`value` as a `cls` instance: returned as is, or built from a mapping of its fields."""
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise TypeError(f"{cls.__name__}: expected {cls.__name__} or a mapping, got {value!r}")
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(
            f"{cls.__name__}: unknown key(s) {unknown}; expected some of {sorted(known)}"
        )
    return cls(**value)
