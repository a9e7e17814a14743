"""The pictures of a run and of a runs folder, on tiny `pathoscope train` runs (the method and the
untrained anchor_knn baseline): panels and training curves in each run folder, summary.md linking
files that exist, the metrics-against-K figure of `table`, `maps` and `embeddings`. Figures are
checked by their data (files, sizes, which slices), not by their pixels.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from integration_helpers import tiny_overrides
from PIL import Image

from callbacks.panels import select_panels
from pathoscope.app import cli, experiments
from pathoscope.app.figures import embedding_space, map_grid
from pathoscope.batches import TrainBatch

pytestmark = pytest.mark.filterwarnings("ignore:Backbone. pretrained=False:UserWarning")


@pytest.fixture(scope="module")
def runs(brats_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """runs/brats/{pathoscope, anchor_knn}/k2/seed0 of the session's synthetic BraTS."""
    root = tmp_path_factory.mktemp("figures") / "runs"
    for config, steps in (("pathoscope", 2), ("anchor_knn", 0)):  # anchor_knn: no training
        tiny = tiny_overrides("brats", brats_root, max_steps=steps)
        tiny = [a for a in tiny if not a.startswith("--data.root")]
        experiments.train(
            "brats", 2, 1, config, data_root=str(brats_root), runs_root=root, overrides=tiny
        )
    return root / "brats"


def test_a_run_folder_holds_its_panels_and_curves(runs: Path) -> None:
    run = runs / "pathoscope" / "k2" / "seed0"
    report = json.loads((run / "panels" / "panels.json").read_text())
    with np.load(run / "predictions.npz") as f:
        scores, labels, index = f["scores"], f["labels"], f["index"]
    expected = select_panels(scores, labels, 4, 4, 4, seed=0)  # defaults.yaml's numbers
    for group, rows in expected.items():
        chosen = [p["index"] for p in report["panels"] if p["group"] == group]
        assert chosen == index[rows].tolist(), group
    assert len(report["panels"]) == len(scores) == 9  # 4 + 4 + the 1 left
    for entry in report["panels"]:
        assert (run / "panels" / entry["file"]).stat().st_size > 1000
    assert (run / "panels" / "overview.png").stat().st_size > 1000
    curves = Image.open(run / "training_curves.png")
    assert curves.size[0] > 500 and curves.size[1] > 300
    # The CSV log holds what the curves draw: D's means and PiEG's shift each step.
    log = (run / "logs" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/d_n", "train/d_s", "train/pieg_shift", "val/tau"} <= set(log)


def test_summary_links_files_that_exist(runs: Path) -> None:
    for config in ("pathoscope", "anchor_knn"):
        folder = runs / config / "k2"
        links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", (folder / "summary.md").read_text())
        assert "seed0/panels/overview.png" in links
        assert all((folder / link).is_file() for link in links)
    # anchor_knn trains no step: no curves, and no link to them.
    assert not (runs / "anchor_knn" / "k2" / "seed0" / "training_curves.png").exists()
    assert "seed0/training_curves.png" in (runs / "pathoscope" / "k2" / "summary.md").read_text()


def test_table_draws_metrics_against_k(runs: Path) -> None:
    assert cli.main(["table", "--runs", str(runs)]) == 0
    figure = runs / "metrics_vs_k.png"
    assert figure.is_file() and Image.open(figure).size[0] > 800


def test_maps_grid_of_fixed_slices_across_runs(runs: Path, capsys: pytest.CaptureFixture) -> None:
    with np.load(runs / "pathoscope" / "k2" / "seed0" / "predictions.npz") as f:
        npz = {k: f[k] for k in f.files}
    slices = map_grid.select_slices(npz, 4)
    area = {
        (str(s), int(k)): int(g.sum())
        for s, k, g in zip(npz["subject"], npz["slice"], npz["gt_masks"], strict=True)
    }
    lesions = [area[key] for key in slices[:-1]]
    assert lesions == sorted(lesions) and lesions[-1] == max(area.values())  # the largest last
    assert area[slices[-1]] == 0 and len(slices) == 5  # 4 lesions, then a normal slice
    assert cli.main(["maps", "--runs", str(runs), "--slices", "4"]) == 0
    assert "maps_grid.png" in capsys.readouterr().out
    width, height = Image.open(runs / "maps_grid.png").size
    # Five columns; three rows (the images, pathoscope, anchor_knn): the figure's own size.
    assert width == round(100 * (1.7 * 5 + 1.2)) and height == round(100 * (1.7 * 3 + 0.6))


def test_embeddings_verb_writes_its_figure_and_number(
    runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = runs / "pathoscope" / "k2" / "seed0"
    args = ["embeddings", "--run", str(run), "--points", "60", "--out", str(tmp_path)]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "embeddings.json").read_text())
    ratio = report["nn_ratio_pieg_over_gaussian"]
    assert f"{ratio:.4f}" in printed
    assert ratio == pytest.approx(
        report["nn_pathological_to_pieg"] / report["nn_pathological_to_gaussian"]
    )
    normal_ratio = report["nn_ratio_normal_over_gaussian"]
    assert normal_ratio == pytest.approx(
        report["nn_pathological_to_normal"] / report["nn_pathological_to_gaussian"]
    )
    assert f"{normal_ratio:.4f}" in printed
    assert all(0 < report["points"][g] <= 60 for g in embedding_space.GROUPS)
    assert report["points"]["pieg"] == report["points"]["gaussian"]
    assert all(0.0 <= report[f"d_{g}"] <= 1.0 for g in embedding_space.GROUPS)
    assert f"pieg {report['d_pieg']:.3f}" in printed
    assert (tmp_path / "embeddings.png").stat().st_size > 1000


def test_nearest_neighbour_distance_by_hand() -> None:
    queries = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    points = torch.tensor([[0.0, 1.0], [3.0, 0.0], [6.0, 8.0]])
    # (0,0): nearest (0,1) at 1; (3,4): nearest (3,0) at 4 (vs (0,1) at 4.24, (6,8) at 5).
    assert embedding_space.mean_nn_distance(queries, points) == pytest.approx(2.5)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["maps", "--runs", "/no/such/runs"], "runs folder not found"),
        (["maps", "--runs", "."], "no <config>/k<K>/seed0/predictions.npz"),
        (["embeddings", "--run", "/no/such/run"], "last.ckpt: not found"),
        (["embeddings"], "give either --run DIR or --ckpt_path FILE"),
    ],
)
def test_figure_verbs_bad_input_is_one_line(
    args: list[str],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli.main(args) == cli.EXIT_USAGE
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert list(tmp_path.iterdir()) == []


def test_gaussian_embeddings_sit_at_the_cells_pieg_perturbed() -> None:
    """With pieg.max_cells PiEG perturbs a random subset of the foreground cells; the Gaussian
    reference must start from the same cells, row for row, or the ratio compares other places."""
    from types import SimpleNamespace

    from pathoscope.hparams import LossParams, PiEGParams
    from pathoscope.torch_model import Synthesis

    b, h, w, c = 2, 4, 4, 3
    v = torch.arange(2 * b * h * w * c, dtype=torch.float32).reshape(2 * b, h, w, c)
    picked = torch.tensor([13, 2, 27, 8])  # the random cells PiEG perturbed, in its order

    def synthesize(v_n: torch.Tensor, *args: object) -> Synthesis:
        base = v_n.reshape(-1, c)[picked].reshape(1, -1, 1, c)
        return Synthesis(base + 1.0, None, None, base, None)

    model = SimpleNamespace(
        hp=SimpleNamespace(pieg=PiEGParams(noise_std=0.0), losses=LossParams()),
        pieg_unit=lambda: 1.0,
        tau=torch.tensor(0.0),
        embed=lambda x: v,
        synthesize=synthesize,
    )
    batch = TrainBatch(
        image=torch.zeros(b, 3, 8 * h, 8 * w),
        lesion_image=torch.zeros(b, 3, 8 * h, 8 * w),
        lesion_mask=torch.zeros(b, 1, 8 * h, 8 * w),
        foreground=torch.ones(b, 1, 8 * h, 8 * w, dtype=torch.bool),
        index=torch.arange(b),
    )
    sets = embedding_space.synthetic_embeddings(model, [batch], batches=1, seed=0)
    assert sets["pieg"].shape == sets["gaussian"].shape == (4, c)
    torch.testing.assert_close(sets["pieg"] - sets["gaussian"], torch.ones(4, c))


def test_discriminator_means_by_hand() -> None:
    from types import SimpleNamespace

    class SumD(torch.nn.Module):  # logits = the sum of the channels
        def forward(self, v: torch.Tensor) -> torch.Tensor:
            return v.sum(-1)

    model = SimpleNamespace(discriminator=SumD().train(), tau=torch.tensor(0.0))
    sets = {"pieg": torch.tensor([[0.0, 0.0], [1.0, 1.0]]), "gaussian": torch.tensor([[-1.0, 0.0]])}
    got = embedding_space.discriminator_means(model, sets)
    sig = torch.sigmoid(torch.tensor([0.0, 2.0, -1.0]))
    assert got["d_pieg"] == pytest.approx(float(sig[:2].mean()))
    assert got["d_gaussian"] == pytest.approx(float(sig[2]))
    assert model.discriminator.training  # its mode is restored
