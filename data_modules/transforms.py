"""Image transforms: normalisation, resizing, seeded training augmentation (paper Section 2.2).

Pixel convention (docs/batch_contract.md): images are float32 (H, W, 3) in [0, 1] before
normalisation; masks (foreground, gt_mask, lesion_mask) are (H, W) bool.
"""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_MEAN = np.asarray(IMAGENET_MEAN, dtype=np.float32)
_STD = np.asarray(IMAGENET_STD, dtype=np.float32)


def normalize(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) float in [0, 1] -> (3, H, W) ImageNet-normalised float32 tensor."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"normalize expects an (H, W, 3) image, got shape {image.shape}")
    # The same two float32 operations per value, written straight into the (3, H, W) layout:
    # one pass each instead of two temporaries and a transposing copy (a tenth of the time).
    planes = np.asarray(image, dtype=np.float32).transpose(2, 0, 1)  # a view
    out = np.empty(planes.shape, np.float32)
    np.subtract(planes, _MEAN[:, None, None], out=out)
    np.divide(out, _STD[:, None, None], out=out)
    return torch.from_numpy(out)


def denormalize(image: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) ImageNet-normalised -> same shape in [0, 1] (clamped)."""
    if image.ndim < 3 or image.shape[-3] != 3:
        raise ValueError(f"denormalize expects (..., 3, H, W), got shape {tuple(image.shape)}")
    mean = torch.tensor(IMAGENET_MEAN, dtype=image.dtype, device=image.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=image.dtype, device=image.device).view(3, 1, 1)
    return (image * std + mean).clamp(0.0, 1.0)


def _size_hw(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def resize(
    image: np.ndarray,
    size: int | tuple[int, int],
    masks: dict[str, np.ndarray] | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Resize an image (area when shrinking, bilinear when enlarging) and masks (nearest).

    `size` is an int (square) or (H, W). Returns (image float32, masks with their input dtypes);
    the masks dict is empty when `masks` is None. Nothing is copied when the size already fits.
    """
    h, w = _size_hw(size)
    image = np.asarray(image, dtype=np.float32)
    if image.shape[:2] != (h, w):
        # Area averaging avoids aliasing on downscale; it degenerates to nearest on upscale.
        shrinking = image.shape[0] * image.shape[1] > h * w
        interp = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
        image = cv2.resize(image, (w, h), interpolation=interp)
        if image.ndim == 2:  # cv2 drops a trailing singleton channel
            image = image[..., None]
    out_masks: dict[str, np.ndarray] = {}
    for name, mask in (masks or {}).items():
        if mask.shape[:2] != (h, w):
            resized = cv2.resize(mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
            mask = resized.astype(mask.dtype)
        out_masks[name] = mask
    return image, out_masks


class EvalTransform:
    """Evaluation transform: resize only (the caller normalises)."""

    def __init__(self, image_size: int) -> None:
        self.image_size = image_size

    def __call__(
        self, image: np.ndarray, masks: dict[str, np.ndarray] | None = None
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        return resize(image, self.image_size, masks)


class TrainAugmentation:
    """Random affine + elastic deformation applied jointly to an image and its masks.

    The randomness comes only from the `seed` given to each call: albumentations 2.x keeps its own
    generators and ignores np.random / random, so the pipeline is re-seeded with
    `Compose.set_random_seed(seed)` on every call. The image is first resized to `image_size`, so
    the pixel parameters (elastic_alpha, elastic_sigma) are in pixels of the output image.
    Borders are filled with 0 (brain MRI background) in the image and every mask; masks are
    warped nearest-neighbour.
    """

    def __init__(
        self,
        image_size: int,
        rotate: float = 10.0,
        scale: tuple[float, float] = (0.9, 1.1),
        translate: float = 0.05,
        elastic_alpha: float = 60.0,
        elastic_sigma: float = 8.0,
        p_elastic: float = 0.5,
    ) -> None:
        self.image_size = image_size
        self.pipeline = A.Compose(
            [
                A.Affine(
                    rotate=(-rotate, rotate),
                    scale=scale,
                    translate_percent=(-translate, translate),
                    interpolation=cv2.INTER_LINEAR,
                    mask_interpolation=cv2.INTER_NEAREST,
                    border_mode=cv2.BORDER_CONSTANT,
                    fill=0,
                    fill_mask=0,
                    p=1.0,
                ),
                A.ElasticTransform(
                    alpha=elastic_alpha,
                    sigma=elastic_sigma,
                    interpolation=cv2.INTER_LINEAR,
                    mask_interpolation=cv2.INTER_NEAREST,
                    # uniform noise: the displacement scale does not depend on the image size
                    noise_distribution="uniform",
                    border_mode=cv2.BORDER_CONSTANT,
                    fill=0,
                    fill_mask=0,
                    p=p_elastic,
                ),
            ],
            seed=0,
        )

    def __call__(
        self, image: np.ndarray, masks: dict[str, np.ndarray], seed: int
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(H, W, 3) float [0, 1] + {name: (H, W) mask} -> same, at image_size, augmented."""
        image, masks = resize(image, self.image_size, masks)
        names = list(masks)
        self.pipeline.set_random_seed(int(seed))
        out = self.pipeline(
            image=image, masks=[masks[n].astype(np.uint8, copy=False) for n in names]
        )
        aug = np.clip(out["image"], 0.0, 1.0).astype(np.float32, copy=False)
        return aug, {n: m.astype(masks[n].dtype) for n, m in zip(names, out["masks"], strict=True)}
