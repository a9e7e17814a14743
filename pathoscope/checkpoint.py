"""PathoSCOPE checkpoints: the version check, and the torch model from a file without a Trainer.

A checkpoint is the file Lightning writes for `PathoScope` (lightning_model.py):
  hyper_parameters  the groups of `pathoscope.hparams` as plain dicts (network, pieg, losses,
                    bank, scoring, optim)
  state_dict        the torch model's tensors under `model.` (backbone, adapter, discriminator,
                    bank anchors and distance_scale, tau)
  pathoscope        {"version", "weights", "preprocessing"}
Version 2 grouped the hyperparameters and moved the tensors under `model.`. A file of another
version is refused with one message naming the file and both versions.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import torch

from pathoscope.hparams import ModelParams
from pathoscope.torch_model import PathoScopeModel

CHECKPOINT_VERSION = 2
STATE_PREFIX = "model."  # the LightningModule's attribute holding the torch model
MODEL_GROUPS = tuple(f.name for f in fields(ModelParams))  # the torch model's groups


class CheckpointError(ValueError):
    """The checkpoint is not a usable PathoSCOPE checkpoint; the message names the file."""


def check_version(checkpoint: Any, source: str) -> dict[str, Any]:
    """The checkpoint's "pathoscope" entry; CheckpointError naming `source` unless it is ours and
    of CHECKPOINT_VERSION."""
    meta = checkpoint.get("pathoscope") if isinstance(checkpoint, Mapping) else None
    if not isinstance(meta, Mapping):
        raise CheckpointError(
            f"{source}: not a usable PathoSCOPE checkpoint (no 'pathoscope' entry; expected a "
            "file written by `pathoscope fit`)"
        )
    version = meta.get("version")
    if version != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{source}: checkpoint version {version}, but this PathoSCOPE reads version "
            f"{CHECKPOINT_VERSION} only (version 2 grouped the hyperparameters and renamed the "
            "tensors): train it again with `pathoscope fit`, or use the release that wrote it"
        )
    return dict(meta)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint's content after the version check; CheckpointError naming the file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for foreign files
        # Our own words: torch's message for a file it cannot read as tensors and plain data
        # advises loading it with weights_only=False, an arbitrary-code-execution risk and never
        # the cure for a file that is not a checkpoint.
        raise CheckpointError(
            f"{path}: not a readable checkpoint (expected a .ckpt written by `pathoscope fit` or "
            f"`train`, read as tensors and plain data only; this file is truncated, of another "
            f"format, or holds other objects: {type(exc).__name__})"
        ) from exc
    check_version(checkpoint, str(path))
    return checkpoint


def model_params(hyper_parameters: Mapping[str, Any]) -> ModelParams:
    """The torch model's groups from a checkpoint's hyper_parameters, backbone weights left to
    the checkpoint's tensors (never fetched or read from elsewhere)."""
    params = ModelParams(**{k: hyper_parameters[k] for k in MODEL_GROUPS})
    return replace(params, network=replace(params.network, pretrained=False, weights=None))


def load_model(path: str | Path, device: str | torch.device = "cpu") -> PathoScopeModel:
    """The trained torch model of a checkpoint, in eval mode on `device`."""
    checkpoint = read_checkpoint(path)
    meta = checkpoint["pathoscope"]
    try:
        params = model_params(checkpoint["hyper_parameters"])
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Backbone: pretrained=False")
            model = PathoScopeModel(
                params.network, params.pieg, params.losses, params.bank, params.scoring
            )
        state = {
            k.removeprefix(STATE_PREFIX): v
            for k, v in checkpoint["state_dict"].items()
            if k.startswith(STATE_PREFIX)
        }
        model.load_state_dict(state)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise CheckpointError(f"{path}: not a usable PathoSCOPE checkpoint: {reason}") from exc
    model.weights_tag = meta["weights"]
    model.preprocessing = dict(meta.get("preprocessing") or {})
    return model.to(device).eval()
