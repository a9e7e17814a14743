"""The demo's claim: trained as `make train` trains it (experiments/demo.yaml: its steps, batch
size, PiEG, random backbone) on the demo's own data (the BraTS layout built from real anatomy,
`make-demo-data --kind anatomy`, whose tumours our lesion synthesis did not draw), PathoSCOPE
separates pathological from normal slices better than the untrained nearest-anchor baseline
(anchor_knn) on the same data, and its anomaly map points at the lesions better than the
baseline's map does (an image score that beats the baseline while the map is inverted would be a
shortcut, not the method working): on every metric the README's demo table shows. Fewer test
slices than the demo's, to keep the test short.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from integration_helpers import EXPERIMENTS

from pathoscope.app import experiments

pytestmark = pytest.mark.filterwarnings("ignore:Backbone. pretrained=False:UserWarning")


@pytest.mark.slow
def test_demo_beats_anchor_knn(anatomy_root: Path, tmp_path: Path) -> None:
    demo = [EXPERIMENTS / "brats.yaml", EXPERIMENTS / "demo.yaml"]
    small = [
        f"--data.root={anatomy_root}",
        "--data.n_test_healthy=30",
        "--data.n_test_tumorous=60",
        "--metrics.eval_size=128",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]
    ours = experiments.run_one(demo, tmp_path / "demo" / "seed0", 0, small)
    knn = experiments.run_one(
        [*demo, EXPERIMENTS / "anchor_knn.yaml"], tmp_path / "knn" / "seed0", 0, small
    )
    assert ours["weights"] == knn["weights"] == "random"
    numbers = {k: (ours[k], knn[k]) for k in ("image_auroc", "pixel_auroc", "pro", "dice_best")}
    assert ours["pixel_auroc"] > 0.5, numbers  # not an inverted map
    for key, (mine, baseline) in numbers.items():
        assert mine > baseline, (key, numbers)
