"""`pathoscope bench` (= `make bench`): speed and cost of PathoSCOPE, side by side in one run.

Sections (issue 7), each printed with its target and PASS/FAIL, all written to bench.json:
  1 flops      GMAC per image (torch.utils.flop_counter; MAC = FLOP / 2): folded (as shipped),
               unfolded model, and the backbone's share.
  2 infer      throughput of the shipped path (FoldedDetector: image -> blurred map + score)
               vs the bare ResNet18 trunk up to layer 3 in the same memory format (channels_last)
               and vs the bare timm trunk as timm gives it (eager NCHW).
  3 train      one training step (losses, backward, optimiser) of PathoSCOPE vs the GLASS-style
               baseline (no contrastive terms, no anchor search; same batch, same ascent steps);
               time shares of backbone, PiEG's discriminator passes and anchor search; the
               candidate search checked against the exact search.
  4 coreset    greedy coreset of N backbone features down to the bank size: time and memory.
  5 rss        peak RSS of a few training steps (Trainer.fit) and of testing with the metrics
               callback, each in its own process.

Timing protocol: each compared variant runs once to warm up, then a fixed number of rounds; each
round runs every variant once, in an order rotated per round (interleaved). Ratios are taken per
round (paired), so that load changes on a shared machine hit both sides of a ratio alike; the
tables give the median over rounds and the min-max spread. The backbone is random (pretrained=
False, no network): FLOPs and speed do not depend on the weights.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

CHANNELS_LAST = torch.channels_last
SECTIONS = ("flops", "infer", "train", "coreset", "rss")
BENCH_VERSION = 1


# --------------------------------------------------------------------------- sizes and targets
@dataclass(frozen=True)
class Sizes:
    """Problem sizes and repeat counts (the defaults are issue 7's)."""

    image_size: int = 256
    infer_batch: int = 32
    infer_rounds: int = 3
    train_batch: int = 8
    shots: int = 8
    pieg_steps: int = 20
    anchors: int = 4096
    hidden_dim: int = 1024
    train_rounds: int = 3
    coreset_features: int = 50_000
    rss_train_steps: int = 3
    test_healthy: int = 130
    test_tumorous: int = 290
    brats_subjects: int = 32
    brats_shape: tuple[int, int, int] = (48, 48, 92)  # (H, W, D); slices are resized to image_size
    weights: str | None = None  # a local ResNet18 state dict; None = random init (no network)


# Tiny sizes for a smoke test of the machinery (`--quick`); its figures mean nothing.
QUICK = Sizes(
    image_size=64,
    infer_batch=2,
    infer_rounds=2,
    train_batch=2,
    shots=2,
    pieg_steps=2,
    anchors=64,
    hidden_dim=64,
    train_rounds=2,
    coreset_features=1500,
    rss_train_steps=1,
    test_healthy=4,
    test_tumorous=4,
    brats_subjects=20,
    brats_shape=(64, 64, 100),
)

GMAC_TARGET = 2.25  # per 256x256 image, folded
THROUGHPUT_VS_SAME_FORMAT = 0.78
THROUGHPUT_VS_TIMM = 1.0
TRAIN_RATIO_TARGET = 1.3
CORESET_SECONDS = 30.0


@dataclass
class Row:
    """One line of the table: a measured value, its spread and (maybe) a target."""

    key: str
    label: str
    value: float | int | None
    unit: str = ""
    spread: tuple[float, float] | None = None  # (min, max) over rounds
    target: str = ""  # e.g. "<= 2.25"
    passed: bool | None = None  # None: information only

    def cells(self) -> list[str]:
        value = _fmt(self.value)
        spread = f"{_fmt(self.spread[0])}-{_fmt(self.spread[1])}" if self.spread else ""
        result = "" if self.passed is None else ("PASS" if self.passed else "FAIL")
        return [self.key, self.label, f"{value} {self.unit}".strip(), spread, self.target, result]


def _fmt(v: float | int | None) -> str:
    if v is None:
        return "-"
    if isinstance(v, int):
        return str(v)
    return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"


def _check(value: float, op: str, target: float) -> bool:
    return value <= target if op == "<=" else value >= target


# --------------------------------------------------------------------------- timing helpers
def median_spread(values: list[float]) -> tuple[float, tuple[float, float]]:
    return statistics.median(values), (min(values), max(values))


def interleaved(
    variants: dict[str, Callable[[], object]], rounds: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of each variant: `warmup` unrecorded calls each, then `rounds` rounds in
    which every variant runs once, the order rotated by one each round."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    gc.collect()  # a full collection costs ~0.3 s with torch and Lightning loaded: once here,
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            gc.collect(1)  # and the young generations before each call
            start = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - start)
    return times


def paired_ratios(num: list[float], den: list[float]) -> list[float]:
    return [a / b for a, b in zip(num, den, strict=True)]


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (MiB).

    Linux: VmHWM of /proc/self/status. Not ru_maxrss, which survives exec: a child spawned from a
    large parent would report the parent's peak.
    """
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return kib / 1024.0 if sys.platform != "darwin" else kib / 2**20


def current_rss_mb() -> float | None:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


class RssSampler:
    """Peak RSS above the level at entry, sampled every `interval` s by a thread (Linux)."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.start_mb: float | None = None
        self.peak_mb: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        now = current_rss_mb()
        if now is not None and (self.peak_mb is None or now > self.peak_mb):
            self.peak_mb = now

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self.start_mb = current_rss_mb()
        self.peak_mb = self.start_mb
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()  # what is still held at the end counts too

    @property
    def increase_mb(self) -> float | None:
        if self.start_mb is None or self.peak_mb is None:
            return None
        return self.peak_mb - self.start_mb


# --------------------------------------------------------------------------- data and models
def brats_root(sizes: Sizes, data_root: str | None) -> Path:
    """A BraTS2020-style folder: `data_root`, or a synthetic set cached in the temp folder."""
    if data_root is not None:
        return Path(data_root)
    from data_modules.synthetic import write_brats

    h, w, d = sizes.brats_shape
    cache = (
        Path(tempfile.gettempdir())
        / "pathoscope-bench"
        / f"brats-v2-{sizes.brats_subjects}-{h}x{w}x{d}"
    )
    done = cache / ".complete"
    if not done.is_file():  # written aside, then renamed: concurrent runs never see half a set
        part = cache.parent / f"{cache.name}.{os.getpid()}.part"
        shutil.rmtree(part, ignore_errors=True)
        folder = write_brats(
            part, n_subjects=sizes.brats_subjects, shape=sizes.brats_shape, seed=0, misnamed=False
        )
        (part / ".complete").write_text(folder.name)
        try:
            part.rename(cache)
        except OSError:  # another run finished first
            shutil.rmtree(part, ignore_errors=True)
    return cache / done.read_text()


def make_datamodule(root: Path, sizes: Sizes) -> Any:
    from data_modules.brats import BraTSDataModule

    dm = BraTSDataModule(
        str(root),
        shots=sizes.shots,
        image_size=sizes.image_size,
        batch_size=sizes.train_batch,
        n_test_healthy=sizes.test_healthy,
        n_test_tumorous=sizes.test_tumorous,
        num_workers=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # skipped-subject notices of the synthetic set
        dm.setup("fit")
    return dm


def make_model(sizes: Sizes, **kw: Any) -> Any:
    from pathoscope.model import PathoScope

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Backbone: pretrained=False")
        return PathoScope(
            pretrained=False,
            weights=sizes.weights,
            hidden_dim=sizes.hidden_dim,
            pieg_steps=sizes.pieg_steps,
            max_anchors=sizes.anchors,
            **kw,
        )


# --------------------------------------------------------------------------- 1: FLOPs
def count_gmac(fn: Callable[[], object]) -> float:
    """Multiply-accumulates (1e9) of one call, counted by torch.utils.flop_counter (FLOP / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 2e9


def bench_flops(model: Any, folded: Any, sizes: Sizes) -> tuple[list[Row], dict[str, Any]]:
    s = sizes.image_size
    x = torch.randn(1, 3, s, s)
    with torch.inference_mode():
        gmac = {
            "folded": count_gmac(lambda: folded(x)),
            "unfolded": count_gmac(lambda: model(x)),
            "backbone": count_gmac(lambda: model.backbone(x)),
            "trunk": count_gmac(lambda: model.backbone.net(x)),
        }
    target = GMAC_TARGET * (s / 256) ** 2
    share = gmac["backbone"] / gmac["folded"]
    rows = [
        Row(
            "1a",
            f"inference GMAC/image {s}px, folded (as shipped)",
            gmac["folded"],
            "GMAC",
            target=f"<= {target:.3g}",
            passed=gmac["folded"] <= target,
        ),
        Row("1b", "inference GMAC/image, unfolded model", gmac["unfolded"], "GMAC"),
        Row("1c", "backbone GMAC/image (share of folded)", gmac["backbone"], f"GMAC ({share:.0%})"),
    ]
    raw = {**{f"gmac_{k}": v for k, v in gmac.items()}, "gflop_folded": 2 * gmac["folded"]}
    raw["gflop_unfolded"] = 2 * gmac["unfolded"]
    raw["backbone_share"] = share
    return rows, raw


# --------------------------------------------------------------------------- 2: throughput
def bench_inference(model: Any, folded: Any, sizes: Sizes) -> tuple[list[Row], dict[str, Any]]:
    import timm

    b, s = sizes.infer_batch, sizes.image_size
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, 3, s, s, generator=gen)  # NCHW, as a dataloader gives it
    foreground = torch.rand(b, 1, s, s, generator=gen) > 0.3
    trunk_cl = copy.deepcopy(model.backbone.net).eval().to(memory_format=CHANNELS_LAST)
    trunk_timm = timm.create_model(
        "resnet18", pretrained=False, features_only=True, out_indices=(2, 3)
    ).eval()
    trunk_timm.load_state_dict(model.backbone.net.state_dict())
    variants: dict[str, Callable[[], object]] = {
        "pathoscope": lambda: folded(x, foreground),
        "trunk_channels_last": lambda: trunk_cl(x.contiguous(memory_format=CHANNELS_LAST)),
        "trunk_timm_nchw": lambda: trunk_timm(x),
        "model_unfolded_nchw": lambda: model(x, foreground),
    }
    with torch.inference_mode():
        times = interleaved(variants, sizes.infer_rounds)
    ours = times["pathoscope"]
    same = paired_ratios(times["trunk_channels_last"], ours)  # throughput ratio = time ratio^-1
    timm_ratio = paired_ratios(times["trunk_timm_nchw"], ours)
    unfolded = paired_ratios(times["trunk_timm_nchw"], times["model_unfolded_nchw"])
    rows = []
    for key, label, vals, target in [
        (
            "2a",
            "throughput vs bare trunk, same format (channels_last)",
            same,
            THROUGHPUT_VS_SAME_FORMAT,
        ),
        ("2b", "throughput vs bare timm trunk (eager NCHW)", timm_ratio, THROUGHPUT_VS_TIMM),
    ]:
        med, spread = median_spread(vals)
        rows.append(Row(key, label, med, "x", spread, f">= {target}", med >= target))
    med, spread = median_spread(unfolded)
    rows.append(Row("2c", "unfolded model (eager NCHW) vs bare timm trunk", med, "x", spread))
    for name, ts in times.items():
        med, spread = median_spread([b / t for t in ts])
        rows.append(Row("2.", f"images/s: {name}", med, "img/s", spread))
    raw = {
        "seconds_per_batch": times,
        "batch": b,
        "image_size": s,
        "threads": torch.get_num_threads(),
    }
    return rows, raw


# --------------------------------------------------------------------------- 4: coreset
def backbone_features(model: Any, dm: Any, n: int, chunk: int = 8) -> tuple[Tensor, Tensor, int]:
    """First n backbone features (n, C) of the datamodule's anchor images (K shots + augmented
    copies, as the bank is built), the rest as held-out features, and the number of copies."""
    grid = (dm.image_size // 8) ** 2
    copies = max(1, math.ceil((n + grid) / (dm.shots * grid)) - 1)  # a few held out beyond n
    images = dm.anchor_images(copies=copies, seed=0)["image"]
    feats = []
    with torch.inference_mode():
        for part in images.split(chunk):
            e = model.backbone(part)  # (b, C, h, w)
            feats.append(e.permute(0, 2, 3, 1).reshape(-1, e.shape[1]))
    all_feats = torch.cat(feats)
    return all_feats[:n].clone(), all_feats[n:].clone(), copies


def bench_coreset(
    model: Any, dm: Any, sizes: Sizes
) -> tuple[list[Row], dict[str, Any], Tensor, Tensor]:
    from pathoscope.anchor_bank import greedy_coreset

    feats, heldout, copies = backbone_features(model, dm, sizes.coreset_features)
    n = min(sizes.anchors, feats.shape[0])
    gc.collect()
    with RssSampler() as rss:
        start = time.perf_counter()
        idx = greedy_coreset(feats, n, generator=torch.Generator().manual_seed(0))
        seconds = time.perf_counter() - start
    source = (
        f"backbone features (random-init ResNet18) of {dm.shots} synthetic BraTS slices + "
        f"{copies} augmented copies each (anchor_images), {dm.image_size}px"
    )
    label = f"coreset {feats.shape[0]} x {feats.shape[1]} -> {n} anchors"
    rows = [
        Row(
            "4a",
            label,
            seconds,
            "s",
            target=f"<= {CORESET_SECONDS:g}",
            passed=seconds <= CORESET_SECONDS,
        ),
        Row("4b", "coreset memory: peak RSS increase", rss.increase_mb, "MiB"),
        Row("4c", "coreset input features", feats.numel() * 4 / 2**20, "MiB"),
    ]
    raw = {
        "seconds": seconds,
        "features": list(feats.shape),
        "anchors": n,
        "features_source": source,
        "rss_increase_mib": rss.increase_mb,
        "threads_outside_loop": torch.get_num_threads(),
    }
    return rows, raw, feats[idx], heldout


# --------------------------------------------------------------------------- 3: training step
class Timers:
    """Wall time per category, counting only the outermost call of each category; search time
    spent inside PiEG is also kept apart (`search_in_pieg`)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.seconds: dict[str, float] = {}
        self._depth: dict[str, int] = {}

    def reset(self) -> None:
        self.seconds = {}

    def wrap(self, category: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            depth = self._depth.get(category, 0)
            if depth:
                return fn(*args, **kwargs)
            self._depth[category] = 1
            start = self.clock()
            try:
                return fn(*args, **kwargs)
            finally:
                spent = self.clock() - start
                self._depth[category] = 0
                self.seconds[category] = self.seconds.get(category, 0.0) + spent
                if category == "search" and self._depth.get("pieg"):
                    self.seconds["search_in_pieg"] = self.seconds.get("search_in_pieg", 0.0) + spent

        return timed


@contextlib.contextmanager
def patched(
    targets: list[tuple[Any, str, Callable[[Callable[..., Any]], Callable[..., Any]]]],
) -> Iterator[None]:
    """Replace attributes (owner, name) by make(original) for the duration of the block."""
    saved = [(owner, name, owner.__dict__[name]) for owner, name, _ in targets]
    try:
        for owner, name, make in targets:
            setattr(owner, name, make(getattr(owner, name)))
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


def instrumented(timers: Timers) -> contextlib.AbstractContextManager[None]:
    import pathoscope.model as model_module
    from pathoscope.anchor_bank import AnchorBank
    from pathoscope.backbone import Backbone
    from pathoscope.pieg import CandidateSearch

    return patched(
        [
            (Backbone, "forward", lambda f: timers.wrap("backbone", f)),
            (model_module, "pieg", lambda f: timers.wrap("pieg", f)),
            (AnchorBank, "search", lambda f: timers.wrap("search", f)),
            (AnchorBank, "nearest", lambda f: timers.wrap("search", f)),
            (CandidateSearch, "__init__", lambda f: timers.wrap("search", f)),
            (CandidateSearch, "nearest", lambda f: timers.wrap("search", f)),
        ]
    )


def set_bank(model: Any, anchors: Tensor, heldout: Tensor) -> None:
    """Give the model's bank these anchors (as `AnchorBank.build` would after its coreset)."""
    bank = model.bank
    bank.anchors = anchors.float().contiguous()
    bank._index = None  # rebuilt from the buffer on first search
    dist, _ = bank.nearest(heldout[:8192])
    bank.distance_scale = dist.median().clamp_min(1e-6).to(bank.distance_scale)


def training_step(model: Any, optimizer: Any, batch: dict[str, Tensor]) -> None:
    """One automatic-optimisation step as Lightning runs it: zero_grad, losses, backward, step."""
    optimizer.zero_grad()
    out = model.training_losses(batch)
    out["loss"].backward()
    optimizer.step()


def check_candidate_search(
    model: Any, batch: dict[str, Tensor], step_scale: float = 1.0
) -> dict[str, Any]:
    """Run one step's losses with every CandidateSearch answer compared to the exact search.

    An index that differs from the exact search's is a mismatch unless both anchors are at the
    same distance within float32 rounding (a tie). `step_scale` multiplies PiEG's eta and noise
    for this step (0.1: the geometry of features 10x larger relative to the anchors' spacing)."""
    from pathoscope.pieg import CandidateSearch

    stats = {"queries": 0, "mismatches": 0, "ties": 0, "fallbacks": 0, "searched_rows": 0}

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def checked(self: Any, x: Tensor, rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
            before, searched = self.fallbacks, self.searches
            dist, idx = original(self, x, rows)
            _, exact = self.bank.search(x, 1)
            differs = exact[:, 0] != idx
            if bool(differs.any()):
                xd = x.detach()[differs]
                a_exact, a_ours = (
                    self.bank.anchors[exact[differs, 0]],
                    self.bank.anchors[idx[differs]],
                )
                sq_exact = (xd - a_exact).square().sum(-1)
                sq_ours = (xd - a_ours).square().sum(-1)
                # FAISS computes |x|^2 + |a|^2 - 2 x.a in float32: answers closer than its rounding
                # error are ties, which either search may break either way.
                scale = xd.square().sum(-1) + a_exact.square().sum(-1)
                tie = (sq_ours - sq_exact).abs() <= 1e-6 * scale
                stats["ties"] += int(tie.sum())
                stats["mismatches"] += int((~tie).sum())
            stats["queries"] += int(x.shape[0])
            stats["fallbacks"] += self.fallbacks - before
            stats["searched_rows"] += self.searches - searched
            return dist, idx

        return checked

    hp = model.hparams
    saved = {k: hp[k] for k in ("eta", "noise_std", "noise_mean") if k in hp}
    try:
        for k, value in saved.items():
            hp[k] = value * step_scale
        with patched([(CandidateSearch, "nearest", make)]):
            out = model.training_losses(batch)
    finally:
        for k, value in saved.items():
            hp[k] = value
    stats["pieg_shift_over_scale"] = float(out["pieg_shift"])
    return stats


def bench_training(
    sizes: Sizes, dm: Any, backbone: Any, anchors: Tensor, heldout: Tensor
) -> tuple[list[Row], dict[str, Any]]:
    """`backbone`: the one whose features gave `anchors` and `heldout` (random weights differ
    between models, and the bank must live in the training model's feature space)."""
    torch.manual_seed(0)
    full = make_model(sizes)
    full.backbone.load_state_dict(backbone.state_dict())
    baseline = make_model(
        sizes, use_local_contrast=False, use_global_contrast=False, pieg_direction="ascent"
    )
    set_bank(full, anchors, heldout)
    baseline.load_state_dict(full.state_dict())  # same weights, same bank
    models = {"pathoscope": full, "glass_baseline": baseline}
    optimizers = {name: m.configure_optimizers() for name, m in models.items()}
    for m in models.values():
        m.train()
    batch = next(iter(dm.train_dataloader()))
    timers = Timers()
    shares: dict[str, list[dict[str, float]]] = {name: [] for name in models}

    def step(name: str) -> Callable[[], None]:
        def run() -> None:
            timers.reset()
            start = time.perf_counter()
            training_step(models[name], optimizers[name], batch)
            shares[name].append({**timers.seconds, "total": time.perf_counter() - start})

        return run

    with instrumented(timers):
        times = interleaved({name: step(name) for name in models}, sizes.train_rounds)
    for name in shares:  # drop the warm-up step
        shares[name] = shares[name][1:]
    ratios = paired_ratios(times["pathoscope"], times["glass_baseline"])
    med, spread = median_spread(ratios)
    rows = [
        Row(
            "3a",
            f"train step B={sizes.train_batch}, T={sizes.pieg_steps}, A={len(full.bank)}: full / GLASS-style",
            med,
            "x",
            spread,
            f"<= {TRAIN_RATIO_TARGET}",
            med <= TRAIN_RATIO_TARGET,
        ),
    ]
    for name in models:
        m, sp = median_spread(times[name])
        rows.append(Row("3.", f"seconds per step: {name}", m, "s", sp))
    parts = ("backbone", "pieg", "search", "search_in_pieg", "total")
    med_s = {
        name: {p: statistics.median(s.get(p, 0.0) for s in per_step) for p in parts}
        for name, per_step in shares.items()
    }
    f, g = med_s["pathoscope"], med_s["glass_baseline"]
    # The D passes inside PiEG are the same work in both steps: the baseline's PiEG time; what
    # the full step spends in PiEG beyond them and the search is the global term's autograd.
    split = {
        "backbone": f["backbone"],
        "pieg_d_passes": g["pieg"],
        "pieg_global_term": f["pieg"] - f["search_in_pieg"] - g["pieg"],
        "anchor_search": f["search"],
    }
    split["rest"] = f["total"] - sum(split.values())
    share = {k: v / f["total"] for k, v in split.items()}
    rows.append(
        Row(
            "3b",
            "full step: backbone / PiEG D passes / PiEG global term / anchor search / rest",
            None,
            " / ".join(f"{v:.0%}" for v in share.values()),
        )
    )
    rows.append(
        Row(
            "3.",
            "baseline step: backbone / PiEG D passes / rest",
            None,
            f"{g['backbone'] / g['total']:.0%} / {g['pieg'] / g['total']:.0%} / "
            f"{1 - (g['backbone'] + g['pieg']) / g['total']:.0%}",
        )
    )
    checks = {
        "as configured": check_candidate_search(full, batch),
        "eta, noise / 10": check_candidate_search(full, batch, step_scale=0.1),
    }
    for key, (regime, check) in zip(("3c", "3d"), checks.items(), strict=True):
        queries = max(1, check["queries"])
        rows.append(
            Row(
                key,
                f"candidate search == exact search, PiEG {regime} ({check['queries']} queries)",
                check["mismatches"],
                f"mismatches ({check['ties']} ties)",
                target="== 0",
                passed=check["mismatches"] == 0,
            )
        )
        rows.append(
            Row(
                "3.",
                f"PiEG {regime}: shift / distance_scale; queries not certified; rows k-searched",
                check["pieg_shift_over_scale"],
                f"x; {check['fallbacks'] / queries:.1%}; {check['searched_rows'] / queries:.1%}",
            )
        )
    search_rows, search_raw = bench_search_calls(full, batch)
    rows += search_rows
    raw = {
        "seconds_per_step": times,
        "ratios": ratios,
        "median_seconds": med_s,
        "full_step_shares": share,
        "candidate_check": checks,
        "search_calls": search_raw,
        "batch": sizes.train_batch,
        "pieg_steps": sizes.pieg_steps,
        "anchors": len(full.bank),
    }
    return rows, raw


def bench_search_calls(
    model: Any, batch: dict[str, Tensor], rounds: int = 3
) -> tuple[list[Row], dict[str, Any]]:
    """Nearest anchors of every position of a batch: the exact (full) search vs the candidate
    search's set-up (one k-search) and one query 0.01 x distance_scale away (certified)."""
    from pathoscope.pieg import CandidateSearch

    k = model.hparams.knn_candidates
    with torch.no_grad():
        v = model.embed(batch["image"])
        v = v.reshape(-1, v.shape[-1])
        shifted = v + 0.01 * model.bank.distance_scale * torch.randn_like(v) / math.sqrt(v.shape[1])
    search = CandidateSearch(model.bank, v, k=k)
    search.nearest(v)
    times = interleaved(
        {
            "exact": lambda: model.bank.nearest(shifted),
            "candidates_setup": lambda: CandidateSearch(model.bank, v, k=k).nearest(v),
            "candidates_query": lambda: search.nearest(shifted),
        },
        rounds,
    )
    rows = []
    for name, ts in times.items():
        med, spread = median_spread([t * 1e3 for t in ts])
        rows.append(Row("3.", f"search of {v.shape[0]} queries: {name}", med, "ms", spread))
    return rows, {
        "milliseconds": {name: [t * 1e3 for t in ts] for name, ts in times.items()},
        "queries": int(v.shape[0]),
    }


# --------------------------------------------------------------------------- 5: peak RSS
def child_main(kind: str, root: Path, sizes: Sizes) -> dict[str, Any]:
    """In a fresh process: a few training steps (`train`) or a test run (`test`); peak RSS."""
    import lightning as L

    from callbacks.metrics import AnomalyMetrics

    rss_start = peak_rss_mb()
    dm = make_datamodule(root, sizes)
    model = make_model(sizes)
    out = Path(tempfile.mkdtemp(prefix="pathoscope-bench-"))
    callbacks = [AnomalyMetrics(output_dir=str(out))] if kind == "test" else []
    trainer = L.Trainer(
        max_steps=sizes.rss_train_steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        enable_checkpointing=False,
        default_root_dir=out,
        callbacks=callbacks,
    )
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "train":
            trainer.fit(model, datamodule=dm)
            info: dict[str, Any] = {"steps": int(trainer.global_step), "anchors": len(model.bank)}
        else:
            trainer.test(model, datamodule=dm, verbose=False)
            data = callbacks[0].results["test"]
            info = {"items": len(data), "callback_buffer_mib": data.nbytes / 2**20}
    return {
        **info,
        "seconds": time.perf_counter() - start,
        "peak_rss_mib": peak_rss_mb(),
        "rss_after_imports_mib": rss_start,
    }


def run_child(kind: str, root: Path, sizes: Sizes) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "pathoscope.bench",
        "--child",
        kind,
        "--data-root",
        str(root),
        "--sizes-json",
        json.dumps(dataclasses.asdict(sizes)),
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-5:]
        raise RuntimeError(f"bench child '{kind}' failed: {' | '.join(tail)}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_seconds"] = time.perf_counter() - start
    return result


def bench_rss(root: Path, sizes: Sizes) -> tuple[list[Row], dict[str, Any]]:
    train = run_child("train", root, sizes)
    test = run_child("test", root, sizes)
    rows = [
        Row(
            "5a",
            f"peak RSS: {train['steps']} training steps, K={sizes.shots} (fit, bank of {train['anchors']})",
            train["peak_rss_mib"],
            "MiB",
        ),
        Row(
            "5b",
            f"peak RSS: testing {test['items']} slices with AnomalyMetrics",
            test["peak_rss_mib"],
            "MiB",
        ),
        Row("5.", "RSS after imports (each child process)", train["rss_after_imports_mib"], "MiB"),
        Row("5.", "metrics callback buffers for the test", test["callback_buffer_mib"], "MiB"),
    ]
    return rows, {"train": train, "test": test}


# --------------------------------------------------------------------------- report
def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    with contextlib.suppress(OSError):
        info["load_average_start"] = list(os.getloadavg())
    return info


def render(rows: list[Row]) -> str:
    header = ["#", "measure", "value", "spread (min-max)", "target", "result"]
    table = [header] + [r.cells() for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)) for line in table
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pathoscope bench",
        description="Speed and cost benchmarks (issue 7), side by side in one run: inference "
        "GMAC and throughput, the training step against a GLASS-style baseline, the coreset, "
        "peak RSS. Prints a table with each target and writes bench.json.",
    )
    parser.add_argument("--out", default="bench.json", help="JSON output (default bench.json)")
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes: a smoke test of the machinery only"
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=SECTIONS,
        help="run only this section (repeatable; default: all)",
    )
    parser.add_argument(
        "--data-root",
        default=None,
        help="BraTS2020-style folder (default: a synthetic set written once to the temp folder)",
    )
    parser.add_argument(
        "--strict", action="store_true", help="exit with status 1 when a target is missed"
    )
    parser.add_argument(
        "--weights",
        default=None,
        help="local ResNet18 state dict for the backbone (default: random init; FLOPs and dense "
        "speed do not depend on it, the anchor search's fallback rate does)",
    )
    parser.add_argument("--child", choices=("train", "test"), help=argparse.SUPPRESS)
    parser.add_argument("--sizes-json", default=None, help=argparse.SUPPRESS)
    return parser


def run(
    sizes: Sizes, sections: tuple[str, ...], data_root: str | None, command: str = ""
) -> dict[str, Any]:
    """Run the chosen sections; returns the bench.json content (rows included)."""
    from pathoscope.inference import FoldedDetector

    started = time.perf_counter()
    info = machine()
    torch.manual_seed(0)
    root = brats_root(sizes, data_root)
    dm = make_datamodule(root, sizes)
    model = make_model(sizes).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, as after training
        model.discriminator.bn.running_var.uniform_(0.5, 2.0)
    folded = FoldedDetector.from_model(model)
    rows: list[Row] = []
    raw: dict[str, Any] = {}
    seconds: dict[str, float] = {}

    def progress(section: str) -> None:  # on stderr, so that a long run shows where it is
        seconds[section] = time.perf_counter() - started
        print(f"[bench {seconds[section]:5.0f} s] {section}", file=sys.stderr, flush=True)

    if "flops" in sections:
        progress("1 flops")
        r, raw["flops"] = bench_flops(model, folded, sizes)
        rows += r
    if "infer" in sections:
        progress("2 inference throughput")
        r, raw["infer"] = bench_inference(model, folded, sizes)
        rows += r
    anchors = heldout = None
    if "coreset" in sections or "train" in sections:
        progress("4 coreset (its anchors are the training bank)")
        r, raw["coreset"], anchors, heldout = bench_coreset(model, dm, sizes)
        if "coreset" in sections:
            rows += r
    if "train" in sections:
        progress("3 training step")
        assert anchors is not None and heldout is not None
        r, raw["train"] = bench_training(sizes, dm, model.backbone, anchors, heldout)
        rows += r
    if "rss" in sections:
        progress("5 peak RSS (two child processes)")
        r, raw["rss"] = bench_rss(root, sizes)
        rows += r
    progress("done")
    rows.sort(key=lambda row: row.key[0])  # sections in issue order, measurement order within
    with contextlib.suppress(OSError):
        info["load_average_end"] = list(os.getloadavg())
    return {
        "version": BENCH_VERSION,
        "command": command,
        "machine": info,
        "sizes": dataclasses.asdict(sizes),
        "sections": list(sections),
        "data": str(root),
        "rows": [dataclasses.asdict(row) for row in rows],
        "raw": raw,
        "total_seconds": time.perf_counter() - started,
        "section_start_seconds": seconds,
        "_rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sizes = QUICK if args.quick else Sizes()
    if args.sizes_json:
        values = json.loads(args.sizes_json)
        values["brats_shape"] = tuple(values["brats_shape"])
        sizes = Sizes(**values)
    if args.weights is not None:
        sizes = dataclasses.replace(sizes, weights=args.weights)
    if args.child:
        if args.data_root is None:
            raise ValueError("bench: --child needs --data-root")
        print(json.dumps(child_main(args.child, Path(args.data_root), sizes)))
        return 0
    sections = tuple(s for s in SECTIONS if args.only is None or s in args.only)
    command = " ".join(["pathoscope bench", *(sys.argv[1:] if argv is None else argv)])
    result = run(sizes, sections, args.data_root, command)
    rows: list[Row] = result.pop("_rows")
    out = Path(args.out)
    out.write_text(json.dumps(result, indent=2) + "\n")
    m = result["machine"]
    print(
        f"pathoscope bench: {m['cpu']}, {m['cores']} cores, torch {m['torch']} "
        f"({m['torch_threads']} threads), load average {m.get('load_average_start', ['?'])[0]}"
        f" -> {m.get('load_average_end', ['?'])[0]}"
    )
    if args.quick:
        print("QUICK sizes: a smoke test of the machinery; the figures mean nothing")
    print(render(rows))
    failed = [r.key for r in rows if r.passed is False]
    print(f"{len(failed)} target(s) failed: {', '.join(failed)}" if failed else "all targets met")
    print(f"total {result['total_seconds']:.0f} s; wrote {out}")
    return 1 if failed and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
