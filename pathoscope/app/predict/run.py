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
`predictions.csv` (pathoscope/app/predict/records.py) has one row per input: score, decision,
output files and what made them (checkpoint hash, options), or why the input was skipped; a later
run into the same folder adds its rows. Each input's files are written aside (a hidden staging
folder) and moved into place together with its row as soon as that input is done: an interrupted
run (Ctrl-C) loses at most the input in flight, and the same command again completes what is
missing (inputs done by the same checkpoint and options are left alone; when all are, it says
that nothing was left to do and exits 0). A row whose output file another input's replaces
(x.jpg and x.png share x_overlay.png, with --overwrite) is dropped.
Exit status (pathoscope/exit_codes.py): 0 when every input is done, 3 when some inputs of a
folder were skipped (the last line and predictions.csv name them), 2 for a bad checkpoint, a bad
single input, or a folder where no input could be processed.
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
from torch import nn
from tqdm import tqdm

from data_modules.errors import DataError
from pathoscope.app.predict.common import (
    VOLUME_DATASETS,
    decision,
    load_model,
    no_bar,
)
from pathoscope.app.predict.images import IMAGE_SUFFIXES, image_output, overlay, predict_images
from pathoscope.app.predict.records import (
    SUMMARY_CSV,
    done_inputs,
    output_options,
    read_rows,
    run_fields,
    with_row,
    with_skipped,
    write_rows,
)
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
from pathoscope.exit_codes import EXIT_FAILURE, EXIT_USAGE, partial_exit
from pathoscope.files import PARTIAL_PREFIX, atomic_path, move_together
from pathoscope.folded import inference_net
from pathoscope.postprocess import tau_value
from pathoscope.torch_model import PathoScopeModel

log = logging.getLogger(__name__)


@dataclass
class PredictRun:
    """What `run_predict` did: the rows it wrote, the inputs it skipped, its warnings, and the
    inputs an earlier run had done (left alone)."""

    rows: list[dict[str, Any]]
    skipped: list[tuple[str, str]]  # (input, reason)
    warnings: list[str]
    done: list[str]


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


def _outputs_of(entry: Path, out_dir: Path, volumes: bool) -> list[Path]:
    if volumes:
        return list(volume_outputs(_output_name(entry), out_dir).values())
    return [image_output(entry, out_dir)]


def _plan(
    inputs: list[Path], out_dir: Path, volumes: bool, done: set[str], overwrite: bool
) -> tuple[list[Path], list[str], list[tuple[Path, DataError]]]:
    """(inputs to process, inputs already done, (input, why not) for the others). Existing files
    are never replaced without `overwrite`, and two inputs never write the same file."""
    planned: dict[str, Path] = {}
    todo: list[Path] = []
    already: list[str] = []
    refused: list[tuple[Path, DataError]] = []
    for entry in inputs:
        name = _output_name(entry)
        existing = [p for p in _outputs_of(entry, out_dir, volumes) if p.exists()]
        if name in planned:
            err = DataError(f"{entry}: output name {name!r} also used by {planned[name]}")
            refused.append((entry, err))
            continue
        planned[name] = entry
        if str(entry) in done and not overwrite:
            already.append(str(entry))
        elif existing and not overwrite:
            err = DataError(
                f"{existing[0]}: exists, made for another input or by another checkpoint or "
                "options (pass --overwrite to replace it)"
            )
            refused.append((entry, err))
        else:
            todo.append(entry)
    return todo, already, refused


@dataclass
class _Writer:
    """Scores inputs and moves each one's files into out_dir together with its row."""

    model: PathoScopeModel
    out_dir: Path
    staging: Path  # hidden, inside out_dir: files are written here, then moved
    made_by: dict[str, str]
    run: PredictRun
    single: bool  # one input given: its failure is the command's error

    def fail(self, entry: Path, err: DataError) -> None:
        if self.single:
            raise err
        self.run.skipped.append((str(entry), str(err)))

    def commit(self, entry: Path, score: float, staged: dict[str, Path], **extra: Any) -> None:
        if not math.isfinite(score):  # never a NaN decision (e.g. a checkpoint that diverged)
            self.fail(entry, DataError(f"{entry}: the score is {score} (not a finite number)"))
            return
        row = {
            "input": str(entry),
            "score": f"{score:.6g}",
            "pathological": decision(score, tau_value(self.model.tau)),
            **extra,
            **self.made_by,
            "skipped": "",
            **{k: p.name for k, p in staged.items()},
        }
        summary = self.out_dir / SUMMARY_CSV
        write_rows(self.staging / SUMMARY_CSV, with_row(read_rows(summary), row, summary))
        moves = [(p, self.out_dir / p.name) for p in staged.values()]
        move_together([*moves, (self.staging / SUMMARY_CSV, summary)])
        self.run.rows.append(row)

    def volumes(self, todo: list[Path], opts: _Options, net: nn.Module) -> None:
        bar_off = True if len(todo) < 2 else no_bar(opts.progress)
        for entry in tqdm(todo, desc="volumes", unit="volume", disable=bar_off):
            try:
                result = predict_volume(
                    self.model,
                    entry,
                    opts.slices,
                    opts.channel,
                    opts.batch_size,
                    progress=opts.progress,
                    net=net,
                )
            except DataError as err:
                self.fail(entry, err)
                continue
            self.run.warnings.extend(result.warnings)
            staged = write_volume_result(result, self.staging)
            self.commit(entry, result.score, staged, scored_slices=len(result.slices))

    def images(self, todo: list[Path], opts: _Options, net: nn.Module) -> None:
        for start in range(0, len(todo), opts.batch_size):
            chunk = todo[start : start + opts.batch_size]
            results = predict_images(self.model, chunk, opts.batch_size, net)
            for entry, result in zip(chunk, results, strict=True):
                if isinstance(result, DataError):
                    self.fail(entry, result)
                    continue
                self.run.warnings.extend(result.warnings)
                out = image_output(entry, self.staging)
                Image.fromarray(overlay(result)).save(out)
                self.commit(entry, result.score, {"overlay": out})


@dataclass
class _Options:
    slices: Slices
    channel: int | None
    batch_size: int
    progress: bool | None


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
    or subject folder), an empty folder, or a folder where no input was processed or done before.
    Inside a folder, bad inputs are reported (logging) and skipped, with a row in predictions.csv
    saying why. `predictions.csv` keeps the rows of earlier runs for other inputs.
    """
    model = load_model(ckpt_path, device)
    pre = model.preprocessing
    input_path, out_dir = Path(input_path).expanduser(), Path(output).expanduser()
    if input_path.is_dir() and (
        out_dir.resolve() == input_path.resolve() or input_path.resolve() in out_dir.parents
    ):
        raise DataError(f"{out_dir}: the output folder must not be inside the input {input_path}")
    inputs, skipped = collect_inputs(input_path, pre)
    volumes = pre["dataset"] in VOLUME_DATASETS
    made_by = run_fields(ckpt_path, output_options(slices, channel) if volumes else "")
    done = done_inputs(out_dir, read_rows(out_dir / SUMMARY_CSV), made_by)
    todo, already, refused = _plan(inputs, out_dir, volumes, done, overwrite)
    if tau_value(model.tau) is None:
        log.warning("the checkpoint has no tau (no validation run): no pred_mask, no decisions")
    run = PredictRun([], skipped, [], already)
    staging = out_dir / f"{PARTIAL_PREFIX}{os.getpid()}"
    writer = _Writer(model, out_dir, staging, made_by, run, single=inputs == [input_path])
    for entry, err in refused:
        writer.fail(entry, err)
    if todo:
        staging.mkdir(parents=True, exist_ok=True)
    opts = _Options(slices, channel, batch_size, progress)
    try:
        if todo:
            (writer.volumes if volumes else writer.images)(todo, opts, inference_net(model))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for _, reason in skipped:
        log.warning("skipped %s", reason)
    if not run.rows and not run.done:
        first = f": {skipped[0][1]}" if skipped else ""
        raise DataError(
            f"{input_path}: no input could be processed ({len(skipped)} skipped){first}"
        )
    if skipped:  # their rows say why, beside the others
        rows = with_skipped(read_rows(out_dir / SUMMARY_CSV), skipped, made_by)
        with atomic_path(out_dir / SUMMARY_CSV) as tmp:
            write_rows(tmp, rows)
    return run


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
    """`pathoscope predict ...`: 0 when every input is done, 3 when some inputs of a folder were
    skipped, 2 on a usage or input error (pathoscope/exit_codes.py)."""
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
    except (DataError, CheckpointError, FileNotFoundError) as err:
        print(f"pathoscope predict: error: {' '.join(str(err).split())}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as err:  # not the input's fault: a full disk, no permission to write
        print(f"pathoscope predict: error: {' '.join(str(err).split())}", file=sys.stderr)
        return EXIT_FAILURE
    print(_summary_line(run, args.output))
    where = f"{Path(args.output) / SUMMARY_CSV} and the warnings above"
    return partial_exit("predict", dict(run.skipped), "input(s)", where)


def _summary_line(run: PredictRun, output: str) -> str:
    if not run.rows and not run.skipped:
        return (
            f"pathoscope predict: nothing left to do: the {len(run.done)} input(s) are done in "
            f"{output} by this checkpoint and options (pass --overwrite to redo them)"
        )
    done = f", {len(run.done)} done before" if run.done else ""
    return f"pathoscope predict: {len(run.rows)} input(s) written to {output}{done}"
