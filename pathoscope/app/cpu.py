"""Process settings that make CPU training faster without changing a single number.

`keep_freed_memory()`: glibc's malloc serves every block above 32 MiB (and, by its adaptive
threshold, many smaller ones) from a fresh mmap and unmaps it on free, so each large tensor of
every step is first-touched again, page by page. A training step allocates and frees tens of such
tensors ((B h w, 1024) activations of D and their gradients); on this project's 2-core VM the page
faults were a fifth of a 256 px step (benchmarks/ABLATION.md, "Time to quality").
Serving all blocks from the heap and never trimming it keeps that memory mapped for reuse, as
PyTorch's CPU performance guide obtains with jemalloc or tcmalloc. The price: the process keeps
its peak memory until it exits.

`skip_nan_fill()`: with `trainer.deterministic` on, torch fills every new tensor with NaN so that
a read of uninitialised memory shows (`torch.utils.deterministic.fill_uninitialized_memory`), one
more pass over each allocation (8 % of a step here). Nothing in the project reads uninitialised
memory: the determinism tests compare runs bit for bit.

`pathoscope` applies both unless PATHOSCOPE_CPU_DEFAULTS=1 (torch's and glibc's own settings; a
GLIBC_TUNABLES or MALLOC_* malloc setting in the environment is always left alone).
"""

from __future__ import annotations

import ctypes
import os
import platform

_M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
_M_MMAP_MAX = -4


def _user_chose() -> bool:
    if os.environ.get("PATHOSCOPE_CPU_DEFAULTS") == "1":
        return True
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    return "malloc" in tunables or any(k.startswith("MALLOC_") for k in os.environ)


def keep_freed_memory() -> bool:
    """Serve allocations from glibc's heap and never trim it (module docstring); True if applied.

    A no-op outside Linux/glibc, or when the user chose (PATHOSCOPE_CPU_DEFAULTS=1, a malloc
    setting in GLIBC_TUNABLES / MALLOC_*). Threads other than the main one keep their arenas, which
    still fall back to mmap for blocks their heaps cannot hold.
    """
    if _user_chose() or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1
        return libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1 and ok  # a C int
    except (OSError, AttributeError):
        return False


def skip_nan_fill() -> None:
    """Deterministic algorithms stay on; new tensors are no longer filled with NaN first."""
    import torch  # here, so that `pathoscope --help` does not import torch

    if os.environ.get("PATHOSCOPE_CPU_DEFAULTS") != "1":
        torch.utils.deterministic.fill_uninitialized_memory = False  # type: ignore[attr-defined]
