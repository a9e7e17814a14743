"""Tissue to MR signal, per modality: the intensities of normal tissue and of the tumour
compartments in white-matter units, the template's detail, a bias field and Rician noise
(`synthetic.anatomy`), with the hard variant's variability when given (`synthetic.variability`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from data_modules.synthetic.noise import smooth_noise
from data_modules.synthetic.variability import Variability, add_hyperintensities, vary_acquisition

# Normal tissue means (CSF, GM, WM) in white-matter units, and the weight of the template detail.
_NORMAL = {
    "flair": (0.35, 1.2, 1.0),
    "t1": (0.35, 0.72, 1.0),
    "t1ce": (0.38, 0.74, 1.0),
    "t2": (2.8, 1.35, 1.0),
}
_DETAIL = {"flair": -0.5, "t1": 1.0, "t1ce": 1.0, "t2": -0.8}
# Tumour compartments: (subtle, obvious) intensity in WM units, interpolated by the contrast.
_OEDEMA = {"flair": (1.1, 1.8), "t1": (0.93, 0.72), "t1ce": (0.93, 0.72), "t2": (1.35, 2.3)}
_RIM = {"flair": (1.15, 1.6), "t1": (0.88, 0.65), "t1ce": (1.3, 2.0), "t2": (1.3, 1.9)}
_NECROSIS = {"flair": (0.9, 0.9), "t1": (0.75, 0.4), "t1ce": (0.7, 0.35), "t2": (1.6, 2.8)}
_NONENH = {"flair": (1.15, 1.9), "t1": (0.85, 0.6), "t1ce": (0.85, 0.6), "t2": (1.5, 2.6)}
_HET_SIGN = {"flair": 1.0, "t1": -0.5, "t1ce": -0.5, "t2": 1.0}  # heterogeneity per modality


def modality(
    rng: np.random.Generator,
    mod: str,
    tissue: dict[str, np.ndarray],
    lesion: Any,
    var: Variability | None = None,
) -> np.ndarray:
    """One modality over the brain box, in WM units before scaling (float32); `var`: the hard
    variant's normal variability."""
    means = (np.asarray(_NORMAL[mod]) * rng.uniform(0.94, 1.06, 3)).astype(np.float32)
    if var is not None:
        means[1] = means[2] + np.float32(var.gm_wm) * (means[1] - means[2])
    img = tissue["csf"] * means[0] + tissue["gm"] * means[1] + tissue["wm"] * means[2]
    img += np.float32(_DETAIL[mod]) * tissue["detail"]
    if var is not None:
        img = add_hyperintensities(img, mod, var)
    if lesion is not None:
        het = 1.0 + np.float32(_HET_SIGN[mod]) * lesion.het
        part = img[lesion.local]
        tables = {"oedema": _OEDEMA, "rim": _RIM, "necrosis": _NECROSIS, "nonenh": _NONENH}
        for name, weight in lesion.soft.items():  # nested, outermost first
            lo, hi = tables[name][mod]
            value = lo + lesion.tumour.contrast * (hi - lo)
            if name == "necrosis" and mod == "flair":
                value = lesion.tumour.necrosis_flair
            part += weight * (np.float32(value) * het - part)
        img[lesion.local] = part
    img *= 1.0 + np.float32(rng.uniform(0.05, 0.1)) * smooth_noise(rng, img.shape, 2)  # bias
    sigma = np.float32(rng.uniform(0.01, 0.04))
    if var is not None:
        img, sigma = vary_acquisition(img, var), np.float32(var.noise)
    real = img + sigma * rng.standard_normal(img.shape, dtype=np.float32)
    imag = sigma * rng.standard_normal(img.shape, dtype=np.float32)
    return np.sqrt(real * real + imag * imag)  # Rician magnitude
