"""The normal variability of `make-demo-data --kind anatomy-hard` (`write_brats_anatomy(hard=True)`).

What makes real BraTS harder than a template brain and a tumour, drawn per subject from the hard
variant's own generator (the plain variant's draws are untouched): unlabelled white-matter
hyperintensities (punctate and confluent deep spots, periventricular caps; none to moderate
burden) in the intensities of subtle oedema, a grey / white contrast factor, a second bias field,
noise and a through-plane blur (thick slices); and tumours smaller (`HARD_SIZE`) and at most
`HARD_CONTRAST` as conspicuous. The ranges were calibrated on the untrained `anchor_knn`
(benchmarks/PEERS.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from data_modules.synthetic.noise import smooth_noise

# Hyperintensities' intensity range per modality, white-matter units (subtle oedema's).
WMH = {"flair": (1.2, 1.55), "t1": (0.97, 0.88), "t1ce": (0.97, 0.88), "t2": (1.25, 1.7)}
HARD_CONTRAST = 1.0  # tumour conspicuity factor (the plain set's: 1)
HARD_SIZE = (0.75, 1.0)  # per-subject factor on the tumour's planned radius


def _soft(x: np.ndarray, width: float) -> np.ndarray:
    return (0.5 * (1.0 + np.tanh(x / np.float32(2.0 * width)))).astype(np.float32)


@dataclass(frozen=True)
class Variability:
    """The hard variant's normal variability of one subject (every modality shares it)."""

    wmh: np.ndarray  # (box) membership of unlabelled white-matter hyperintensities
    wmh_level: float  # 0 .. 1 between the _WMH intensity bounds
    gm_wm: float  # grey / white contrast factor: GM mean -> WM + gm_wm * (GM - WM)
    bias: float  # bias field amplitude
    noise: float  # noise sigma (WM units)
    thickness: float  # through-plane blur sigma (voxels): thick slices
    rng: np.random.Generator


def draw_variability(rng: np.random.Generator, tissue: dict[str, np.ndarray]) -> Variability:
    """Per-subject normal variability of the hard variant: punctate and confluent deep WMH and
    periventricular caps (none to moderate burden), grey / white contrast, bias, noise and slice
    thickness."""
    wm, csf, brain = tissue["wm"], tissue["csf"], tissue["brain"] > 0
    depth = ndimage.distance_transform_edt(brain)  # voxels from the brain's edge
    deep = np.clip((depth - 12.0) / 10.0, 0.0, 1.0).astype(np.float32)
    ventricles = ndimage.gaussian_filter((csf > 0.8) * deep, 2.0)  # deep CSF: the ventricles
    caps = np.clip(ventricles / 0.15, 0.0, 1.0) * rng.uniform(0.0, 0.6)  # periventricular
    spots = smooth_noise(rng, wm.shape, max(4, wm.shape[0] // 6))
    burden = rng.uniform(2.2, 3.8)  # threshold in noise std: higher, fewer spots
    wmh = np.maximum(_soft(spots - np.float32(burden), 0.15), caps) * wm * deep
    return Variability(
        wmh=wmh.astype(np.float32),
        wmh_level=float(rng.uniform(0.0, 1.0)),
        gm_wm=float(rng.uniform(0.9, 1.1)),
        bias=float(rng.uniform(0.03, 0.1)),
        noise=float(rng.uniform(0.01, 0.04)),
        thickness=float(rng.uniform(0.0, 0.8)),
        rng=rng,
    )


def add_hyperintensities(img: np.ndarray, mod: str, var: Variability) -> np.ndarray:
    """Blend the hyperintensities into one modality (WM units) by their membership."""
    lo, hi = WMH[mod]
    return img + var.wmh * (np.float32(lo + var.wmh_level * (hi - lo)) - img)


def vary_acquisition(img: np.ndarray, var: Variability) -> np.ndarray:
    """The subject's second bias field and through-plane blur (noise is added by the caller)."""
    img = img * (1.0 + np.float32(var.bias) * smooth_noise(var.rng, img.shape, 3))
    if var.thickness > 0.3:
        img = ndimage.gaussian_filter1d(img, var.thickness, axis=2)
    return img
