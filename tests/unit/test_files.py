"""pathoscope.files: output files appear under their final name complete or not at all."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from pathoscope import files
from pathoscope.files import atomic_path, move_together, write_text


def test_atomic_path_replaces_the_file_only_when_the_block_completes(tmp_path: Path) -> None:
    target = tmp_path / "case_anomaly_map.nii.gz"
    target.write_text("earlier run")
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        # hidden, same folder, same name at the end (writers that pick the format by suffix)
        assert tmp.parent == tmp_path and tmp.name.startswith(".")
        assert tmp.name.endswith("case_anomaly_map.nii.gz")
        tmp.write_text("half")
        raise KeyboardInterrupt
    assert target.read_text() == "earlier run"
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # no leftover
    write_text(target, "complete")
    assert target.read_text() == "complete"
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_move_together_holds_ctrl_c_until_every_file_is_moved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGINT arriving after the first of three renames: all three land, then KeyboardInterrupt."""
    staged = tmp_path / "staged"
    staged.mkdir()
    moves = []
    for name in ("a.nii.gz", "b.csv", "predictions.csv"):
        (staged / name).write_text(name)
        moves.append((staged / name, tmp_path / name))
    real_replace = os.replace
    done: list[Path] = []

    def replace(source: Path, destination: Path) -> None:
        real_replace(source, destination)
        done.append(Path(destination))
        if len(done) == 1:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle

    monkeypatch.setattr(files.os, "replace", replace)
    # Python's Ctrl-C handler, as in a terminal: a shell's background job (`make test &`) starts
    # with SIGINT ignored, and then the signal would never arrive.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            move_together(moves)
    finally:
        after = signal.signal(signal.SIGINT, previous)
    assert done == [dst for _, dst in moves]
    assert all(dst.read_text() == dst.name for _, dst in moves)
    assert after is signal.default_int_handler  # restored by move_together
