"""Writers of small synthetic datasets in exactly the real datasets' on-disk formats.

They let the whole framework (data modules, training, CLI, tests) run where neither BraTS2020 nor
ChestX-ray8 exists and nothing can be downloaded. Everything is deterministic by `seed` (the files
are byte-identical for the same arguments: gzip headers carry no timestamp).

* `write_brats` (synthetic/brats.py): BraTS2020's NIfTI layout, a phantom brain with tumours.
* `write_chestxray8` (synthetic/chestxray8.py): ChestX-ray8's PNG + CSV layout.
* `toy_*` (synthetic/toy.py): toy images whose anomalies differ by texture, not by intensity.
* `write_brats_anatomy` (synthetic/anatomy.py): the same layout, brains from real anatomy (MNI152).
* `make_demo_data`: the small sets `pathoscope make-demo-data` and `make train` write.
"""

from __future__ import annotations

from pathlib import Path

from data_modules.errors import DataError
from data_modules.synthetic.anatomy import write_brats_anatomy
from data_modules.synthetic.brats import (
    BRATS_AFFINE,
    BRATS_DIRNAME,
    BRATS_MODALITIES,
    MISNAMED_SEG,
    write_brats,
)
from data_modules.synthetic.chestxray8 import (
    CHEST_BBOX_COLUMNS,
    CHEST_BBOX_FRAME,
    CHEST_DATA_ENTRY_COLUMNS,
    write_chestxray8,
)
from data_modules.synthetic.noise import smooth_noise
from data_modules.synthetic.toy import toy_tensors, toy_texture_images, toy_training_batch

DEMO_KINDS = ("phantom", "anatomy", "anatomy-hard")
# Sizes that the datasets' default protocols accept, with room for 8 shots (what
# `pathoscope make-demo-data` writes): experiments/brats.yaml tests 130 healthy + 290 tumorous
# slices (40 subjects), chestxray8.yaml 1,490 radiographs (1,000 + 1,000 images, 90 % of the
# patients in the test list; 128 px keeps the set at about 25 MB).
# `make-demo-data --kind anatomy` writes its 40 subjects in BraTS's own frame (2 min, 460 MB here):
# the development benchmark of benchmarks/peers.py and benchmarks/ablation.py.
ANATOMY_SHAPE = (240, 240, 155)
PROTOCOL_SIZES: dict[str, dict[str, object]] = {
    "brats": {"n_subjects": 40},
    "chestxray8": {"n_normal": 1000, "n_abnormal": 1000, "size": 128, "test_fraction": 0.9},
}

__all__ = [
    "ANATOMY_SHAPE",
    "BRATS_AFFINE",
    "BRATS_DIRNAME",
    "BRATS_MODALITIES",
    "CHEST_BBOX_COLUMNS",
    "CHEST_BBOX_FRAME",
    "CHEST_DATA_ENTRY_COLUMNS",
    "MISNAMED_SEG",
    "PROTOCOL_SIZES",
    "make_demo_data",
    "smooth_noise",
    "toy_tensors",
    "toy_texture_images",
    "toy_training_batch",
    "write_brats",
    "write_brats_anatomy",
    "write_chestxray8",
]


def make_demo_data(dataset: str, out: str | Path, kind: str = "phantom", **kwargs: object) -> Path:
    """Write a demo dataset for `pathoscope make-demo-data --dataset brats|chestxray8 --out DIR`.

    Defaults are small enough to write in seconds and large enough for the default few-shot
    protocol at reduced test counts: BraTS 20 subjects of 128 x 128 x 100, ChestX-ray8 60 normal
    + 60 abnormal images of 256 x 256. Keyword arguments override the writer's defaults
    (PROTOCOL_SIZES: sets the default protocols themselves accept).
    `kind` (BraTS only): "phantom" (`write_brats`), "anatomy" (brains from the MNI152 template,
    `synthetic.anatomy.write_brats_anatomy`; needs nilearn's data files) or "anatomy-hard" (the
    same with normal variability and less conspicuous tumours, `hard=True`).
    Returns the path to give the data module as `root`.
    """
    if kind not in DEMO_KINDS:
        raise DataError(f"make_demo_data: unknown kind {kind!r}; expected one of {DEMO_KINDS}")
    if dataset == "brats":
        opts: dict = {"n_subjects": 20, "shape": (128, 128, 100)}
        opts.update(kwargs)
        if kind in ("anatomy", "anatomy-hard"):
            return write_brats_anatomy(out, hard=kind == "anatomy-hard", **opts)
        return write_brats(out, **opts)
    if kind != "phantom":
        raise DataError(f"make_demo_data: kind={kind!r} applies to brats only, not {dataset!r}")
    if dataset == "chestxray8":
        opts = {"n_normal": 60, "n_abnormal": 60, "size": 256}
        opts.update(kwargs)
        return write_chestxray8(out, **opts)
    raise DataError(
        f"make_demo_data: unknown dataset {dataset!r}; expected 'brats' or 'chestxray8'"
    )
