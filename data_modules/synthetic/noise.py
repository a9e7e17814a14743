"""Smooth random fields for the synthetic datasets (numpy only)."""

from __future__ import annotations

import numpy as np


def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) weights interpolating n_in grid values to n_out samples (smoothstep, C1)."""
    pos = np.linspace(0.0, n_in - 1.0, n_out)
    lo = np.clip(np.floor(pos).astype(int), 0, n_in - 2)
    t = pos - lo
    t = t * t * (3.0 - 2.0 * t)  # smoothstep: no creases at grid points
    mat = np.zeros((n_out, n_in), dtype=np.float32)
    mat[np.arange(n_out), lo] = 1.0 - t
    mat[np.arange(n_out), lo + 1] += t
    return mat


def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], cells: int) -> np.ndarray:
    """Band-limited float32 noise of `shape` (2D or 3D), about `cells` random values per axis, std ~1.

    Separable interpolation of a coarse Gaussian grid as contiguous matrix products: cheap even
    for 240 x 240 x 155 volumes.
    """
    grid = tuple(max(2, min(cells, s) + 1) for s in shape)
    out = rng.standard_normal(grid).astype(np.float32)
    # Expand the last axis first and axis 0 last, so the one big product is a single 2D GEMM.
    for axis in reversed(range(len(shape))):
        mat = _interp_matrix(shape[axis], out.shape[axis])  # (n_out, n_in)
        moved = np.moveaxis(out, axis, 0)
        out = np.moveaxis(
            (mat @ moved.reshape(moved.shape[0], -1)).reshape(-1, *moved.shape[1:]), 0, axis
        )
    out = np.ascontiguousarray(out)
    sub = out[(slice(None, None, 3),) * out.ndim]  # std on a subsample: same answer, cheaper
    return out / max(float(sub.std()), 1e-6)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))
