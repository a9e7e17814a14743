"""Local synthetic lesions (paper Section 2.2): x_n -> (x_p, lesion_mask).

The lesion_mask M_p is a thresholded Perlin pattern (union or intersection of two maps at
random scales 2^k, randomly rotated), restricted to the foreground and never empty on the
feature grid. Inside it a grey texture is blended in:
    x_p = x * (1 - M) + ((1 - beta) * x + beta * texture) * M,   beta ~ N(0.5, 0.1) in [0.2, 0.8].
The texture is grey and matched to the foreground's intensity (mean, std) per channel, so it
brings neither a colour nor a brightness shortcut: a grey input gives a grey x_p.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from data_modules.errors import DataError
from pathoscope.feature_grid import FEATURE_STRIDE
from pathoscope.hparams import check_range

_TEXTURE_SUFFIXES = (".jpg", ".jpeg", ".png")


def perlin_noise(
    shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator
) -> np.ndarray:
    """2D gradient (Perlin) noise, (H, W) float32 in [-1, 1] (scaled by sqrt(2) as in DRAEM).

    `res` = number of lattice periods along (H, W); the lattice need not divide the shape.
    """
    h, w = shape
    ry, rx = max(int(res[0]), 1), max(int(res[1]), 1)
    angles = rng.uniform(0.0, 2.0 * np.pi, size=(ry + 1, rx + 1))
    gy = np.sin(angles).astype(np.float32)  # lattice gradients, (ry+1, rx+1)
    gx = np.cos(angles).astype(np.float32)
    # Noise(i, j) = sum over the 4 corners (dy, dx) of the pixel's cell of
    #   wy(dy) wx(dx) [gy(corner) (yf - dy) + gx(corner) (xf - dx)]
    # with wy(0) = 1 - fade(yf), wy(1) = fade(yf). Each of the two terms is separable in y and x.
    y_idx, y_along, y_across = _axis_weights(h, ry)
    x_idx, x_along, x_across = _axis_weights(w, rx)
    noise = _separable(gy, y_idx, y_along, x_idx, x_across)
    noise += _separable(gx, y_idx, y_across, x_idx, x_along)
    return noise * np.float32(np.sqrt(2.0))


def _axis_weights(n: int, periods: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # Along one axis: each pixel's lower lattice node, and the weights (n, 2) of its two nodes
    # for the gradient component along this axis (fade weight x offset) and across it (fade).
    t = (np.arange(n, dtype=np.float32) + 0.5) * np.float32(periods / n)  # pixel centres
    idx = np.minimum(t.astype(np.int64), periods - 1)
    frac = t - idx.astype(np.float32)
    fade = frac * frac * frac * (frac * (frac * 6.0 - 15.0) + 10.0)  # 6t^5 - 15t^4 + 10t^3
    along = np.stack([(1.0 - fade) * frac, fade * (frac - 1.0)], axis=1)
    across = np.stack([1.0 - fade, fade], axis=1)
    return idx, along, across


def _separable(
    grad: np.ndarray, y_idx: np.ndarray, y_w: np.ndarray, x_idx: np.ndarray, x_w: np.ndarray
) -> np.ndarray:
    # sum_{dy,dx} y_w[:, dy] grad[y_idx + dy, x_idx + dx] x_w[:, dx]: (H, W), by two gathers
    # (a sparse matrix product; BLAS would be slower here and oversubscribes loader workers)
    cols = grad[:, x_idx] * x_w[:, 0] + grad[:, x_idx + 1] * x_w[:, 1]  # (ry+1, W)
    return cols[y_idx] * y_w[:, :1] + cols[y_idx + 1] * y_w[:, 1:]  # (H, W)


def grid_fraction(mask: np.ndarray, stride: int) -> np.ndarray:
    """Area fraction of `mask` in each stride x stride cell: (H, W) -> (H//stride, W//stride).

    The same average pooling the model applies to lesion_mask on the feature grid (a partial
    last row/column of pixels is dropped, as avg_pool2d does).
    """
    h, w = mask.shape[0] // stride, mask.shape[1] // stride
    cells = mask[: h * stride, : w * stride].reshape(h, stride, w, stride)
    return cells.mean(axis=(1, 3), dtype=np.float32)


def blend(
    image: np.ndarray, texture: np.ndarray, lesion_mask: np.ndarray, beta: float
) -> np.ndarray:
    """x_p = x * (1 - M) + ((1 - beta) * x + beta * texture) * M.

    image (H, W, C) float in [0, 1]; texture (H, W) or (H, W, C); lesion_mask (H, W) bool.
    """
    if texture.ndim == 2:
        texture = texture[..., None]
    m = lesion_mask[..., None].astype(np.float32)  # (H, W, 1)
    return (image + (beta * m) * (texture - image)).astype(np.float32)


def _value_noise(shape: tuple[int, int], cells: int, rng: np.random.Generator) -> np.ndarray:
    # a (cells+1)^2 random grid upsampled (bilinear; cubic when coarse): smooth noise, (H, W)
    grid = rng.standard_normal((cells + 1, cells + 1), dtype=np.float32)
    interp = cv2.INTER_CUBIC if cells <= 16 else cv2.INTER_LINEAR
    return cv2.resize(grid, (shape[1], shape[0]), interpolation=interp)


def procedural_texture(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A grey texture drawn by `rng` (no files needed): (H, W) float32, zero mean, unit std.

    A random mixture of one or two of: fractal noise, (warped) stripes, soft blobs, grain.
    Everything is built from upsampled small random grids, so one texture costs ~1 ms.
    """
    h, w = shape
    size = max(h, w)
    out = np.zeros(shape, np.float32)
    for kind in rng.choice(4, size=int(rng.integers(1, 3)), replace=False):
        if kind == 0:  # fractal noise: octaves of value noise, amplitude halving
            base = int(rng.integers(2, 8))
            layer = _value_noise(shape, base, rng)
            for octave in range(1, int(rng.integers(3, 5))):
                layer += 0.5**octave * _value_noise(shape, min(base * 2**octave, size // 2), rng)
        elif kind == 1:  # stripes of random period and orientation, warped by smooth noise
            theta = rng.uniform(0.0, np.pi)
            freq = 2.0 * np.pi / rng.uniform(4.0, size / 4.0)
            phase_y = np.arange(h, dtype=np.float32) * np.float32(freq * np.sin(theta))
            phase_x = np.arange(w, dtype=np.float32) * np.float32(freq * np.cos(theta))
            layer = np.add.outer(phase_y, phase_x)
            layer += np.float32(rng.uniform(0.0, 4.0)) * _value_noise(
                shape, int(rng.integers(2, 6)), rng
            )
            np.sin(layer, out=layer)
        elif kind == 2:  # soft blobs: saturated smooth noise
            layer = np.tanh(
                rng.uniform(2.0, 6.0) * _value_noise(shape, int(rng.integers(3, 16)), rng)
            )
        else:  # grain: fine noise at 2-4 pixel scale
            layer = _value_noise(shape, max(size // int(rng.integers(2, 5)), 1), rng)
        layer -= layer.mean()
        std = float(layer.std())
        out += np.float32(rng.uniform(0.5, 1.0) / (std if std > 1e-8 else 1.0)) * layer
    std = float(out.std())
    return out / std if std > 1e-8 else out


class LesionSynthesizer:
    """Draws a local synthetic lesion on an image: (x, foreground, rng) -> (x_p, lesion_mask).

    textures: a DTD-style folder (`images/<class>/*.jpg`, .png also accepted) or None for the
    built-in procedural textures. All randomness comes from the `rng` of each call.
    """

    max_tries = 5  # Perlin draws before the ellipse fallback

    def __init__(
        self,
        textures: str | Path | None = None,
        feature_stride: int = FEATURE_STRIDE,
        min_fraction: float = 0.5,
        beta_mean: float = 0.5,
        beta_std: float = 0.1,
        beta_range: tuple[float, float] = (0.2, 0.8),
        perlin_scale_range: tuple[int, int] = (0, 6),
        threshold: float = 0.5,
        contrast_range: tuple[float, float] = (0.5, 2.0),
        brightness_std: float = 0.5,
        intensity_lesions: float = 0.0,
        intensity_range: tuple[float, float] = (1.0, 4.0),
    ) -> None:
        for name, value, interval in (
            ("feature_stride", feature_stride, "[1, inf)"),
            ("min_fraction", min_fraction, "(0, 1]"),
            ("beta_mean", beta_mean, "[0, 1]"),
            ("beta_std", beta_std, "[0, inf)"),
            ("threshold", threshold, "(-1, 1)"),  # Perlin noise lies in (-1, 1)
            ("brightness_std", brightness_std, "[0, inf)"),
            ("intensity_lesions", intensity_lesions, "[0, 1]"),
        ):
            check_range(name, value, interval)
        (b0, b1), (p0, p1), (c0, c1), (i0, i1) = (
            beta_range,
            perlin_scale_range,
            contrast_range,
            intensity_range,
        )
        for name, pair, ok, rule in (
            ("beta_range", beta_range, 0 <= b0 <= b1 <= 1, "0 <= lo <= hi <= 1"),
            ("perlin_scale_range", perlin_scale_range, 0 <= p0 < p1, "0 <= lo < hi"),
            ("contrast_range", contrast_range, 0 < c0 <= c1, "0 < lo <= hi"),
            ("intensity_range", intensity_range, 0 < i0 <= i1, "0 < lo <= hi"),
        ):
            if not ok:
                raise ValueError(f"{name} must be (lo, hi) with {rule}, got {pair}")
        self.feature_stride = feature_stride
        self.min_fraction = min_fraction
        self.beta_mean = beta_mean
        self.beta_std = beta_std
        self.beta_range = beta_range
        self.perlin_scale_range = perlin_scale_range
        self.threshold = threshold
        # (ours) The texture's contrast (log-uniform factor) and brightness (normal offset, in units
        # of the foreground's std) vary around the foreground's, so that neither "smoother" nor
        # "brighter" is a one-directional shortcut the discriminator could learn instead of
        # "different from normal anatomy".
        self.contrast_range = contrast_range
        self.brightness_std = brightness_std
        # (ours) The fraction of lesions that are intensity lesions instead of textures: a smooth
        # region brighter or darker than the tissue by intensity_range foreground stds (log-uniform,
        # either sign), with soft edges. Brain lesions change tissue intensity (T2/FLAIR hyper-,
        # T1 hypointensity) far more often than they add texture.
        self.intensity_lesions = intensity_lesions
        self.intensity_range = intensity_range
        self.texture_files = _list_textures(Path(textures)) if textures is not None else None

    def __call__(
        self, image: np.ndarray, foreground: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """image (H, W, C) float [0, 1], foreground (H, W) bool -> (x_p, lesion_mask).

        x_p (H, W, C) float32 in [0, 1]; lesion_mask (H, W) bool.
        """
        image = np.asarray(image, dtype=np.float32)
        foreground = np.asarray(foreground, dtype=bool)
        if image.ndim != 3 or foreground.shape != image.shape[:2]:
            raise ValueError(
                f"expected image (H, W, C) and foreground (H, W), got {image.shape} and "
                f"{foreground.shape}"
            )
        lesion_mask = self.lesion_mask(foreground, rng)
        if self.intensity_lesions > 0.0 and rng.random() < self.intensity_lesions:
            return self.intensity_lesion(image, foreground, lesion_mask, rng), lesion_mask
        texture = self.texture(image.shape[:2], rng)
        beta = self.sample_beta(rng)
        # only the lesion's bounding box changes; the texture is matched and blended there
        rows = np.flatnonzero(lesion_mask.any(axis=1))
        cols = np.flatnonzero(lesion_mask.any(axis=0))
        box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        lo, hi = np.log(self.contrast_range[0]), np.log(self.contrast_range[1])
        contrast = float(np.exp(rng.uniform(lo, hi)))
        shift = float(rng.normal(0.0, self.brightness_std)) if self.brightness_std > 0 else 0.0
        matched = self.match_intensity(texture[box], image, foreground, contrast, shift)
        x_p = image.copy()
        x_p[box] = np.clip(blend(image[box], matched, lesion_mask[box], beta), 0.0, 1.0)
        return x_p, lesion_mask

    def intensity_lesion(
        self,
        image: np.ndarray,
        foreground: np.ndarray,
        lesion_mask: np.ndarray,
        rng: np.random.Generator,
    ) -> np.ndarray:
        """x_p: inside lesion_mask the image moves towards a smooth level `a` foreground stds
        from the foreground mean (|a| log-uniform in intensity_range, either sign), by a weight
        beta in [0.5, 1] that fades over a few pixels at the edge (partial volume); beta < 1
        keeps some of the anatomy, as oedema does."""
        lo, hi = np.log(self.intensity_range[0]), np.log(self.intensity_range[1])
        shift = float(np.exp(rng.uniform(lo, hi))) * (1.0 if rng.random() < 0.5 else -1.0)
        step = 2 if np.count_nonzero(foreground[::2, ::2]) >= 256 else 1
        values = image[::step, ::step][foreground[::step, ::step]]  # (N, C)
        if len(values) == 0:
            values = image.reshape(-1, image.shape[2])
        mean = values.mean(axis=0, dtype=np.float64).astype(np.float32)  # (C,)
        std = values.std(axis=0, dtype=np.float64).astype(np.float32)
        h, w = lesion_mask.shape
        level = 1.0 + 0.1 * _value_noise((h, w), int(rng.integers(2, 6)), rng)  # smooth, +-10 %
        target = mean + std * shift * level[..., None]  # (H, W, C)
        sigma = float(rng.uniform(0.5, 2.0)) * max(h, w) / 128.0
        soft = cv2.GaussianBlur(lesion_mask.astype(np.float32), (0, 0), sigma) * foreground
        weight = (float(rng.uniform(0.5, 1.0)) * soft)[..., None]
        return np.clip(image + weight * (target - image), 0.0, 1.0).astype(np.float32)

    def sample_beta(self, rng: np.random.Generator) -> float:
        """Blend weight beta ~ N(beta_mean, beta_std), clipped to beta_range."""
        return float(np.clip(rng.normal(self.beta_mean, self.beta_std), *self.beta_range))

    def lesion_mask(self, foreground: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """(H, W) bool inside `foreground` with >= 1 grid cell of area fraction >= min_fraction."""
        cell_ok = grid_fraction(foreground, self.feature_stride) >= self.min_fraction
        if not cell_ok.any():
            raise DataError(
                f"foreground of shape {foreground.shape} ({int(foreground.sum())} pixels) has no "
                f"{self.feature_stride}x{self.feature_stride} cell covered to >= "
                f"{self.min_fraction}: cannot place a synthetic lesion inside it"
            )
        for _ in range(self.max_tries):
            mask = self._perlin_mask(foreground.shape, rng) & foreground
            if (grid_fraction(mask, self.feature_stride) >= self.min_fraction).any():
                return mask
        return self._ellipse_mask(foreground, cell_ok, rng)

    def _perlin_mask(self, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        lo, hi = self.perlin_scale_range
        maps = []
        for _ in range(2):
            res = (2 ** int(rng.integers(lo, hi)), 2 ** int(rng.integers(lo, hi)))
            above = (perlin_noise(shape, res, rng) > self.threshold).astype(np.uint8) * 255
            maps.append(_rotate(above, rng.uniform(-90.0, 90.0)) > 127)
        # union or intersection of the two thresholded maps (GLASS-style shape variety)
        return maps[0] | maps[1] if rng.random() < 0.5 else maps[0] & maps[1]

    def _ellipse_mask(
        self, foreground: np.ndarray, cell_ok: np.ndarray, rng: np.random.Generator
    ) -> np.ndarray:
        # Fallback: an ellipse covering one whole grid cell whose foreground fraction is enough,
        # so that cell keeps fraction >= min_fraction after the foreground restriction.
        s = self.feature_stride
        cells = np.argwhere(cell_ok)
        cy, cx = cells[int(rng.integers(len(cells)))]
        centre = (int(cx * s + s // 2), int(cy * s + s // 2))
        # semi-axes >= 0.75 s put the cell's corners inside: 2 * (0.5 / 0.75)^2 < 1
        axes = (int(np.ceil(rng.uniform(0.75, 2.5) * s)), int(np.ceil(rng.uniform(0.75, 2.5) * s)))
        canvas = np.zeros(foreground.shape, np.uint8)
        cv2.ellipse(canvas, centre, axes, rng.uniform(0.0, 180.0), 0.0, 360.0, 1, thickness=-1)
        canvas[cy * s : (cy + 1) * s, cx * s : (cx + 1) * s] = 1  # exact cover whatever rounding
        return canvas.astype(bool) & foreground

    def texture(self, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        """A raw grey texture (H, W) float32: from the texture folder, else procedural."""
        if self.texture_files is None:
            return procedural_texture(shape, rng)
        path = self.texture_files[int(rng.integers(len(self.texture_files)))]
        return _load_texture(path, shape, rng)

    @staticmethod
    def match_intensity(
        texture: np.ndarray,
        image: np.ndarray,
        foreground: np.ndarray,
        contrast: float = 1.0,
        shift: float = 0.0,
    ) -> np.ndarray:
        """Grey texture (h, w) -> (h, w, C) with the mean and std of each channel of `image`
        (H, W, C) inside `foreground` (H, W), then shifted by `shift` stds and its contrast scaled
        by `contrast`.

        The texture is standardised, then scaled per channel to the foreground statistics, so
        the lesion brings no brightness or colour shortcut and equal input channels give equal
        output channels.
        """
        std = float(texture.std())
        # a flat texture (std under a tenth of a grey level) stays flat rather than amplified noise
        z = (texture - texture.mean()) / std if std > 1e-4 else np.zeros_like(texture)
        # every 2nd pixel each way estimates the statistics well at a quarter of the cost
        step = 2 if np.count_nonzero(foreground[::2, ::2]) >= 256 else 1
        values = image[::step, ::step][foreground[::step, ::step]]  # (N, C)
        if len(values) == 0:
            values = image.reshape(-1, image.shape[2])
        mean = values.mean(axis=0, dtype=np.float64).astype(np.float32)  # (C,)
        scale = values.std(axis=0, dtype=np.float64).astype(np.float32)
        # mean + shift std's, std times contrast (1 and 0: exactly the foreground's statistics)
        out = mean + scale * (shift + contrast * z[..., None].astype(np.float32))  # (h, w, C)
        return np.clip(out, 0.0, 1.0, out=out)


def _rotate(image: np.ndarray, angle: float) -> np.ndarray:
    h, w = image.shape
    matrix = cv2.getRotationMatrix2D((w / 2.0, h / 2.0), angle, 1.0)
    return cv2.warpAffine(
        image, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT
    )


def _list_textures(root: Path) -> list[Path]:
    images = root / "images"
    if not images.is_dir():
        raise DataError(
            f"{root}: expected a DTD-style texture folder with images/<class>/*.jpg "
            f"({images} not found)"
        )
    files = sorted(
        p for p in images.glob("*/*") if p.is_file() and p.suffix.lower() in _TEXTURE_SUFFIXES
    )
    if not files:
        raise DataError(f"{images}: no texture images found (expected <class>/*.jpg or *.png)")
    return files


def _load_texture(path: Path, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    # grey, scaled to cover `shape`, random crop / flip / quarter turn: (H, W) float32 in [0, 1]
    h, w = shape
    try:
        with Image.open(path) as img:
            img.draft("L", (w, h))  # JPEG: decode at a reduced size when possible (fast)
            grey = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: expected a readable texture image ({err})") from err
    grey = np.rot90(grey, int(rng.integers(4)))
    if rng.random() < 0.5:
        grey = grey[:, ::-1]
    factor = max(h / grey.shape[0], w / grey.shape[1])
    if factor != 1.0:
        size = (max(w, round(grey.shape[1] * factor)), max(h, round(grey.shape[0] * factor)))
        interp = cv2.INTER_AREA if factor < 1.0 else cv2.INTER_LINEAR
        grey = cv2.resize(np.ascontiguousarray(grey), size, interpolation=interp)
    y0 = int(rng.integers(grey.shape[0] - h + 1))
    x0 = int(rng.integers(grey.shape[1] - w + 1))
    return np.ascontiguousarray(grey[y0 : y0 + h, x0 : x0 + w])
