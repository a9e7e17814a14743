"""anomalib's PatchCore and PaDiM on one exported split (run by benchmarks/peers.py in .venv-peers).

anomalib pins an older jsonargparse than the project, so it lives in its own environment
(`make peers` creates `.venv-peers/`). This script imports nothing from the project: it reads the
split that peers.py wrote (the K training slices and the test slices, already normalised exactly as
the project normalises them), loads the project's backbone weights of that seed into anomalib's own
feature extractor (so both sides use the same random ResNet18), fits each model on the K training
slices as anomalib does (one pass, no augmentation) and writes each model's anomaly maps and image
scores (anomalib's own: PatchCore's re-weighted nearest-neighbour score, PaDiM's map maximum).

    .venv-peers/bin/python benchmarks/peers_anomalib.py SPLIT.npz BACKBONE.pt OUT.npz [--seed S]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
from anomalib.models.image.padim.torch_model import PadimModel
from anomalib.models.image.patchcore.torch_model import PatchcoreModel

LAYERS = ["layer2", "layer3"]
CORESET_RATIO = 0.1  # anomalib's PatchCore default
BATCH = 16


def _load_backbone(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """The project's ResNet18 (timm features_only, up to layer3) into anomalib's extractor."""
    net = model.feature_extractor.feature_extractor
    net.load_state_dict(state, strict=True)
    net.eval()


def _fit(model: torch.nn.Module, train: torch.Tensor) -> None:
    model.train()
    model.feature_extractor.eval()  # frozen backbone: eval-mode BatchNorm, as anomalib runs it
    with torch.no_grad():
        for part in train.split(BATCH):
            model(part)


def _predict(model: torch.nn.Module, test: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    maps, scores = [], []
    with torch.no_grad():
        for part in test.split(BATCH):
            out = model(part)
            maps.append(out.anomaly_map[:, 0].float().numpy())
            scores.append(out.pred_score.reshape(-1).float().numpy())
    return np.concatenate(maps), np.concatenate(scores)


def run(split_path: str, backbone_path: str, out_path: str, seed: int) -> None:
    split = np.load(split_path)
    train = torch.from_numpy(split["train"])  # (K, 3, H, W) normalised
    test = torch.from_numpy(split["test"])  # (N, 3, H, W)
    state = torch.load(backbone_path, map_location="cpu", weights_only=True)
    results: dict[str, np.ndarray] = {}

    torch.manual_seed(seed)
    patchcore = PatchcoreModel(layers=LAYERS, backbone="resnet18", pre_trained=False)
    _load_backbone(patchcore, state)
    _fit(patchcore, train)
    patchcore.subsample_embedding(CORESET_RATIO)
    results["patchcore_maps"], results["patchcore_scores"] = _predict(patchcore, test)

    torch.manual_seed(seed)  # PaDiM draws its random channel subset at construction
    padim = PadimModel(layers=LAYERS, backbone="resnet18", pre_trained=False)
    _load_backbone(padim, state)
    _fit(padim, train)
    padim.fit()
    results["padim_maps"], results["padim_scores"] = _predict(padim, test)
    np.savez(out_path, **results)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("split")
    p.add_argument("backbone")
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    run(args.split, args.backbone, args.out, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
