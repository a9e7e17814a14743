"""PiEG's geometry on a trained run, without retraining: the embeddings ratio for other settings.

    .venv/bin/python benchmarks/pieg_geometry.py RUN_FOLDER '{"name": {"eta": 0.05}, ...}'

Loads RUN_FOLDER/last.ckpt and its config.yaml, takes the test set's normal and pathological
embeddings once, then for each named set of `PiEGParams` changes regenerates PiEG's and the
Gaussian embeddings of two training batches (the same D and bank) and prints one JSON line with
the numbers of `pathoscope embeddings` (benchmarks/ABLATION.md, "PiEG on the hard benchmark").
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch

from pathoscope.app.data import run_datamodule
from pathoscope.app.figures.embedding_space import (
    closeness,
    discriminator_means,
    real_embeddings,
    subsample,
    synthetic_embeddings,
)
from pathoscope.checkpoint import load_model


def main(argv: list[str]) -> int:
    run, settings = Path(argv[0]), json.loads(argv[1])
    model = load_model(run / "last.ckpt")
    dm = run_datamodule(run / "config.yaml", None)
    real = real_embeddings(model, dm.test_dataset())
    print(json.dumps({"distance_scale": float(model.bank.distance_scale)}), flush=True)
    base = model.hp
    for name, changes in settings.items():
        model.hp = dataclasses.replace(base, pieg=dataclasses.replace(base.pieg, **changes))
        sets = subsample(
            {**real, **synthetic_embeddings(model, dm.train_dataloader(), 2, 0)}, 500, 0
        )
        numbers = {**closeness(sets), **discriminator_means(model, sets)}
        print(json.dumps({"name": name, **changes, **{k: round(v, 4) for k, v in numbers.items()}}))
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main(sys.argv[1:]))
