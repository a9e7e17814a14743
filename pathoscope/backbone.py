"""Frozen ResNet18 feature extractor E (paper Section 2.2): layers 2 + 3, locally aggregated."""

from __future__ import annotations

import logging
import os
import socket
import warnings
from collections.abc import Mapping
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pathoscope.feature_grid import FEATURE_DIM

log = logging.getLogger(__name__)

PRETRAINED_TAG = "resnet18.tv_in1k"  # torchvision ImageNet weights, as GLASS-family code uses


class BackboneWeightsError(RuntimeError):
    """The backbone's weights could not be loaded; the message names the file or the alternatives."""


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise BackboneWeightsError(
            f"{path}: weights file not found (expected a ResNet18 state dict)"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: object = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unreadable file gets the same clear message
        raise BackboneWeightsError(
            f"{path}: could not read a state dict ({type(err).__name__}: {err})"
        ) from err
    # Accept the usual wrappers: {"state_dict": ...}, {"model": ...}, DDP's "module." prefix.
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise BackboneWeightsError(f"{path}: expected a mapping of parameter names to tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_resnet_weights(net: nn.Module, path: str | Path) -> str:
    """Load a full timm or torchvision ResNet18 state dict into the truncated feature network.

    Every tensor the network needs must be present with the right shape; the only keys allowed to be
    left over are layer4 and the classifier. Returns a short tag for reports (name + hash prefix).
    """
    path = Path(path)
    state = _read_state_dict(path)
    wanted = net.state_dict()
    # BatchNorm counters are bookkeeping, not weights: files saved before PyTorch 0.4 (torchvision's
    # own resnet18-f37072fd.pth among them) lack them, and BatchNorm fills them in on load.
    optional = {k for k in wanted if k.endswith("num_batches_tracked")}
    missing = [k for k in wanted if k not in state and k not in optional]
    if missing:
        raise BackboneWeightsError(
            f"{path}: not a ResNet18 state dict; missing {len(missing)} backbone tensors "
            f"(first: {missing[:3]})"
        )
    bad_shape = [k for k in wanted if k in state and state[k].shape != wanted[k].shape]
    if bad_shape:
        k = bad_shape[0]
        raise BackboneWeightsError(
            f"{path}: tensor {k} has shape {tuple(state[k].shape)}, expected {tuple(wanted[k].shape)}"
        )
    extra = [k for k in state if k not in wanted and not k.startswith(("layer4.", "fc."))]
    if extra:
        raise BackboneWeightsError(
            f"{path}: unexpected tensors {extra[:3]} (expected only layer4/fc beyond layer3)"
        )
    net.load_state_dict({k: state[k] for k in wanted if k in state}, strict=True)
    import hashlib

    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    return f"{path.name}:{digest}"


def _cached_pretrained_file() -> Path | None:
    """The timm weights file if it is already in the Hugging Face cache (no network needed)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - timm depends on huggingface_hub
        return None
    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(f"timm/{PRETRAINED_TAG}", filename)
        if isinstance(found, str):
            return Path(found)
    return None


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """A quick check, so that an offline machine fails at once instead of after minutes of retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    try:
        socket.setdefaulttimeout(timeout)
        socket.getaddrinfo(host, 443)
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False
    finally:
        socket.setdefaulttimeout(None)


class Backbone(nn.Module):
    """ResNet18 up to layer 3, frozen and always in eval mode.

    forward: x (B, 3, H, W) ImageNet-normalised -> e (B, 384, H/8, W/8): each of layer2 (B,128,H/8,W/8)
    and layer3 (B,256,H/16,W/16) is averaged over its 3x3 neighbourhood, layer3 is upsampled
    bilinearly to layer2's grid and the two are concatenated.
    """

    def __init__(
        self,
        pretrained: bool = True,
        weights: str | Path | None = None,
        aggregation_kernel: int = 3,
    ) -> None:
        super().__init__()
        self.aggregation_kernel = aggregation_kernel
        if weights is not None:  # a local file wins over `pretrained`
            self.net = timm.create_model(
                "resnet18", pretrained=False, features_only=True, out_indices=(2, 3)
            )
            self.weights_tag = load_resnet_weights(self.net, weights)
        elif pretrained:
            self.net = self._create_pretrained()
            self.weights_tag = PRETRAINED_TAG
        else:
            warnings.warn(
                "Backbone: pretrained=False and no weights file: the ResNet18 is randomly "
                "initialised, and results will be far below the paper's. Pass weights=PATH to a "
                "local ResNet18 state dict for real use.",
                UserWarning,
                stacklevel=2,
            )
            self.net = timm.create_model(
                "resnet18", pretrained=False, features_only=True, out_indices=(2, 3)
            )
            self.weights_tag = "random"
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.net.eval()

    @staticmethod
    def _create_pretrained() -> nn.Module:
        cached = _cached_pretrained_file()
        if cached is None and not _hub_reachable():
            raise BackboneWeightsError(
                f"Backbone: the pretrained weights '{PRETRAINED_TAG}' are not in the local Hugging Face "
                "cache and the hub cannot be reached (no network). Either pass weights=PATH to a local "
                "ResNet18 state dict (.pth or .safetensors, timm or torchvision layout), put the timm "
                "weights in the Hugging Face cache beforehand (HF_HOME), or use pretrained=False "
                "(random init, far below the paper's results)."
            )
        overlay = {"file": str(cached)} if cached is not None else None
        try:
            return timm.create_model(
                PRETRAINED_TAG,
                pretrained=True,
                features_only=True,
                out_indices=(2, 3),
                pretrained_cfg_overlay=overlay,
            )
        except Exception as err:  # hub errors come in many types; all mean the same here
            raise BackboneWeightsError(
                f"Backbone: could not load the pretrained weights '{PRETRAINED_TAG}' "
                f"({type(err).__name__}: {err}). Pass weights=PATH to a local ResNet18 state dict, "
                "or use pretrained=False."
            ) from err

    def train(self, mode: bool = True) -> Backbone:
        # Frozen: BatchNorm statistics must never update, whatever the parent module's mode.
        super().train(mode)
        self.net.eval()
        return self

    @property
    def out_channels(self) -> int:
        return FEATURE_DIM

    def forward(self, x: Tensor) -> Tensor:
        f2, f3 = self.net(x)  # (B,128,H/8,W/8), (B,256,H/16,W/16)
        k = self.aggregation_kernel
        if k > 1:  # local neighbourhood aggregation, as PatchCore/GLASS
            f2 = F.avg_pool2d(f2, k, stride=1, padding=k // 2, count_include_pad=False)
            f3 = F.avg_pool2d(f3, k, stride=1, padding=k // 2, count_include_pad=False)
        f3 = F.interpolate(f3, size=f2.shape[-2:], mode="bilinear", align_corners=False)
        return torch.cat([f2, f3], dim=1)  # (B, 384, H/8, W/8)
