"""Output files that appear under their final name only when complete: written aside, renamed.

An interrupted command (Ctrl-C, an error, a full disk) then leaves either the previous file or
none, never a truncated one; a reader never sees half a file. The temporary name is a hidden
sibling (same folder, so the rename is atomic) that keeps the file's name at its end, so writers
choosing the format by extension (nibabel's .nii.gz, PIL's .png, numpy's .npz) work unchanged.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

PARTIAL_PREFIX = ".partial-"  # hidden: `pathoscope predict` and `table` never pick them up


def partial_path(path: str | Path) -> Path:
    """The temporary sibling that `atomic_path` writes `path` through."""
    path = Path(path)
    return path.with_name(f"{PARTIAL_PREFIX}{os.getpid()}-{path.name}")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write; it replaces `path` when the block ends
    normally and is removed when it raises (KeyboardInterrupt included)."""
    path = Path(path)
    tmp = partial_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` atomically (see `atomic_path`); returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


@contextmanager
def interrupts_held() -> Iterator[None]:
    """Ctrl-C (SIGINT) inside the block takes effect when the block ends, so that a few renames
    are done together or not at all. Outside the main thread (no signal handlers) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        if callable(previous):  # Python's default handler raises KeyboardInterrupt
            previous(signal.SIGINT, None)
        elif previous == signal.SIG_DFL:
            raise KeyboardInterrupt


def move_together(moves: Sequence[tuple[Path, Path]]) -> None:
    """Rename each (source, destination) pair (same file system), Ctrl-C held back until all are
    done: the files of one result appear under their final names together."""
    with interrupts_held():
        for source, destination in moves:
            os.replace(source, destination)
