"""`pathoscope export`: the folded inference graph as ONNX, with preprocessing and tau as metadata.

Graph (`FoldedDetector`: adapter and BatchNorm folded exactly into D's first layer):
    inputs   image       float32 (batch, 3, S, S), preprocessed as `preprocessing` says
                         (ImageNet-normalised; S = image_size)
             foreground  float32 (batch, 1, S, S), > 0 inside the foreground; pass all ones
                         when there is none (the score is then the maximum of the whole map)
    outputs  score       float32 (batch,): max of anomaly_map inside the foreground
             anomaly_map float32 (batch, 1, S, S): upsampled, Gaussian-smoothed patch scores
The batch axis is dynamic; S is fixed to the training image_size (the preprocessing resizes every
input to it). One graph with an always-present foreground input keeps runtimes simple.
Metadata (`metadata_props`): key "pathoscope", a JSON object with `preprocessing` (the
checkpoint's dict), `tau` (null when unset), `image_size`, `weights`, `inputs`, `outputs`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from data_modules.errors import DataError
from pathoscope.app.predict.common import load_model
from pathoscope.checkpoint import CHECKPOINT_VERSION, CheckpointError
from pathoscope.exit_codes import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from pathoscope.files import atomic_path
from pathoscope.folded import FoldedDetector
from pathoscope.postprocess import tau_value
from pathoscope.torch_model import PathoScopeModel

METADATA_KEY = "pathoscope"
INPUT_NAMES = ("image", "foreground")
OUTPUT_NAMES = ("score", "anomaly_map")
FORMATS = ("onnx",)


def export_metadata(model: PathoScopeModel) -> dict[str, Any]:
    """What a runtime needs besides the graph: preprocessing, tau and the I/O description."""
    size = int(model.preprocessing["image_size"])
    return {
        "checkpoint_version": CHECKPOINT_VERSION,
        "preprocessing": model.preprocessing,
        "tau": tau_value(model.tau),
        "image_size": size,
        "weights": model.weights_tag,
        "inputs": {
            "image": f"float32 (batch, 3, {size}, {size}), preprocessed as in preprocessing",
            "foreground": f"float32 (batch, 1, {size}, {size}), > 0 = foreground; all ones if none",
        },
        "outputs": {
            "score": "float32 (batch,), max of anomaly_map inside the foreground",
            "anomaly_map": f"float32 (batch, 1, {size}, {size}); pathological where >= tau",
        },
    }


def export_onnx(model: PathoScopeModel, out: str | Path, opset: int | None = None) -> Path:
    """Write the folded graph of `model` to `out` (one self-contained .onnx file); returns it."""
    import onnx

    if model.hp.scoring.source != "discriminator":
        raise CheckpointError(
            f"scoring.source={model.hp.scoring.source!r} needs the anchor bank's nearest "
            "neighbour search, which is not exported: only discriminator checkpoints can be "
            "exported (fit with --model.scoring.source discriminator: the same training, scored "
            "and thresholded by D alone)"
        )
    out = Path(out)
    model = model.cpu().eval()
    net = FoldedDetector.from_model(model).eval()
    size = int(model.preprocessing["image_size"])
    example = (torch.randn(2, 3, size, size), torch.ones(2, 1, size, size))  # batch 2: not special
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation/tracing chatter
        program = torch.onnx.export(
            net,
            example,
            dynamo=True,
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            dynamic_shapes={"x": {0: batch}, "foreground": {0: batch}},
            opset_version=opset,
            external_data=False,
            verbose=False,
        )
    proto = program.model_proto
    onnx.helper.set_model_props(proto, {METADATA_KEY: json.dumps(export_metadata(model))})
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:  # an interrupted export leaves no truncated file
        onnx.save(proto, str(tmp))
    return out


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The "pathoscope" metadata of an exported file."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in proto.metadata_props}
    return json.loads(props[METADATA_KEY])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pathoscope export",
        description="Write the folded inference graph (image [+ foreground] -> score, "
        "anomaly_map; dynamic batch axis) as an ONNX file, with the preprocessing and tau as "
        "metadata.",
    )
    parser.add_argument("--ckpt_path", required=True, help="checkpoint written by pathoscope fit")
    parser.add_argument("--format", choices=FORMATS, default="onnx", help="export format")
    parser.add_argument("--output", required=True, help="output file, e.g. model.onnx")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: torch's)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    return parser


def main(argv: list[str] | None = None) -> int:
    """`pathoscope export ...`: 0 on success; 2 with a one-line error for a usage or input error
    (a bad checkpoint, an existing output), 1 for any other failure to write (exit_codes.py)."""
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    out = Path(args.output).expanduser()
    try:
        if out.exists() and not args.overwrite:
            raise DataError(f"{out}: exists (pass --overwrite to replace it)")
        model = load_model(args.ckpt_path, "cpu")
        export_onnx(model, out, opset=args.opset)
    except (DataError, CheckpointError, FileNotFoundError) as err:
        print(f"pathoscope export: error: {' '.join(str(err).split())}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as err:  # not the input's fault: a full disk, no permission to write
        print(f"pathoscope export: error: {' '.join(str(err).split())}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"pathoscope export: wrote {out}")
    return EXIT_OK
