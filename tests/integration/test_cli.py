"""The `pathoscope` command: every verb's --help, dispatch, bad input (one line, exit 2, nothing
written), make-demo-data, show-data, and one real `pathoscope train` + `pathoscope table` run as
a subprocess of the installed console script.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import lightning  # noqa: F401  (imported outside capsys: its log handlers keep the real stderr)
import numpy as np
import pytest
from integration_helpers import EXPERIMENTS, REPO, dataset_configs, tiny_overrides
from PIL import Image

from pathoscope.app import cli

pytestmark = pytest.mark.filterwarnings("ignore:Backbone. pretrained=False:UserWarning")

SCRIPT = Path(sys.executable).parent / "pathoscope"


def _console_script() -> str:
    if SCRIPT.is_file():
        return str(SCRIPT)
    found = shutil.which("pathoscope")
    if found is None:
        pytest.skip("the pathoscope console script is not installed (pip install -e .)")
    return found


def _one_error_line(capsys: pytest.CaptureFixture[str], verb: str) -> str:
    """The error: one line, the last one on stderr (Lightning's info lines may come before it)."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and not any("Traceback" in ln for ln in lines)
    errors = [ln for ln in lines if ln.startswith(("pathoscope: error: ", f"pathoscope {verb}: "))]
    assert errors == [lines[-1]], lines
    return lines[-1]


# ------------------------------------------------------------------------------- help, dispatch
@pytest.mark.slow
def test_every_verb_has_help_through_the_console_script() -> None:
    exe = _console_script()
    front = ["train", "table", "grid", "sweep-run", "make-demo-data", "show-data", "fit"]
    chain = " && ".join([f"{exe} --help", *(f"{exe} {v} --help" for v in front)])
    proc = subprocess.run(
        ["bash", "-c", f"set -e; {chain}"], capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "usage: pathoscope <verb>" in out
    for verb in front[:-1]:
        assert f"usage: pathoscope {verb}" in out
    assert "--data-root" in out and "--param" in out and "--config-name" in out
    # LightningCLI's help lists the model, data and the always-present callbacks.
    for key in (
        "--model.pieg.eta",
        "--model.bank.max_anchors",
        "--data CONFIG",
        "--metrics.eval_size",
        "--checkpoint.dirpath",
        "--panels.enabled",
    ):
        assert key in out


@pytest.mark.parametrize(
    "verb", ["validate", "test", "predict", "export", "bench", "embeddings", "maps"]
)
def test_other_verbs_have_help(verb: str, capsys: pytest.CaptureFixture[str]) -> None:
    module = cli.VERBS[verb].module
    if module:
        try:
            cli._load_module(module, verb)
        except FileNotFoundError:
            pytest.skip(f"{module} is not written yet")
    assert cli.main([verb, "--help"]) == 0
    assert "usage:" in capsys.readouterr().out


def test_module_verbs_get_their_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []
    fake = types.ModuleType("pathoscope.app.predict.run")
    fake.main = lambda argv: seen.append(argv) or 7  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pathoscope.app.predict.run", fake)
    assert cli.main(["predict", "--ckpt_path", "x.ckpt", "--input", "y"]) == 7
    assert seen == [["--ckpt_path", "x.ckpt", "--input", "y"]]


def test_missing_verb_module_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = dataclasses.replace(cli.VERBS["bench"], module="benchmarks.no_such_module")
    monkeypatch.setitem(cli.VERBS, "bench", missing)
    assert cli.main(["bench"]) == cli.EXIT_USAGE
    assert "not available" in _one_error_line(capsys, "bench")


def test_help_lists_every_verb_of_the_table_once(capsys: pytest.CaptureFixture[str]) -> None:
    """`pathoscope --help`, the dispatch and the front parser come from one table (cli.VERBS)."""
    assert cli.main(["--help"]) == 0
    lines = capsys.readouterr().out.splitlines()
    listed = [ln.split()[0] for ln in lines if ln.startswith("  ") and not ln.startswith("   ")]
    assert listed == list(cli.VERBS)
    front = cli._front_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert set(front) == {name for name, v in cli.VERBS.items() if v.handler is not None}
    for name, verb in cli.VERBS.items():  # each verb runs one way
        ways = [verb.group == "lightning", verb.module is not None, verb.handler is not None]
        assert sum(ways) == 1, name
    export = next(ln for ln in lines if ln.split()[:1] == ["export"])
    assert "ONNX" in export and "TorchScript" not in export  # what `export` writes, only that


def test_no_verb_and_unknown_verb(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == cli.EXIT_USAGE
    assert "usage: pathoscope <verb>" in capsys.readouterr().out
    assert cli.main(["frobnicate"]) == cli.EXIT_USAGE
    assert "unknown verb 'frobnicate'" in _one_error_line(capsys, "frobnicate")


# ------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dataset", "mnist"], "unknown dataset 'mnist'"),
        (["--dataset", "brats", "--config-name", "nope"], "unknown config 'nope'"),
        (["--dataset", "brats"], "--data-root is required"),
        (["--dataset", "brats", "--data-root", "/no/such/folder"], "data root not found"),
        (["--dataset", "demo", "--shots", "0"], "--shots must be >= 1"),
        (["--dataset", "demo", "--repeats", "0"], "--repeats must be >= 1"),
        (["--dataset", "demo", "--bogus", "1"], "unrecognised argument --bogus"),
    ],
)
def test_train_bad_input_is_one_line_and_writes_nothing(
    args: list[str],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)  # the demo's data/ folder would go here
    assert cli.main(["train", *args, "--runs", str(tmp_path / "runs")]) == cli.EXIT_USAGE
    assert message in _one_error_line(capsys, "train")
    assert list(tmp_path.iterdir()) == []


def test_train_on_a_data_root_of_the_wrong_layout(
    chestxray_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A ChestX-ray8 folder given as BraTS: the data module's DataError, nothing under runs/.
    runs = tmp_path / "runs"
    args = ["train", "--dataset", "brats", "--data-root", str(chestxray_root), "--runs", str(runs)]
    assert cli.main([*args, "--model.network.pretrained=false"]) == cli.EXIT_USAGE
    err = _one_error_line(capsys, "train")
    assert str(chestxray_root) in err and "BraTS20_Training" in err
    assert not runs.exists()


def test_fit_bad_value_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(EXPERIMENTS / "brats.yaml"), "--model.pieg.eta", "abc"]
    assert cli.main(args) == cli.EXIT_USAGE
    assert "model.pieg.eta" in _one_error_line(capsys, "fit")


def test_fit_missing_config_file_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli.main(["fit", "--config", "no/such.yaml"]) == cli.EXIT_USAGE
    assert "no/such.yaml" in _one_error_line(capsys, "fit")


def test_fit_missing_data_root_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # Lightning's log folder goes here
    args = ["fit", "--config", str(EXPERIMENTS / "brats.yaml"), "--data.root=/no/such/root"]
    assert cli.main([*args, "--model.network.pretrained=false"]) == cli.EXIT_USAGE
    assert "/no/such/root" in _one_error_line(capsys, "fit")


def test_checkpoint_of_an_old_version_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A version-1 checkpoint (flat hyperparameters) stops `test` before anything is built."""
    import torch

    monkeypatch.chdir(tmp_path)
    old = tmp_path / "old.ckpt"
    flat = {"eta": 0.01, "pieg_steps": 20, "score_source": "discriminator"}
    torch.save({"pathoscope": {"version": 1}, "hyper_parameters": flat, "state_dict": {}}, old)
    args = ["test", "--config", str(EXPERIMENTS / "brats.yaml"), f"--ckpt_path={old}"]
    assert cli.main([*args, f"--data.root={tmp_path}"]) == cli.EXIT_USAGE
    err = _one_error_line(capsys, "test")
    assert str(old) in err and "version 1" in err and "version 2" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.ckpt"]  # nothing written


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--model.pieg.eta=-1", "pieg.eta must be >= 0, got -1.0"),
        ("--model.pieg.steps=-5", "pieg.steps must be >= 0, got -5"),
        ("--model.network.hidden_dim=0", "network.hidden_dim must be >= 1, got 0"),
        ("--data.shots=0", "shots must be >= 1, got 0"),
        ("--data.seed=-1", "seed must be >= 0, got -1"),
        ("--data.image_size=7", "image_size (--data.image_size) must be an integer in [8, 1024]"),
        ("--data.image_size=100000", "(--data.image_size) must be an integer in [8, 1024], got 1"),
        ("--trainer.max_steps=-5", "`max_steps` must be a non-negative integer or -1"),
    ],
)
def test_fit_out_of_range_value_is_one_line_naming_the_setting(
    override: str,
    message: str,
    brats_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)  # Lightning's default log folder would go here
    args = ["fit", *dataset_configs("brats"), *tiny_overrides("brats", brats_root, max_steps=1)]
    assert cli.main([*args, override]) == cli.EXIT_USAGE
    assert message in _one_error_line(capsys, "fit")
    assert list(tmp_path.iterdir()) == []


def test_fit_config_that_is_not_yaml_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  pieg: [\n")
    assert cli.main(["fit", "--config", str(bad)]) == cli.EXIT_USAGE
    assert "bad.yaml: not valid YAML (line 3, column 1)" in _one_error_line(capsys, "fit")
    assert list(tmp_path.iterdir()) == [bad]


def _pathoscope_checkpoint(path: Path) -> Path:
    """A checkpoint file as `pathoscope fit` writes one (untrained weights, no anchors)."""
    import lightning as L
    import torch

    from pathoscope.checkpoint import CHECKPOINT_VERSION
    from pathoscope.lightning_model import PathoScope

    model = PathoScope(
        network={"pretrained": False, "hidden_dim": 64},
        pieg={"steps": 2},
        bank={"max_anchors": 256},
    )
    torch.save(
        {
            "state_dict": model.state_dict(),
            "hyper_parameters": dict(model.hparams),
            "pathoscope": {"version": CHECKPOINT_VERSION, "weights": "random", "preprocessing": {}},
            "pytorch-lightning_version": L.__version__,
        },
        path,
    )
    return path


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "missing.ckpt: checkpoint file not found"),
        ("truncated", "truncated.ckpt: not a readable checkpoint"),
        ("foreign", "foreign.ckpt: not a usable PathoSCOPE checkpoint"),
        ("tampered", "tampered.ckpt: does not fit this model"),
        ("last", "--ckpt_path last: no "),  # Lightning would test the untrained model
    ],
)
def test_checkpoint_errors_of_test_are_one_line_and_touch_no_run_folder(
    case: str,
    message: str,
    brats_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`pathoscope test --ckpt_path` of a missing, truncated, foreign (another Lightning model's)
    or tampered checkpoint: one line naming the file, and the run folder of an earlier test keeps
    its metrics.json alone (no config.yaml naming the bad file, no logs)."""
    import torch

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text('{"image_auroc": 0.9}\n')
    ckpt = tmp_path / f"{case}.ckpt"
    if case == "truncated":
        full = _pathoscope_checkpoint(tmp_path / "full.ckpt").read_bytes()
        ckpt.write_bytes(full[: len(full) // 2])
    elif case == "foreign":
        state = {"layer.weight": torch.zeros(3, 2)}
        torch.save({"state_dict": state, "hyper_parameters": {"hidden": 3}}, ckpt)
    elif case == "tampered":
        data = torch.load(_pathoscope_checkpoint(tmp_path / "full.ckpt"), weights_only=False)
        del data["state_dict"]["model.discriminator.fc2.bias"]
        torch.save(data, ckpt)
    elif case == "last":  # no last.ckpt in the checkpoint folder
        ckpt = Path("last")
        (tmp_path / "ckpts").mkdir()
    args = ["test", *dataset_configs("brats"), *tiny_overrides("brats", brats_root)]
    args += [f"--ckpt_path={ckpt}", f"--trainer.default_root_dir={run}"]
    if case == "last":
        args.append(f"--checkpoint.dirpath={tmp_path / 'ckpts'}")
    assert cli.main([*args, f"--metrics.output_dir={run}"]) == cli.EXIT_USAGE
    assert message in _one_error_line(capsys, "test")
    assert [p.name for p in run.rglob("*")] == ["metrics.json"]
    assert (run / "metrics.json").read_text() == '{"image_auroc": 0.9}\n'


def test_a_random_file_named_ckpt_is_the_same_error_for_every_verb(
    brats_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`test`, `predict` and `export` answer a file that is no checkpoint alike: exit 2 (a usage
    or input error), one line naming the file, never torch's weights_only advice, nothing
    written."""
    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "random.ckpt"
    ckpt.write_bytes(np.random.default_rng(0).bytes(4096))
    verbs = {
        "test": [*dataset_configs("brats"), *tiny_overrides("brats", brats_root)],
        "predict": ["--input", str(brats_root), "--output", str(tmp_path / "maps")],
        "export": ["--output", str(tmp_path / "model.onnx")],
    }
    for verb, args in verbs.items():
        assert cli.main([verb, f"--ckpt_path={ckpt}", *args]) == cli.EXIT_USAGE, verb
        err = _one_error_line(capsys, verb)
        assert f"{ckpt}: not a readable checkpoint" in err and "weights_only" not in err, verb
    assert [p.name for p in tmp_path.iterdir()] == ["random.ckpt"]


def test_table_of_a_missing_folder_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["table", "--runs", str(tmp_path / "nothing")]) == cli.EXIT_USAGE
    assert "runs folder not found" in _one_error_line(capsys, "table")


def test_grid_bad_param_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["grid", "--config", str(EXPERIMENTS / "brats.yaml"), "--param", "eta"]
    assert cli.main([*args, "--out", str(tmp_path / "g")]) == cli.EXIT_USAGE
    assert "KEY=V1,V2" in _one_error_line(capsys, "grid")
    assert not (tmp_path / "g").exists()


# ------------------------------------------------------------------------------- one value, two places
def test_lesion_min_fraction_is_one_value_for_model_and_data(
    brats_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The model's grid threshold and the data's lesion synthesis share one argument."""
    from pathoscope.app.lightning_cli import lightning_cli

    monkeypatch.chdir(tmp_path)
    args = ["--config", str(EXPERIMENTS / "brats.yaml"), f"--data.root={brats_root}"]
    args += ["--model.network.pretrained=false", "--trainer.logger=false"]
    built = lightning_cli([*args, "--model.losses.lesion_min_fraction=0.3"], run=False)
    assert built.model.model.hp.losses.lesion_min_fraction == 0.3
    assert built.datamodule.synthesizer.min_fraction == 0.3
    # Set on its own it would be overwritten by the link: refused instead.
    with pytest.raises(ValueError, match="model.losses.lesion_min_fraction"):
        lightning_cli([*args, "--data.lesion_min_fraction=0.3"], run=False)
    config = tmp_path / "data.yaml"
    config.write_text("data:\n  init_args:\n    lesion_min_fraction: 0.3\n")
    with pytest.raises(ValueError, match="data.yaml: data.lesion_min_fraction"):
        lightning_cli([*args, "--config", str(config)], run=False)


# ------------------------------------------------------------------------------- data verbs
@pytest.mark.parametrize(("dataset", "n_test"), [("chestxray8", 1490), ("brats", 130 + 290)])
def test_make_demo_data_fits_the_default_protocol(
    dataset: str, n_test: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`make-demo-data --dataset D` then `train --dataset D` on it: the set supplies the default
    test counts of experiments/D.yaml (the paper's) with 8 shots left for training."""
    import importlib

    import yaml

    out = tmp_path / dataset
    assert cli.main(["make-demo-data", "--dataset", dataset, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    root = printed.split("data root: ")[1].split()[0]
    assert root.startswith(str(out))
    data = yaml.safe_load((EXPERIMENTS / f"{dataset}.yaml").read_text())["data"]
    module, _, name = data["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    args = {**data["init_args"], "root": root, "shots": 8, "image_size": 64}
    dm = cls(**args)
    dm.setup("fit")
    assert len(dm.test_dataset()) == n_test
    assert len(dm.train_subjects) == 8


def test_show_data_writes_the_grid_of_a_config(brats_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "grid.png"
    args = ["show-data", "--config", str(EXPERIMENTS / "brats.yaml"), "--out", str(out)]
    small = ["--data.image_size=64", "--data.n_test_healthy=4", "--data.n_test_tumorous=5"]
    assert cli.main([*args, f"--data.root={brats_root}", *small]) == 0
    grid = np.asarray(Image.open(out))
    assert grid.shape == (3 * 64, 4 * 64, 3)  # rows: training, synthetic lesions, test
    assert grid.std() > 0


# ------------------------------------------------------------------------------- real command
@pytest.mark.slow
def test_train_then_table_through_the_console_script(brats_root: Path, tmp_path: Path) -> None:
    exe = _console_script()
    runs = tmp_path / "runs"
    tiny = [a for a in tiny_overrides("brats", brats_root) if not a.startswith("--data.root")]
    train = [exe, "train", "--dataset", "brats", "--data-root", str(brats_root), "--shots", "2"]
    train += ["--repeats", "2", "--runs", str(runs), "--max-steps", "2", *tiny]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(train, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    # Done, without the set's subject 020 (misnamed segmentation): exit 3 and a line naming it.
    assert proc.returncode == cli.EXIT_PARTIAL, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "pathoscope train: done, but 1 subject(s) skipped: BraTS20_Training_020 (the reasons are "
        "in summary.md and summary.json; exit status 3)"
    )
    assert "| pathoscope | 2 |" in proc.stdout  # the summary table is printed

    base = runs / "brats" / "pathoscope" / "k2"
    assert sorted(p.name for p in base.iterdir()) == [
        "seed0",
        "seed1",
        "summary.json",
        "summary.md",
    ]
    per_seed = []
    for seed in (0, 1):
        folder = base / f"seed{seed}"
        for name in ("metrics.json", "predictions.npz", "config.yaml", "last.ckpt"):
            assert (folder / name).is_file(), name
        config = (folder / "config.yaml").read_text()
        assert ".partial" not in config and f"dirpath: {folder}" in config
        assert f"seed_everything: {seed}" in config
        per_seed.append(json.loads((folder / "metrics.json").read_text()))
    summary = json.loads((base / "summary.json").read_text())
    assert summary["dataset"] == "brats" and summary["config"] == "pathoscope"
    for record in (summary, *per_seed):  # where results are read: the subject and why
        (reason,) = record["skipped_subjects"].values()
        assert list(record["skipped_subjects"]) == ["BraTS20_Training_020"]
        assert "BraTS20_Training_020_seg.nii.gz: missing" in reason
    assert summary["shots"] == 2 and summary["repeats"] == 2 and summary["weights"] == "random"
    a, b = (m["image_auroc"] for m in per_seed)
    stat = summary["metrics"]["image_auroc"]
    assert stat["values"] == [a, b]
    assert stat["mean"] == pytest.approx((a + b) / 2)
    assert stat["std"] == pytest.approx(abs(a - b) / np.sqrt(2))  # sample std of two values
    md = (base / "summary.md").read_text()
    assert "Checkpoint reported: last" in md and "Backbone weights: random" in md
    assert "Made without 1 of the data root's subjects, which could not be used" in md
    assert md.count("BraTS20_Training_020") == 1
    for seed in (0, 1):  # each seed's panel overview and training curves, linked
        assert f"](seed{seed}/panels/overview.png)" in md
        assert f"](seed{seed}/training_curves.png)" in md
        assert (base / f"seed{seed}" / "panels" / "overview.png").is_file()
        assert (base / f"seed{seed}" / "training_curves.png").is_file()

    proc = subprocess.run(
        [exe, "table", "--runs", str(runs / "brats")], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| pathoscope | ours |" in proc.stdout
    assert "| PathoSCOPE | reference: paper Table 1 |" in proc.stdout
    assert (runs / "brats" / "table.csv").is_file() and (runs / "brats" / "table.md").is_file()
