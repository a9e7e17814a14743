"""What the benchmark sections share: problem sizes, table rows, timing and RSS helpers, the
synthetic data and the model they measure.

Timing protocol: each compared variant runs once to warm up, then a fixed number of rounds; each
round runs every variant once, in an order rotated per round (interleaved). Ratios are taken per
round (paired), so that load changes on a shared machine hit both sides of a ratio alike; the
tables give the median over rounds and the min-max spread.
"""

from __future__ import annotations

import contextlib
import gc
import os
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_modules.brats import BraTSDataModule
from data_modules.synthetic import write_brats
from pathoscope.hparams import BankParams, LossParams, NetworkParams, PiEGParams
from pathoscope.lightning_model import PathoScope


@dataclass(frozen=True)
class Sizes:
    """Problem sizes and repeat counts (the defaults are the sizes the targets are set for)."""

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
    seed_rounds: int = 1  # section 6: rounds of (anchor_knn seed, brats.yaml seed)
    seed_steps: int = 100  # section 6: training steps timed alone (row 6b)
    seed_overrides: tuple[str, ...] = ()  # section 6: CLI overrides of the shipped brats.yaml


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
    seed_steps=2,
    seed_overrides=(
        "--data.image_size=64",
        "--metrics.eval_size=64",
        "--data.batch_size=2",
        "--data.n_test_healthy=4",
        "--data.n_test_tumorous=4",
        "--trainer.max_steps=2",
        "--model.pieg.steps=2",
        "--model.network.hidden_dim=64",
    ),
)


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


def brats_root(sizes: Sizes, data_root: str | None) -> Path:
    """A BraTS2020-style folder: `data_root`, or a synthetic set cached in the temp folder."""
    if data_root is not None:
        return Path(data_root)
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


def make_datamodule(root: Path, sizes: Sizes) -> BraTSDataModule:
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


def make_module(
    sizes: Sizes, losses: LossParams = LossParams(), pieg_direction: str = "descent"
) -> PathoScope:
    """The LightningModule at these sizes (random backbone unless `sizes.weights`)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Backbone: pretrained=False")
        return PathoScope(
            network=NetworkParams(
                pretrained=False, weights=sizes.weights, hidden_dim=sizes.hidden_dim
            ),
            pieg=PiEGParams(steps=sizes.pieg_steps, direction=pieg_direction),
            losses=losses,
            bank=BankParams(max_anchors=sizes.anchors),
        )
