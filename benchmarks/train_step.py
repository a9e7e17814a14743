"""The training-step speed figure: one training step at batch 8, 256 px, 20 PiEG steps, 4,096
anchors on this machine, with the share spent in the backbone, PiEG's discriminator passes and the
anchor search.

    .venv/bin/python benchmarks/train_step.py        (= pathoscope bench --only train)

The measurement itself lives in `pathoscope.app.bench.training` (a section of `make bench`), so the
figures here and in BENCHMARKS.md come from one implementation.
"""

from __future__ import annotations

import sys

from pathoscope.app.bench.run import main

if __name__ == "__main__":
    sys.exit(main(["--only", "train", *sys.argv[1:]]))
