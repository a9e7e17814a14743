"""Toy images for probing whether the discriminator learns (tests, scripts/toy_learning.py).

Normal images are horizontal grey stripes or smooth grey "tissue"; anomalies differ by structure
or texture, never by mean intensity, so a detector cannot find them by brightness alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from data_modules.synthetic.noise import smooth_noise

if TYPE_CHECKING:
    from pathoscope.batches import TrainBatch


def toy_texture_images(
    rng: np.random.Generator,
    n: int,
    kind: str = "stripes",
    anomalous: bool = False,
    size: int = 64,
    amplitude: float = 0.15,
) -> tuple[np.ndarray, np.ndarray]:
    """Toy images whose anomalies differ by structure or texture, never by mean intensity.

    kind "stripes": horizontal grey stripes (random phase, period 7-9 px); an anomaly is a square
    patch of the same stripes turned by 90 degrees. kind "mottle": smooth grey "tissue"; an anomaly
    is a square patch with extra zero-mean texture of contrast `amplitude`. Returns (n, S, S)
    float32 images in [0, 1] and (n, S, S) bool anomaly masks (empty unless `anomalous`).
    """
    if kind not in ("stripes", "mottle"):
        raise ValueError(f"toy_texture_images: kind must be 'stripes' or 'mottle', got {kind!r}")
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    images, masks = [], []
    for _ in range(n):
        phase, period = rng.uniform(0, 2 * np.pi), rng.uniform(7, 9)
        if kind == "mottle":
            image = 0.5 + 0.15 * smooth_noise(rng, (size, size), 4)
        else:
            image = 0.5 + 0.2 * np.sin(2 * np.pi * yy / period + phase)
        mask = np.zeros((size, size), bool)
        if anomalous:
            side = int(rng.integers(size // 4, size * 3 // 8 + 1))
            i, j = rng.integers(size // 16, size - side - size // 16, size=2)
            mask[i : i + side, j : j + side] = True
            if kind == "mottle":
                texture = smooth_noise(rng, (size, size), 16)
                texture = (texture - texture[mask].mean()) / texture[mask].std()
                image = np.where(mask, image + amplitude * texture, image)
            else:
                image = np.where(mask, 0.5 + 0.2 * np.sin(2 * np.pi * xx / period + phase), image)
        image = image + 0.02 * rng.standard_normal((size, size))
        images.append(np.clip(image, 0.0, 1.0).astype(np.float32))
        masks.append(mask)
    return np.stack(images), np.stack(masks)


def toy_tensors(images: np.ndarray) -> Any:
    """(n, S, S) grey toy images in [0, 1] -> (n, 3, S, S) ImageNet-normalised tensor."""
    import torch  # lazy: writing datasets needs no torch

    from data_modules.transforms import normalize

    return torch.stack([normalize(np.repeat(im[..., None], 3, 2)) for im in images])


def toy_training_batch(
    rng: np.random.Generator, n: int, kind: str = "stripes", size: int = 64, synthesizer: Any = None
) -> TrainBatch:
    """A `TrainBatch` of toy normals (`toy_texture_images`) and the same images with the project's
    synthetic lesions: image, lesion_image, lesion_mask (n, 1, S, S) float, foreground
    (n, 1, S, S) bool (the whole image), index 0..n-1."""
    import torch

    from data_modules.anomaly_synthesis import LesionSynthesizer
    from pathoscope.batches import TrainBatch

    synthesizer = synthesizer or LesionSynthesizer()
    x, _ = toy_texture_images(rng, n, kind, size=size)
    whole = np.ones((size, size), bool)
    pairs = [synthesizer(np.repeat(im[..., None], 3, 2), whole, rng) for im in x]
    return TrainBatch(
        image=toy_tensors(x),
        lesion_image=toy_tensors(np.stack([p[0][..., 0] for p in pairs])),
        lesion_mask=torch.from_numpy(np.stack([p[1] for p in pairs])[:, None]).float(),
        foreground=torch.ones(n, 1, size, size, dtype=torch.bool),
        index=torch.arange(n),
    )
