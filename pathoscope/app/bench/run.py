"""`pathoscope bench` (= `make bench`): speed and cost of PathoSCOPE, side by side in one run.

Sections, one module each, printed with their targets and PASS/FAIL, all written to bench.json:
  1 flops      GMAC per image (torch.utils.flop_counter; MAC = FLOP / 2): folded (as shipped),
               unfolded model, and the backbone's share.
  2 infer      throughput of the shipped path (FoldedDetector: image -> blurred map + score)
               vs the bare ResNet18 trunk up to layer 3 in the same memory format (channels_last)
               and vs the bare timm trunk as timm gives it (eager NCHW).
  3 train      one training step (losses, backward, optimiser) of PathoSCOPE vs the GLASS-style
               baseline (no contrastive terms, no anchor search; same batch, same ascent steps);
               time shares of backbone, PiEG's discriminator passes and anchor search; the
               candidate search checked against the exact search; the same ratio with PiEG at
               eta and noise / 10 and at brats.yaml's settings (information).
  4 coreset    greedy coreset of N backbone features down to the bank size: time and memory.
  5 rss        peak RSS of a few training steps (Trainer.fit) and of testing with the metrics
               callback, each in its own process.
  6 seed       one default K = 2 BraTS seed (fit + test of experiments/brats.yaml) against one
               anchor_knn seed, interleaved, same threads; 100 default training steps alone.

Timing protocol: see common.py. The backbone is random (pretrained=False, no network): FLOPs
and speed do not depend on the weights.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pathoscope.app.bench.common import QUICK, Row, Sizes, brats_root, make_datamodule, make_module
from pathoscope.app.bench.coreset import bench_coreset
from pathoscope.app.bench.flops import bench_flops
from pathoscope.app.bench.rss import bench_rss, child_main
from pathoscope.app.bench.seed import bench_seed
from pathoscope.app.bench.throughput import bench_inference
from pathoscope.app.bench.training import bench_training
from pathoscope.folded import FoldedDetector

SECTIONS = ("flops", "infer", "train", "coreset", "rss", "seed")
BENCH_VERSION = 1


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
        description="Speed and cost benchmarks, side by side in one run: inference "
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


def _run_sections(
    sections: tuple[str, ...],
    sizes: Sizes,
    root: Path,
    dm: Any,
    model: Any,
    progress: Callable[[str], None],
) -> tuple[list[Row], dict[str, Any]]:
    """(rows, raw results) of the chosen sections, in the order that lets the training step use
    the coreset's anchors; `model`: the untrained torch model in evaluation mode."""
    folded = FoldedDetector.from_model(model)
    rows: list[Row] = []
    raw: dict[str, Any] = {}
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
    if "seed" in sections:
        progress("6 a seed of brats.yaml against a seed of anchor_knn; 100 training steps")
        r, raw["seed"] = bench_seed(root, sizes)
        rows += r
    return rows, raw


def run(
    sizes: Sizes, sections: tuple[str, ...], data_root: str | None, command: str = ""
) -> dict[str, Any]:
    """Run the chosen sections; returns the bench.json content (rows included)."""
    started = time.perf_counter()
    info = machine()
    torch.manual_seed(0)
    root = brats_root(sizes, data_root)
    dm = make_datamodule(root, sizes)
    model = make_module(sizes).model.eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, as after training
        model.discriminator.bn.running_var.uniform_(0.5, 2.0)
    seconds: dict[str, float] = {}

    def progress(section: str) -> None:  # on stderr, so that a long run shows where it is
        seconds[section] = time.perf_counter() - started
        print(f"[bench {seconds[section]:5.0f} s] {section}", file=sys.stderr, flush=True)

    rows, raw = _run_sections(sections, sizes, root, dm, model, progress)
    progress("done")
    rows.sort(key=lambda row: row.key[0])  # sections in number order, measurement order within
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
        values["seed_overrides"] = tuple(values["seed_overrides"])
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
