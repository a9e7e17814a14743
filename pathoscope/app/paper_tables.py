"""The paper's own numbers (percent), as reference rows for `pathoscope table`.

Transcribed from the PathoSCOPE paper (Chin et al.), only the rows whose labels
and values read unambiguously:
* Table 1 (BraTS2020): every method, Image AUROC / Pixel AUROC / PRO / Dice for K = 2, 4, 6, 8
  ("-" in the paper = None).
* Table 2 (ChestXray8): every method, Image AUROC for K = 2, 4, 6, 8.
* Table 3 (BraTS2020 ablation, Image / Pixel AUROC): the "L_GC" row (our ablation/global_only)
  and "L_LC + L_GC" (= Table 1 "Ours"). The other rows' labels are lost in the source text.
* Table 4 (ChestXray8 ablation): only "L_LC + L_GC" (= Table 2 "Ours") is labelled.

Each row: (label, source, our matching config or None, {metric: {K: percent or None}}).
"""

from __future__ import annotations

from typing import NamedTuple

KS = (2, 4, 6, 8)


class PaperRow(NamedTuple):
    label: str  # method name as printed in the paper
    source: str  # e.g. "Table 1"
    config: str | None  # the experiments/ config that reproduces it, if any
    metrics: dict[str, dict[int, float | None]]  # metric -> K -> percent


def _k(values: tuple[float | None, ...]) -> dict[int, float | None]:
    return dict(zip(KS, values, strict=True))


_NONE4: tuple[None, ...] = (None, None, None, None)

# Table 1, BraTS2020: name -> (image AUROC, pixel AUROC, PRO, Dice), each for K = 2, 4, 6, 8.
_TABLE1: dict[str, tuple[tuple[float | None, ...], ...]] = {
    "f-AnoGAN": ((59.29, 57.73, 57.87, 54.49), _NONE4, _NONE4, _NONE4),
    "Ganomaly": ((46.20, 43.29, 42.98, 45.72), _NONE4, _NONE4, _NONE4),
    "PaDIM": (
        (66.07, 72.90, 73.58, 75.13),
        (92.28, 94.50, 94.55, 94.89),
        (65.78, 73.87, 74.00, 74.70),
        (27.67, 36.57, 36.86, 38.30),
    ),
    "CFLOW": (
        (80.91, 82.42, 82.99, 84.52),
        (94.95, 94.79, 94.68, 94.73),
        (77.85, 76.67, 76.07, 74.20),
        (42.71, 39.63, 39.30, 40.94),
    ),
    "RD": (
        (44.61, 47.19, 46.86, 47.36),
        (15.23, 15.40, 15.76, 15.75),
        (0.00, 0.00, 0.00, 0.00),
        (5.36, 5.38, 5.37, 5.38),
    ),
    "RegAD": (
        (64.39, 62.08, 70.04, 68.35),
        (95.95, 95.83, 95.97, 96.17),
        (86.34, 84.05, 84.85, 85.28),
        (34.51, 34.85, 34.00, 34.81),
    ),
    "FAE": (
        (60.20, 70.51, 68.40, 69.85),
        (91.09, 93.24, 93.04, 93.35),
        (72.53, 77.54, 77.29, 77.86),
        (26.11, 32.02, 31.43, 33.26),
    ),
    "ExpVAE": (
        (57.75, 55.46, 59.72, 60.15),
        (67.92, 47.51, 54.13, 55.72),
        (36.49, 15.77, 21.73, 26.03),
        (23.98, 10.13, 17.77, 13.17),
    ),
    "AMCons": (
        (56.80, 54.33, 58.79, 53.53),
        (93.09, 91.47, 93.48, 93.39),
        (73.89, 72.04, 75.15, 74.42),
        (43.78, 41.84, 46.04, 44.52),
    ),
    "DRAEM": (
        (60.36, 59.79, 56.87, 57.55),
        (94.44, 95.01, 95.07, 94.93),
        (75.29, 74.75, 75.38, 75.02),
        (39.62, 38.52, 40.72, 38.81),
    ),
    "SimpleNet": (
        (62.27, 62.27, 65.03, 65.07),
        (64.54, 58.53, 57.75, 50.80),
        (41.30, 41.20, 40.80, 41.20),
        (13.60, 13.60, 13.40, 13.50),
    ),
    "GLASS-h": (
        (87.39, 88.42, 88.66, 87.19),
        (95.63, 95.17, 94.57, 92.68),
        (80.51, 78.79, 78.58, 76.45),
        (41.16, 38.29, 36.94, 35.02),
    ),
    "GLASS-m": (
        (86.66, 85.88, 87.05, 87.00),
        (94.12, 93.24, 94.20, 92.72),
        (84.82, 79.47, 80.14, 82.94),
        (46.31, 38.93, 37.20, 41.57),
    ),
    "PathoSCOPE": (
        (89.19, 89.96, 89.01, 87.84),
        (97.87, 97.79, 97.55, 97.38),
        (88.95, 89.06, 89.06, 87.75),
        (49.21, 48.02, 48.02, 44.63),
    ),
}

# Table 2, ChestXray8: name -> image AUROC for K = 2, 4, 6, 8.
_TABLE2: dict[str, tuple[float, ...]] = {
    "f-AnoGAN": (41.63, 40.36, 39.52, 41.45),
    "Ganomaly": (60.55, 55.43, 57.43, 55.70),
    "PaDIM": (32.65, 31.93, 31.25, 30.70),
    "CFLOW": (31.22, 30.97, 29.98, 28.95),
    "RD": (68.26, 66.98, 65.37, 63.57),
    "RegAD": (66.06, 64.06, 65.26, 64.24),
    "FAE": (64.95, 67.94, 71.72, 70.84),
    "ExpVAE": (55.35, 55.68, 54.56, 55.16),
    "AMCons": (42.15, 42.43, 42.92, 41.95),
    "DRAEM": (56.38, 57.43, 51.74, 54.98),
    "SimpleNet": (65.82, 67.70, 68.22, 67.07),
    "GLASS-h": (69.52, 69.53, 72.44, 70.49),
    "GLASS-m": (70.03, 69.49, 70.27, 68.50),
    "PathoSCOPE": (72.23, 73.64, 73.94, 72.95),
}

# Table 3, BraTS2020 ablation, "L_GC" row (Image AUROC / Pixel AUROC).
_TABLE3_GC = ((84.09, 87.57, 80.88, 86.04), (95.53, 96.22, 91.34, 94.15))

_CONFIG_OF = {
    "PathoSCOPE": "pathoscope",
    "GLASS-h": "glass_hypersphere",
    "GLASS-m": "glass_manifold",
}


def _brats_rows() -> list[PaperRow]:
    rows = [
        PaperRow(
            name,
            "Table 1",
            _CONFIG_OF.get(name),
            {
                "image_auroc": _k(img),
                "pixel_auroc": _k(pix),
                "pro": _k(pro),
                "dice_best": _k(dice),
            },
        )
        for name, (img, pix, pro, dice) in _TABLE1.items()
    ]
    rows.append(
        PaperRow(
            "L_GC only",
            "Table 3",
            "ablation/global_only",
            {"image_auroc": _k(_TABLE3_GC[0]), "pixel_auroc": _k(_TABLE3_GC[1])},
        )
    )
    return rows


def _chest_rows() -> list[PaperRow]:
    return [
        PaperRow(name, "Table 2", _CONFIG_OF.get(name), {"image_auroc": _k(img)})
        for name, img in _TABLE2.items()
    ]


PAPER_ROWS: dict[str, list[PaperRow]] = {"brats": _brats_rows(), "chestxray8": _chest_rows()}


def paper_rows(dataset: str) -> list[PaperRow]:
    """The paper's rows for `dataset` ("brats" / "chestxray8"); none for anything else."""
    return list(PAPER_ROWS.get(dataset, []))
