"""Orchestration: summaries and the paper-style table (hand-made summaries), atomic run folders,
the local grid, a W&B sweep's command line run offline, resuming after an interruption, and DDP
on two CPU processes.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from integration_helpers import EXPERIMENTS, REPO, dataset_configs, tiny_overrides

from pathoscope.app import cli, experiments, reporting
from pathoscope.app.paper_tables import PAPER_ROWS

pytestmark = pytest.mark.filterwarnings("ignore:Backbone. pretrained=False:UserWarning")
PAPER = REPO.parent / "shared" / "paper" / "pathoscope-paper.md"


def _metrics(image: float, pixel: float | None = 0.9) -> dict[str, Any]:
    return {
        "image_auroc": image,
        "pixel_auroc": pixel,
        "pro": 0.5 if pixel is not None else None,
        "dice_best": 0.25 if pixel is not None else None,
        "tau": 0.4,
        "weights": "random",
        "eval_size": 64,
    }


# ------------------------------------------------------------------------------- summaries
def test_summary_statistics_by_hand() -> None:
    s = reporting.summarize("brats", "pathoscope", 2, [_metrics(0.6), _metrics(0.8), _metrics(0.7)])
    stat = s["metrics"]["image_auroc"]
    assert stat["values"] == [0.6, 0.8, 0.7]
    assert stat["mean"] == pytest.approx(0.7)
    assert stat["std"] == pytest.approx(0.1)  # sample std: sqrt((0.01 + 0.01 + 0) / 2)
    assert s["metrics"]["pro"] == {"mean": 0.5, "std": 0.0, "values": [0.5, 0.5, 0.5]}
    one = reporting.summarize("chestxray8", "x", 4, [_metrics(0.5, pixel=None)])
    assert one["metrics"]["image_auroc"]["std"] is None  # undefined for one seed
    row = next(
        ln for ln in reporting.summary_markdown(one).splitlines() if ln.startswith("| x | 4 |")
    )
    assert row.startswith("| x | 4 | 50.00 | - |") and "±" not in row
    assert one["metrics"]["pixel_auroc"] == {"mean": None, "std": None, "values": [None]}
    assert {"dataset", "config", "shots", "repeats", "metrics"} <= s.keys()
    md = reporting.summary_markdown(s)
    assert "| pathoscope | 2 | 70.00 ± 10.00 | 90.00 ± 0.00 | 50.00 ± 0.00 | 25.00 ± 0.00 |" in md
    assert "Backbone weights: random" in md and "Checkpoint reported: last" in md


def test_summary_tables_sensitivity_by_lesion_area() -> None:
    counts = {"lt1": 3, "1to3": 0, "3to10": 5, "ge10": 2}
    seeds = [
        {**_metrics(0.6), "sensitivity_area_lt1": v, "lesion_area_counts": counts}
        for v in (1 / 3, 2 / 3)
    ]
    s = reporting.summarize("brats", "pathoscope", 2, seeds)
    assert s["metrics"]["sensitivity_area_lt1"]["mean"] == pytest.approx(0.5)
    lines = reporting.summary_markdown(s).splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("| Sensitivity@tau by lesion"))
    assert "< 1 % (n = 3) | 1-3 % (n = 0) | 3-10 % (n = 5) | >= 10 % (n = 2) |" in lines[head]
    assert lines[head + 2] == "| % | 50.00 ± 23.57 | - | - | - |"
    no_masks = reporting.summarize("chestxray8", "x", 2, [_metrics(0.5)])
    assert "by lesion area" not in reporting.summary_markdown(no_masks)


def test_summary_records_the_skipped_subjects_of_every_seed() -> None:
    """A subject found bad when read in full is found only by the seeds that select it: the
    summary holds every seed's, with the reasons, and summary.md says the table lacks them."""
    seeds = [
        {**_metrics(0.6), "skipped_subjects": {"s020": "seg missing"}},
        {**_metrics(0.8), "skipped_subjects": {"s020": "seg missing", "s007": "NaN voxels"}},
    ]
    summary = reporting.summarize("brats", "pathoscope", 2, seeds)
    assert summary["skipped_subjects"] == {"s007": "NaN voxels", "s020": "seg missing"}
    assert list(summary["skipped_subjects"]) == ["s007", "s020"]
    md = reporting.summary_markdown(summary).splitlines()
    assert [ln for ln in md if "Made without" in ln] == [
        "Made without 2 of the data root's subjects, which could not be used (summary.json and "
        "each seed's metrics.json give the reasons): s007, s020."
    ]
    clean = reporting.summarize(
        "brats", "pathoscope", 2, [{**m, "skipped_subjects": {}} for m in seeds]
    )
    assert clean["skipped_subjects"] == {}
    assert "Made without" not in reporting.summary_markdown(clean)


def _write_summary(base: Path, config: str, shots: int, values: list[float]) -> None:
    folder = base / config / f"k{shots}"
    folder.mkdir(parents=True)
    reporting.write_summary(
        folder, reporting.summarize("brats", config, shots, [_metrics(v) for v in values])
    )


def test_table_gathers_configs_and_shots_with_paper_rows(tmp_path: Path) -> None:
    base = tmp_path / "brats"
    _write_summary(base, "pathoscope", 2, [0.8, 0.9])
    _write_summary(base, "pathoscope", 4, [0.85])
    _write_summary(base, "ablation/no_pieg", 2, [0.7])
    # A half-written run is hidden (.partial) and must never be read.
    hidden = base / "glass_manifold" / "k2" / ".seed0.partial"
    hidden.mkdir(parents=True)
    (hidden / "summary.json").write_text("{not json")
    markdown = reporting.write_table(base)
    lines = markdown.splitlines()
    header = next(ln for ln in lines if ln.startswith("| Method"))
    assert "Image AUROC K=2 | Image AUROC K=4 | Pixel AUROC K=2" in header
    assert "Dice K=2 | Dice K=4 |" in header
    ours = [ln for ln in lines if "| ours |" in ln]
    assert ours[0].startswith("| pathoscope | ours | 1/2 | 85.00 ± 7.07 | 85.00 |")
    assert ours[1].startswith("| ablation/no_pieg | ours | 1 | 70.00 | - |")
    assert len(ours) == 2
    ref = next(ln for ln in lines if ln.startswith("| PathoSCOPE | reference: paper Table 1"))
    assert "| 89.19 | 89.96 | 97.87 | 97.79 | 88.95 | 89.06 | 49.21 | 48.02 |" in ref
    with (base / "table.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["method"] == "pathoscope" and rows[0]["source"] == "ours"
    assert float(rows[0]["image_auroc_k2_mean_pct"]) == pytest.approx(85.0)
    assert float(rows[0]["image_auroc_k2_std_pct"]) == pytest.approx(100 * math.sqrt(0.005))
    assert rows[1]["image_auroc_k4_mean_pct"] == ""
    assert any(r["method"] == "GLASS-h" and r["source"] == "paper Table 1" for r in rows)


@pytest.mark.skipif(not PAPER.is_file(), reason="the paper's text is not in this checkout")
def test_paper_rows_match_the_paper_text() -> None:
    text = PAPER.read_text()
    for dataset, table in (("brats", "Table 1"), ("chestxray8", "Table 2")):
        for row in PAPER_ROWS[dataset]:
            if row.source != table:
                continue
            numbers = [
                f"{row.metrics[m][k]:.2f}"
                for m in ("image_auroc", "pixel_auroc", "pro", "dice_best")
                if m in row.metrics
                for k in (2, 4, 6, 8)
                if row.metrics[m][k] is not None
            ]
            # Each row's numbers appear in this order on one line of the paper.
            pattern = r"[ \t]+".join(re.escape(n) for n in numbers)
            assert re.search(pattern, text), row.label


# ------------------------------------------------------------------------------- atomic runs
def test_a_failed_run_leaves_nothing_behind(
    brats_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lightning as L

    def crash(self: L.Trainer, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("interrupted")

    monkeypatch.setattr(L.Trainer, "test", crash)
    runs_root = tmp_path / "runs"
    tiny = [a for a in tiny_overrides("brats", brats_root) if not a.startswith("--data.root")]
    with pytest.raises(RuntimeError, match="interrupted"):
        experiments.train(
            "brats", 2, 1, data_root=str(brats_root), runs_root=runs_root, overrides=tiny
        )
    base = runs_root / "brats" / "pathoscope" / "k2"
    assert list(base.iterdir()) == []  # no seed0, no .seed0.partial, no summary
    assert reporting.load_summaries(runs_root) == []


def _fake_runs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Path, list[str]]]:
    """Replace run_one by a recorder of (run folder, overrides) returning fixed metrics."""
    calls: list[tuple[Path, list[str]]] = []

    def fake(configs: Any, run_dir: Path, seed: int, overrides: Any, **kwargs: Any) -> dict:
        calls.append((Path(run_dir), list(overrides)))
        run_dir.mkdir(parents=True)
        return _metrics(0.5 + 0.1 * seed)

    monkeypatch.setattr(experiments, "run_one", fake)
    return calls


def test_train_refuses_a_finished_seed_it_cannot_check_without_overwrite(
    brats_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A seed folder without the config.yaml that says what made it is never kept or redone
    silently: refused before any seed runs, replaced with --overwrite."""
    base = tmp_path / "runs" / "brats" / "pathoscope" / "k2"
    (base / "seed1").mkdir(parents=True)
    (base / "seed1" / "metrics.json").write_text('{"image_auroc": 0.9}\n')
    (base / "summary.json").write_text("{}\n")
    calls = _fake_runs(monkeypatch)
    args = ["train", "--dataset", "brats", "--data-root", str(brats_root), "--repeats", "2"]
    args += ["--runs", str(tmp_path / "runs")]
    assert cli.main(args) == cli.EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert f"{base / 'seed1'}: a finished run without config.yaml" in err and "--overwrite" in err
    assert "\n" not in err and calls == []  # refused before any seed ran
    assert (base / "seed1" / "metrics.json").read_text() == '{"image_auroc": 0.9}\n'
    assert (base / "summary.json").read_text() == "{}\n"
    shutil.rmtree(base / "seed1")  # the fake run makes the folder itself
    assert cli.main([*args, "--overwrite"]) == 0
    assert [c[0] for c in calls] == [base / "seed0", base / "seed1"]
    assert json.loads((base / "summary.json").read_text())["repeats"] == 2


def test_train_takes_overrides_as_key_value_and_key_space_value(
    brats_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`--model.x v` means `--model.x=v`, also when v starts with "-"; a stray value is refused."""
    calls = _fake_runs(monkeypatch)
    args = ["train", "--dataset", "brats", "--data-root", str(brats_root)]
    args += ["--runs", str(tmp_path / "runs")]
    extra = ["--model.pieg.eta", "-0.5", "--model.pieg.steps=3", "--data.shots", "2"]
    assert cli.main([*args, *extra]) == 0
    assert calls[0][1][: len(extra)] == extra
    assert cli.main([*args, "--overwrite", "--model.pieg.steps=3", "7"]) == cli.EXIT_USAGE
    assert "unrecognised argument 7" in capsys.readouterr().err


def test_train_with_a_negative_eta_in_key_space_value_form_is_refused_by_its_range(
    brats_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = tmp_path / "runs"
    args = ["train", "--dataset", "brats", "--data-root", str(brats_root), "--runs", str(runs)]
    args += ["--model.network.pretrained", "false", "--model.pieg.eta", "-1"]
    assert cli.main(args) == cli.EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert err.endswith("pathoscope train: error: pieg.eta must be >= 0, got -1.0"), err
    assert not (runs / "brats" / "pathoscope" / "k2" / "seed0").exists()


# ------------------------------------------------------------------------------- grid + sweep
@pytest.mark.slow
def test_grid_writes_table_and_plot(brats_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "grid"
    tiny = tiny_overrides("brats", brats_root, max_steps=1)
    args = ["grid", "--config", str(EXPERIMENTS / "brats.yaml"), "--out", str(out)]
    args += ["--param", "model.pieg.eta=0.005,0.05", "--shots", "2", *tiny]
    assert cli.main(args) == cli.EXIT_PARTIAL  # done; the set's subject 020 is skipped
    for value in ("0.005", "0.05"):
        folder = out / f"model.pieg.eta={value}" / "k2"
        config = yaml.safe_load((folder / "seed0" / "config.yaml").read_text())
        assert config["model"]["pieg"]["eta"] == float(value)
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["params"] == {"model.pieg.eta": value}
    table = (out / "grid.md").read_text().splitlines()
    assert table[0].startswith("| model.pieg.eta | Image AUROC K=2 |")
    assert table[2].startswith("| 0.005 |") and table[3].startswith("| 0.05 |")
    png = out / "grid_model.pieg.eta.png"
    assert png.is_file() and png.stat().st_size > 1000


@pytest.mark.slow
def test_sweep_command_line_runs_one_configuration_offline(
    brats_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sweep = yaml.safe_load((EXPERIMENTS / "sweeps" / "eta.yaml").read_text())
    assert sweep["program"] == "pathoscope"
    values = {}
    for key, spec in sweep["parameters"].items():
        values[key] = spec["values"][0] if "values" in spec else spec.get("value", spec.get("min"))
    sweep_args = [f"--{k}={v}" for k, v in values.items()]  # W&B's ${args}
    argv: list[str] = []
    for part in sweep["command"]:
        if part == "${args}":
            argv += sweep_args
        elif part not in ("${env}", "${program}"):
            argv.append(part)
    assert argv[0] == "sweep-run"
    argv[argv.index("--data-root") + 1] = str(brats_root)  # the file names the user's data
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.chdir(REPO)  # sweep files name experiments/ relative to the repository
    # The test's small sizes go in one more config file, so that the sweep's ${args} alone name
    # the run (as under a real agent).
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text(yaml.safe_dump(_as_config(tiny_overrides("brats", brats_root, max_steps=1))))
    at = argv.index("--config") + 2
    argv[at:at] = ["--config", str(tiny)]
    assert cli.main([*argv, "--out", str(tmp_path / "sweeps")]) == cli.EXIT_PARTIAL  # 020 skipped
    assert os.environ["WANDB_MODE"] == "offline"  # never online unless asked
    (folder,) = (tmp_path / "sweeps" / "brats+tiny").iterdir()
    # Fig. 5's eta at the paper's T = 20 (the file holds T fixed: brats.yaml runs 10 steps)
    assert folder.name == "data.shots=2,model.pieg.eta=0.005,model.pieg.steps=20"
    run = folder / "seed0"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["pieg"]["eta"] == 0.005 and config["data"]["init_args"]["shots"] == 2
    assert config["model"]["pieg"]["steps"] == 20
    assert config["data"]["init_args"]["image_size"] == 64
    logger = config["trainer"]["logger"]
    assert logger["class_path"].endswith("WandbLogger")
    assert logger["init_args"]["name"] == "brats-brats+tiny-k2-s0"
    assert logger["init_args"]["group"] == "brats+tiny"
    assert list((run / "wandb").glob("offline-run-*"))  # an offline run to `wandb sync`
    # The test panels went to the run as images; the CSV log is kept for the curves.
    media = run / "wandb" / "latest-run" / "files" / "media" / "images" / "test"
    assert list(media.glob("panels_*.png")) and list(media.glob("panels_overview_*.png"))
    assert (run / "training_curves.png").is_file() and (run / "panels" / "panels.json").is_file()
    assert json.loads((run / "metrics.json").read_text())["image_auroc"] is not None


def _as_config(overrides: Sequence[str]) -> dict[str, Any]:
    """["--data.image_size=64", ...] -> {"data": {"init_args": {"image_size": 64}}, ...}."""
    config: dict[str, Any] = {}
    for arg in overrides:
        key, _, value = arg.removeprefix("--").partition("=")
        parts = key.split(".")
        if parts[0] == "data":
            parts.insert(1, "init_args")
        node = config
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(value)
    return config


# ------------------------------------------------------------------------------- resume
def _fit(root: Path, folder: Path, max_steps: int, resume: bool = False) -> None:
    args = ["fit", *dataset_configs("brats"), *tiny_overrides("brats", root, max_steps)]
    # Validation (and so last.ckpt) at every epoch end, as an interrupted run leaves it: a
    # checkpoint written after fit ended (finish_fit) carries Lightning's post-fit loop state,
    # from which a resumed fit skips the rest of the epoch it stopped in.
    args += ["--trainer.val_check_interval=2"]
    args += [f"--trainer.default_root_dir={folder}", f"--checkpoint.dirpath={folder / 'ckpt'}"]
    if resume:
        args.append("--ckpt_path=last")
    assert cli.main(args) == cli.EXIT_PARTIAL  # done; the set's subject 020 is skipped


def _test(root: Path, ckpt: Path, out: Path, extra: Sequence[str] = ()) -> dict[str, Any]:
    args = ["test", *dataset_configs("brats"), *tiny_overrides("brats", root), *extra]
    args += [f"--ckpt_path={ckpt}", f"--metrics.output_dir={out}"]
    args += [f"--trainer.default_root_dir={out}"]
    assert cli.main(args) == cli.EXIT_PARTIAL  # done; the set's subject 020 is skipped
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.slow
def test_resume_after_an_interruption_reaches_the_same_model(
    brats_root: Path, tmp_path: Path
) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _fit(brats_root, straight, max_steps=4)
    _fit(brats_root, resumed, max_steps=2)  # "interrupted" after 2 of 4 steps (an epoch end)
    first = torch.load(resumed / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    assert first["global_step"] == 2
    _fit(brats_root, resumed, max_steps=4, resume=True)
    a = torch.load(straight / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    b = torch.load(resumed / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    assert a["global_step"] == b["global_step"] == 4  # = batches seen
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, msg=key)
    ma = _test(brats_root, straight / "ckpt" / "last.ckpt", straight / "test")
    off = ["--panels.enabled=false"]  # the switch: no panels, the same metrics
    mb = _test(brats_root, resumed / "ckpt" / "last.ckpt", resumed / "test", off)
    assert (straight / "test" / "panels" / "overview.png").is_file()
    assert not (resumed / "test" / "panels").exists()
    for key in ("image_auroc", "pixel_auroc", "pro", "dice_best", "tau"):
        assert mb[key] == pytest.approx(ma[key], rel=1e-6, abs=1e-7), key


# ------------------------------------------------------------------------------- DDP
@pytest.mark.slow
def test_ddp_on_two_cpu_processes_gives_the_metrics_of_one(
    brats_root: Path, tmp_path: Path
) -> None:
    script = Path(sys.executable).parent / "pathoscope"
    if not script.is_file():
        pytest.skip("the pathoscope console script is not installed")
    ddp = ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp"]
    folder = tmp_path / "ddp"
    base = [*dataset_configs("brats"), *tiny_overrides("brats", brats_root)]
    fit = [str(script), "fit", *base, *ddp, f"--trainer.default_root_dir={folder}"]
    fit += [f"--checkpoint.dirpath={folder / 'ckpt'}"]
    test = [str(script), "test", *base, *ddp, f"--trainer.default_root_dir={folder}"]
    test += [f"--ckpt_path={folder / 'ckpt' / 'last.ckpt'}", f"--metrics.output_dir={folder}"]
    test += ["--metrics.save_predictions=true"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    for cmd in (fit, test):  # Lightning's DDP launcher re-runs the command for rank 1
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path
        )
        assert proc.returncode == cli.EXIT_PARTIAL, proc.stderr[-3000:]  # subject 020 skipped
    with_ddp = json.loads((folder / "metrics.json").read_text())
    ckpt = torch.load(folder / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2 and math.isfinite(
        float(ckpt["state_dict"]["model.threshold.tau"])
    )
    # 9 test items on 2 ranks: DistributedSampler pads to 10; the duplicate is removed.
    index = np.load(folder / "predictions.npz")["index"]
    assert sorted(index.tolist()) == list(range(9))
    single = _test(brats_root, folder / "ckpt" / "last.ckpt", tmp_path / "single")
    for key in ("image_auroc", "pixel_auroc", "pro", "dice_best", "tau", "sensitivity"):
        assert with_ddp[key] == pytest.approx(single[key], rel=1e-5, abs=1e-6), key


# ------------------------------------------------------------------------------- train, again
def _files(folder: Path) -> dict[Path, tuple[bytes, int]]:
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_interrupted_repeats_are_finished_by_the_same_command(
    brats_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Ctrl-C inside seed 1's fit of `train --repeats 3`: our one line, exit 130, seed 0 kept and
    nothing of seed 1. The same command then runs seeds 1 and 2 only, leaves every file of seed 0
    as it was, and summary.md covers the three seeds; with another setting it is refused, naming
    the setting, before any seed runs."""
    import signal

    from pathoscope.lightning_model import PathoScope

    runs = tmp_path / "runs"
    tiny = [a for a in tiny_overrides("brats", brats_root) if not a.startswith("--data.root")]
    args = ["train", "--dataset", "brats", "--data-root", str(brats_root), "--repeats", "3"]
    args += ["--runs", str(runs), *tiny]
    base = runs / "brats" / "pathoscope" / "k2"
    real_step = PathoScope.training_step

    def ctrl_c_in_seed_1(self: PathoScope, *a: Any, **kw: Any) -> Any:
        if self.trainer.datamodule.seed == 1:
            raise KeyboardInterrupt  # what SIGINT raises in the main thread
        return real_step(self, *a, **kw)

    monkeypatch.setattr(PathoScope, "training_step", ctrl_c_in_seed_1)
    handler = signal.getsignal(signal.SIGINT)
    assert cli.main(args) == cli.EXIT_INTERRUPTED
    err = capfd.readouterr().err
    assert "Detected KeyboardInterrupt" not in err + caplog.text  # Lightning's notice
    assert [ln for ln in err.splitlines() if ln.startswith("pathoscope train")] == [
        "pathoscope train: interrupted: seed 1 was not finished and is removed; the same command "
        "keeps the finished seeds and runs the others"
    ]
    assert signal.getsignal(signal.SIGINT) is handler  # Lightning had set SIGINT to be ignored
    assert sorted(p.name for p in base.iterdir()) == ["seed0"]
    seed0 = _files(base / "seed0")

    monkeypatch.setattr(PathoScope, "training_step", real_step)
    ran: list[int] = []
    real_run = experiments.run_one

    def recorded(configs: Any, run_dir: Path, seed: int, *a: Any, **kw: Any) -> dict[str, Any]:
        ran.append(seed)
        return real_run(configs, run_dir, seed, *a, **kw)

    monkeypatch.setattr(experiments, "run_one", recorded)
    assert cli.main(args) == cli.EXIT_PARTIAL  # done; the data root's subject 020 is skipped
    assert ran == [1, 2]
    assert "seed 0: finished before, kept ==" in capfd.readouterr().out
    assert _files(base / "seed0") == seed0
    summary = json.loads((base / "summary.json").read_text())
    assert summary["repeats"] == 3 and len(summary["metrics"]["image_auroc"]["values"]) == 3
    assert (
        json.loads((base / "seed0" / "metrics.json").read_text())["image_auroc"]
        == (summary["metrics"]["image_auroc"]["values"][0])
    )
    assert "over 3 seeds (0..2)" in (base / "summary.md").read_text()

    assert cli.main([*args, "--max-steps", "3"]) == cli.EXIT_USAGE
    err = capfd.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"pathoscope train: error: {base / 'seed0'}: a finished run with other")
    assert "(trainer.max_steps differs from this command's)" in err and "--overwrite" in err
    assert ran == [1, 2] and _files(base / "seed0") == seed0


def test_ctrl_c_inside_fit_ends_with_our_line(
    brats_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`pathoscope fit` interrupted in its first step: exit 130 with one line of ours, not
    Lightning's shutdown notice and exit 1, and Ctrl-C works again afterwards."""
    import signal

    from pathoscope.lightning_model import PathoScope

    def ctrl_c(self: PathoScope, *a: Any, **kw: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(PathoScope, "training_step", ctrl_c)
    args = ["fit", *dataset_configs("brats"), *tiny_overrides("brats", brats_root)]
    args += [f"--trainer.default_root_dir={tmp_path}", f"--checkpoint.dirpath={tmp_path / 'c'}"]
    handler = signal.getsignal(signal.SIGINT)
    assert cli.main(args) == cli.EXIT_INTERRUPTED
    err = capfd.readouterr().err
    assert "Detected KeyboardInterrupt" not in err + caplog.text
    assert [ln for ln in err.splitlines() if ln.startswith("pathoscope fit")] == [
        "pathoscope fit: interrupted"
    ]
    assert signal.getsignal(signal.SIGINT) is handler
