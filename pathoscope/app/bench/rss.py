"""Section 5: peak RSS of a few training steps (Trainer.fit) and of testing with the metrics
callback, each in its own process (`python -m pathoscope.app.bench --child train|test`)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L

from callbacks.metrics import AnomalyMetrics
from pathoscope.app.bench.common import (
    Row,
    Sizes,
    make_datamodule,
    make_module,
    peak_rss_mb,
)


def child_main(kind: str, root: Path, sizes: Sizes) -> dict[str, Any]:
    """In a fresh process: a few training steps (`train`) or a test run (`test`); peak RSS."""
    rss_start = peak_rss_mb()
    dm = make_datamodule(root, sizes)
    model = make_module(sizes)
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
            info: dict[str, Any] = {
                "steps": int(trainer.global_step),
                "anchors": len(model.model.bank),
            }
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
        "pathoscope.app.bench",
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
