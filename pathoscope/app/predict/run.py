"""`pathoscope predict`: anomaly maps for new NIfTI volumes and images with a trained checkpoint.

Everything that decides how pixels are prepared comes from the checkpoint (`model.preprocessing`,
saved from the training datamodule, and `model.tau`), and the preparation itself is the training
code: `data_modules.brats_volumes.load_volume / normalize_volume / preprocess_slices` for volumes,
`data_modules.chestxray8.load_grey_png` + `transforms.resize` for images. A BraTS checkpoint takes
volumes, a ChestX-ray8 checkpoint takes images.

Volumes (`.nii` / `.nii.gz`, or a subject folder `X/X_<modality>.nii.gz` for multi-modality
checkpoints): the array is reoriented to the training orientation (the axis codes of the training
volumes, LPS for BraTS), the axial slices in the training `slice_range` (inclusive; `--slices A:B`
or `all` to change it) that hold any voxel > 0 are scored in batches, and the results are mapped
back to the input's own orientation. Outputs per volume `<name>`:
  - `<name>_anomaly_map.nii.gz`: float32, the input's affine, header and 3D shape; each scored
    slice holds its anomaly map resized back to the slice size; other slices are 0.
  - `<name>_pred_mask.nii.gz`: uint8, 1 where anomaly_map >= tau inside the foreground (voxels > 0)
    of scored slices.
  - `<name>_montage.png`: the scored slices with the map overlaid, as the network saw them
    (pathoscope/app/predict/montage.py).
  - `<name>_scores.csv`: one row per scored slice (`level=slice`: slice index in the training
    orientation, the same slice's index along the input array's axis, score, pathological) and a
    last row `level=volume` with the volume score.
  The slice score is the maximum of the slice's anomaly map inside the foreground (as in training
  and evaluation); the VOLUME SCORE is the maximum slice score over the scored slices, and a slice
  or volume is pathological when its score >= tau.
Images (PNG / JPEG): `<stem>_overlay.png` (left: the image with the pred_mask outline in red,
right: the anomaly map blended over it) and one row each in `predictions.csv`.
`predictions.csv` has one row per processed input (score, decision, output files); a later run
into the same folder adds its rows. Each input's files are written aside (a hidden staging
folder) and moved into place together with its row as soon as that input is done: an interrupted
run (Ctrl-C) loses at most the input in flight, and the same command again completes what is
missing (the finished inputs are skipped as existing outputs). A row whose output file another
input's replaces (x.jpg and x.png share x_overlay.png, with --overwrite) is dropped.
Volumes with NaN or infinite voxels are refused, naming the file and the count; images that are
not square are warned about (they are squashed to the square network size, as in training). Slice scores are taken at the network size (image_size) and the
maps are resized back (area/bilinear), so a map's maximum can differ slightly from its score.
Warnings (logged and in `VolumeResult.warnings`) flag a voxel spacing more than 1.5x off the
training spacing, or a foreground fraction more than 2x off the training one (module constants).
A bad file inside a folder is reported and skipped; existing outputs are only replaced with
`--overwrite`; nothing is written inside the input folder. Slices without any voxel > 0 are not
scored.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

from data_modules.errors import DataError
from pathoscope.app.predict.common import (
    VOLUME_DATASETS,
    decision,
    load_model,
    no_bar,
)
from pathoscope.app.predict.images import IMAGE_SUFFIXES, image_output, overlay, predict_images
from pathoscope.app.predict.volumes import (
    VOLUME_SUFFIXES,
    Slices,
    parse_slices,
    predict_volume,
    volume_files,
    volume_name,
    volume_outputs,
    write_volume_result,
)
from pathoscope.checkpoint import CheckpointError
from pathoscope.files import PARTIAL_PREFIX, move_together
from pathoscope.folded import inference_net
from pathoscope.postprocess import tau_value

log = logging.getLogger(__name__)

SUMMARY_CSV = "predictions.csv"  # one row per processed input, kept across runs
ROW_FIELDS = ("input", "score", "pathological", "scored_slices")  # the others name output files


@dataclass
class PredictRun:
    """What `run_predict` did: the rows of predictions.csv and the inputs it skipped."""

    rows: list[dict[str, Any]]
    skipped: list[tuple[str, str]]  # (input, reason)
    warnings: list[str]


def _is_subject(folder: Path, modalities: Sequence[str]) -> bool:
    try:
        volume_files(folder, modalities)
    except DataError:
        return False
    return True


def collect_inputs(path: Path, pre: dict[str, Any]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Inputs under `path` for the checkpoint's kind, plus (entry, reason) for unusable entries.

    A single file or subject folder is one input; any other folder contributes its files and
    subject folders (sorted; hidden entries ignored). DataError when nothing is usable there.
    """
    volumes = pre["dataset"] in VOLUME_DATASETS
    modalities = list(pre.get("modality") or ["flair"])
    kind = "NIfTI volume (.nii, .nii.gz)" if volumes else "image (.png, .jpg, .jpeg)"
    if not path.exists():
        raise DataError(f"{path}: input does not exist")
    if path.is_file() or (volumes and _is_subject(path, modalities)):
        _check_kind(path, volumes, modalities, kind)
        return [path], []
    entries = sorted(p for p in path.iterdir() if not p.name.startswith("."))
    if not entries:
        raise DataError(f"{path}: empty folder (expected {kind} files)")
    inputs, skipped = [], []
    for entry in entries:
        try:
            _check_kind(entry, volumes, modalities, kind)
            inputs.append(entry)
        except DataError as err:
            skipped.append((str(entry), str(err)))
    if not inputs:
        raise DataError(
            f"{path}: no usable input: expected {kind} files"
            + (" or subject folders" if volumes else "")
            + f" ({len(entries)} entries, e.g. {skipped[0][1]})"
        )
    return inputs, skipped


def _check_kind(path: Path, volumes: bool, modalities: Sequence[str], kind: str) -> None:
    if path.is_dir():
        if volumes and _is_subject(path, modalities):
            return
        what = f"a subject folder with <name>_{modalities[0]}.nii.gz" if volumes else "a file"
        raise DataError(f"{path}: not {what}")
    name = path.name.lower()
    if name.endswith(VOLUME_SUFFIXES + IMAGE_SUFFIXES):
        if name.endswith(VOLUME_SUFFIXES) == volumes:
            if volumes:
                volume_files(path, modalities)  # one file cannot serve several modalities
            return
        raise DataError(
            f"{path}: this checkpoint was trained on "
            f"{'volumes' if volumes else 'images'}: expected a {kind}"
        )
    raise DataError(f"{path}: not a {kind}")


def _output_name(entry: Path) -> str:
    return entry.stem if entry.name.lower().endswith(IMAGE_SUFFIXES) else volume_name(entry)


def run_predict(
    ckpt_path: str | Path,
    input_path: str | Path,
    output: str | Path,
    slices: Slices = None,
    channel: int | None = None,
    batch_size: int = 16,
    overwrite: bool = False,
    device: str = "cpu",
    progress: bool | None = None,
) -> PredictRun:
    """Everything `pathoscope predict` does (module docstring).

    Fatal problems raise DataError / CheckpointError: a bad checkpoint, a bad single input (file
    or subject folder), an empty folder, or a folder where no input could be processed. Inside a
    folder, bad inputs are reported (logging) and skipped. `predictions.csv` gains the rows of
    this run (rows of earlier runs for other inputs are kept).
    """
    model = load_model(ckpt_path, device)
    pre = model.preprocessing
    input_path, out_dir = Path(input_path).expanduser(), Path(output).expanduser()
    if input_path.is_dir() and (
        out_dir.resolve() == input_path.resolve() or input_path.resolve() in out_dir.parents
    ):
        raise DataError(f"{out_dir}: the output folder must not be inside the input {input_path}")
    inputs, skipped = collect_inputs(input_path, pre)
    single = inputs == [input_path]
    volumes = pre["dataset"] in VOLUME_DATASETS

    def fail(entry: Path, err: DataError) -> None:
        if single:
            raise err
        skipped.append((str(entry), str(err)))

    # Each input's outputs: duplicates and existing files are skipped, never overwritten.
    planned: dict[str, Path] = {}
    todo = []
    for entry in inputs:
        name = _output_name(entry)
        outs = (
            list(volume_outputs(name, out_dir).values())
            if volumes
            else [image_output(entry, out_dir)]
        )
        if name in planned:
            fail(entry, DataError(f"{entry}: output name {name!r} also used by {planned[name]}"))
        elif not overwrite and (existing := [p for p in outs if p.exists()]):
            fail(entry, DataError(f"{existing[0]}: exists (pass --overwrite to replace it)"))
        else:
            planned[name] = entry
            todo.append(entry)
    tau = tau_value(model.tau)
    if tau is None:
        log.warning("the checkpoint has no tau (no validation run): no pred_mask, no decisions")

    net = inference_net(model)
    rows: list[dict[str, Any]] = []
    warnings: list[str] = []
    # An input's files are written into a hidden staging folder, then moved into out_dir together
    # with its row of predictions.csv: an interrupted run loses at most the input in flight.
    staging = out_dir / f"{PARTIAL_PREFIX}{os.getpid()}"

    def commit(entry: Path, score: float, staged: dict[str, Path], **extra: Any) -> None:
        if not math.isfinite(score):  # never a NaN decision (e.g. a checkpoint that diverged)
            fail(entry, DataError(f"{entry}: the score is {score} (not a finite number)"))
            return
        row = {
            "input": str(entry),
            "score": f"{score:.6g}",
            "pathological": decision(score, tau),
            **extra,
            **{k: p.name for k, p in staged.items()},
        }
        _write_summary(staging / SUMMARY_CSV, _summary_rows(out_dir / SUMMARY_CSV, row))
        moves = [(p, out_dir / p.name) for p in staged.values()]
        move_together([*moves, (staging / SUMMARY_CSV, out_dir / SUMMARY_CSV)])
        rows.append(row)

    if todo:
        staging.mkdir(parents=True, exist_ok=True)
    try:
        if volumes:
            bar_off = True if len(todo) < 2 else no_bar(progress)
            for entry in tqdm(todo, desc="volumes", unit="volume", disable=bar_off):
                try:
                    result = predict_volume(
                        model, entry, slices, channel, batch_size, progress=progress, net=net
                    )
                except DataError as err:
                    fail(entry, err)
                    continue
                warnings.extend(result.warnings)
                staged = write_volume_result(result, staging)
                commit(entry, result.score, staged, scored_slices=len(result.slices))
        else:
            for start in range(0, len(todo), batch_size):
                chunk = todo[start : start + batch_size]
                for entry, result in zip(
                    chunk, predict_images(model, chunk, batch_size, net), strict=True
                ):
                    if isinstance(result, DataError):
                        fail(entry, result)
                        continue
                    warnings.extend(result.warnings)
                    out = image_output(entry, staging)
                    Image.fromarray(overlay(result)).save(out)
                    commit(entry, result.score, {"overlay": out})
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for _, reason in skipped:
        log.warning("skipped %s", reason)
    if not rows:
        first = f": {skipped[0][1]}" if skipped else ""
        raise DataError(
            f"{input_path}: no input could be processed ({len(skipped)} skipped){first}"
        )
    return PredictRun(rows, skipped, warnings)


def _summary_rows(path: Path, row: dict[str, Any]) -> list[dict[str, Any]]:
    """predictions.csv's rows with `row` added: it replaces the earlier row of its input, and an
    earlier row of another input naming one of its output files is dropped (that file is now
    this input's, e.g. x.png's overlay replacing x.jpg's with --overwrite)."""
    old: list[dict[str, Any]] = []
    if path.is_file():
        with open(path, newline="") as f:
            old = list(csv.DictReader(f))
    outputs = {v for k, v in row.items() if k not in ROW_FIELDS}
    kept = []
    for r in old:
        if r.get("input") == row["input"]:
            continue
        taken = outputs & {v for k, v in r.items() if k not in ROW_FIELDS}
        if taken:
            log.warning(
                "%s: row of %s removed: %s now holds the outputs of %s",
                path,
                r.get("input"),
                sorted(taken)[0],
                row["input"],
            )
            continue
        kept.append(r)
    return [*kept, row]


def _write_summary(path: Path, rows: list[dict[str, Any]]) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)


# ----------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pathoscope predict",
        description=(
            "Anomaly maps for NIfTI volumes (a file, a subject folder, a folder of them) or "
            "PNG/JPEG images (a file or a folder) with the preprocessing stored in the checkpoint."
        ),
    )
    parser.add_argument("--ckpt_path", required=True, help="checkpoint written by pathoscope fit")
    parser.add_argument("--input", required=True, help="volume, subject folder, image or folder")
    parser.add_argument("--output", required=True, help="output folder (created)")
    parser.add_argument(
        "--slices",
        type=parse_slices,
        default=None,
        help="axial slices A:B, inclusive, in the training orientation, or 'all' "
        "(default: the training slice_range)",
    )
    parser.add_argument(
        "--channel", type=int, default=None, help="volume index N of 4D NIfTI inputs"
    )
    parser.add_argument("--batch-size", type=int, default=16, help="slices/images per batch")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda if any"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """`pathoscope predict ...`: 0 when at least one input was processed, 1 on an error."""
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        if device == "cuda" and not torch.cuda.is_available():
            raise DataError("--device cuda: no CUDA device is available (use --device cpu)")
        if args.batch_size < 1:
            raise DataError(f"--batch-size must be >= 1, got {args.batch_size}")
        run = run_predict(
            args.ckpt_path,
            args.input,
            args.output,
            slices=args.slices,
            channel=args.channel,
            batch_size=args.batch_size,
            overwrite=args.overwrite,
            device=device,
        )
    except (DataError, CheckpointError, OSError) as err:
        print(f"pathoscope predict: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    print(
        f"pathoscope predict: {len(run.rows)} input(s) written to {args.output}"
        + (f", {len(run.skipped)} skipped" if run.skipped else "")
    )
    return 0
