"""Does the discriminator learn? A small, fast probe on toy images (not a test; see
tests/unit/test_model_learns.py for the asserted version).

Normal images are smooth grey "tissue" (or horizontal stripes); test anomalies are square patches of
extra mottled texture (or orthogonal stripes) with the same mean intensity. The model trains on K
normal images with the project's own lesion synthesis, without a Trainer, and the script prints
the pixel AUROC of the discriminator's map (untrained and after training) and of the nearest-anchor
distance of the same features, so a change to the losses, PiEG or the heads can be judged in a
minute on a CPU:

    .venv/bin/python scripts/toy_learning.py --steps 60
    .venv/bin/python scripts/toy_learning.py --steps 60 --terms focal          # D on focal only
    .venv/bin/python scripts/toy_learning.py --steps 300 --model pieg.units=distance_scale \\
        --model pieg.eta=0.001 --model pieg.noise_std=0.002 --model pieg.min_distance=1.0

What it showed (random backbone, 64 px, K = 2): with PiEG's default descent, D reaches 0.91-0.96 on
the stripes toy in 60 steps (seeds 0-3; the anchor distance: 0.93-0.94) and 0.73 (eta 0.01) / 0.93
(eta 0.05) on the mottle toy; with `--model pieg.direction=ascent` (Eq. 3's printed sign) D ends
below its untrained value. Under the ascent, v_s moves towards the anchors and is labelled
pathological, so D learns to score the normal manifold high; with the focal term alone
(`--terms focal`) D learns the toy whatever the direction.
"""

from __future__ import annotations

import argparse
import ast
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch

from data_modules.anomaly_synthesis import LesionSynthesizer
from data_modules.synthetic import toy_tensors, toy_texture_images, toy_training_batch
from pathoscope.lightning_model import PathoScope
from pathoscope.metrics import pixel_auroc
from pathoscope.torch_model import PathoScopeModel

SIZE = 64


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, dict[str, dict[str, object]]]:
    """(arguments, PathoScope's hyperparameter groups with the --model overrides)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--kind", choices=("stripes", "mottle"), default="stripes")
    parser.add_argument("--amplitude", type=float, default=0.15, help="mottle anomaly contrast")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0, help="model and training-data seed")
    parser.add_argument("--terms", default="", help="loss terms to sum, e.g. focal,lc (all)")
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        help="PathoScope hyperparameter GROUP.NAME=VALUE, e.g. pieg.eta=0.05",
    )
    args = parser.parse_args(argv)
    groups: dict[str, dict[str, object]] = {
        "network": {"pretrained": False, "hidden_dim": 256},
        "pieg": {"steps": 5},
    }
    for item in args.model:
        key, _, value = item.partition("=")
        group, _, name = key.partition(".")
        try:
            groups.setdefault(group, {})[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            groups.setdefault(group, {})[name] = value
    return args, groups


def evaluator(
    model: PathoScopeModel, kind: str, amplitude: float
) -> Callable[[], tuple[float, float]]:
    """`evaluate() -> (pixel AUROC of D's map, of the nearest-anchor distance)` on 8 fixed
    anomalous toy images; it leaves the model in training mode with the backbone in eval mode."""
    test_x, test_masks = toy_texture_images(
        np.random.default_rng(99), 8, kind, anomalous=True, size=SIZE, amplitude=amplitude
    )

    def evaluate() -> tuple[float, float]:
        model.eval()
        with torch.no_grad():
            maps = model(toy_tensors(test_x)).anomaly_map[:, 0]
            model.with_scoring(source="anchor_distance")
            knn = model(toy_tensors(test_x)).anomaly_map[:, 0]
            model.with_scoring(source="discriminator")
        model.train()
        model.backbone.eval()
        truth = torch.from_numpy(test_masks)
        return float(pixel_auroc(maps, truth)), float(pixel_auroc(knn, truth))

    return evaluate


def main(argv: list[str] | None = None) -> None:
    args, groups = parse_args(argv)
    terms = [t for t in args.terms.split(",") if t]
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        module = PathoScope(**groups)  # the LightningModule, for its optimisers
    model = module.model
    bank_images, _ = toy_texture_images(
        rng, 10, args.kind, size=SIZE
    )  # 8 in the bank, 2 set its distance scale
    model.build_bank(toy_tensors(bank_images), n_bank_images=8)
    synthesizer = LesionSynthesizer()
    evaluate = evaluator(model, args.kind, args.amplitude)
    untrained, _ = evaluate()
    optimizer = module.configure_optimizers()
    start = time.time()
    for step in range(1, args.steps + 1):
        out = model.training_losses(
            toy_training_batch(rng, args.batch, args.kind, SIZE, synthesizer)
        )
        loss = sum(out[t] for t in terms) if terms else out["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % max(1, args.steps // 4) == 0:
            d, knn = evaluate()
            print(f"step {step:4d}  D pixel AUROC {d:.3f}  anchor distance {knn:.3f}", flush=True)
    trained, knn = evaluate()
    print(
        f"D pixel AUROC: untrained {untrained:.3f} -> trained {trained:.3f}; anchor distance "
        f"{knn:.3f}; {args.steps} steps in {time.time() - start:.0f} s; {groups}"
    )


if __name__ == "__main__":
    main()
