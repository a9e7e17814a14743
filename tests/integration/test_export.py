"""`pathoscope export --format onnx` (issue 6): parity with PyTorch, dynamic batch, metadata."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from data_modules.brats import BraTSDataModule
from pathoscope.app.export import export_onnx, main, read_metadata
from pathoscope.checkpoint import load_model
from pathoscope.exit_codes import EXIT_USAGE
from pathoscope.lightning_model import PathoScope

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]

TAU = 0.42


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """64-px convolutions gain nothing from more threads (a busy 2-core CI machine: ~3x faster)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ckpt(brats_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A briefly trained checkpoint (parity does not need a good model, only real weights/BN)."""
    dm = BraTSDataModule(
        str(brats_root), shots=2, image_size=64, n_test_healthy=4, n_test_tumorous=4, batch_size=2
    )
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PathoScope(
            network={"pretrained": False, "hidden_dim": 64},
            pieg={"steps": 2},
            bank={"max_anchors": 256},
        )
        trainer = L.Trainer(
            max_steps=3,
            accelerator="cpu",
            logger=False,
            enable_progress_bar=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            limit_val_batches=0,
        )
        trainer.fit(model, datamodule=dm)
    model.tau.fill_(TAU)
    path = tmp_path_factory.mktemp("export") / "model.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def exported(ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    assert main(["--ckpt_path", str(ckpt), "--format", "onnx", "--output", str(out)]) == 0
    return out


def test_onnx_matches_pytorch_with_dynamic_batch(ckpt: Path, exported: Path) -> None:
    model = PathoScope.from_checkpoint(ckpt)
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image", "foreground"]
    assert [o.name for o in session.get_outputs()] == ["score", "anomaly_map"]
    assert isinstance(session.get_inputs()[0].shape[0], str)  # symbolic batch axis
    gen = torch.Generator().manual_seed(1)
    for batch in (2, 5, 1):
        image = torch.randn(batch, 3, 64, 64, generator=gen)
        foreground = (torch.rand(batch, 1, 64, 64, generator=gen) > 0.4).float()
        foreground[0] = 1.0  # "no foreground" is passed as all ones
        score, anomaly_map = session.run(
            None, {"image": image.numpy(), "foreground": foreground.numpy()}
        )
        with torch.no_grad():  # the unfolded model: parity covers the folding too
            ref = model(image, foreground.bool())
            ref_none = model(image[:1])
        assert score.shape == (batch,) and anomaly_map.shape == (batch, 1, 64, 64)
        np.testing.assert_allclose(score, ref.score.numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(anomaly_map, ref.anomaly_map.numpy(), atol=1e-4, rtol=0)
        assert score[0] == pytest.approx(float(ref_none.score[0]), abs=1e-4)
        assert np.ptp(anomaly_map) > 1e-3  # not a constant map


def test_metadata_holds_preprocessing_and_tau(ckpt: Path, exported: Path) -> None:
    meta = read_metadata(exported)
    model = PathoScope.from_checkpoint(ckpt)
    assert meta["tau"] == pytest.approx(TAU)
    assert meta["preprocessing"] == json.loads(json.dumps(model.preprocessing))
    assert meta["preprocessing"]["slice_range"] == [60, 90]
    assert meta["image_size"] == 64 and meta["weights"] == "random"
    assert onnx.load(str(exported)).graph.initializer  # weights inside the one file
    assert not list(exported.parent.glob("*.data"))


def test_export_errors(
    ckpt: Path, exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = exported.read_bytes()
    assert main(["--ckpt_path", str(ckpt), "--output", str(exported)]) == EXIT_USAGE
    assert "exists (pass --overwrite" in capsys.readouterr().err
    assert exported.read_bytes() == before
    plain = tmp_path / "plain.ckpt"
    torch.save({}, plain)
    assert main(["--ckpt_path", str(plain), "--output", str(tmp_path / "x.onnx")]) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert "plain.ckpt: not a usable PathoSCOPE checkpoint" in err and "\n" not in err
    assert not (tmp_path / "x.onnx").exists()
    with pytest.raises(SystemExit):
        main(["--ckpt_path", str(ckpt), "--format", "tflite", "--output", "m.tflite"])
    model = load_model(ckpt)
    model.with_scoring(source="anchor_distance")
    with pytest.raises(ValueError, match="only discriminator checkpoints"):
        export_onnx(model, tmp_path / "a.onnx")


def test_interrupted_export_leaves_no_file(
    ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C while the ONNX file is being written: no file under the output's name (a later
    run without --overwrite is not refused by half a file)."""

    def interrupted_save(proto: object, path: str) -> None:
        Path(path).write_bytes(b"half an ONNX file")
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx, "save", interrupted_save)
    out = tmp_path / "model.onnx"
    with pytest.raises(KeyboardInterrupt):
        export_onnx(load_model(ckpt), out)
    assert list(tmp_path.iterdir()) == []
