"""Drawing of test panels: one item's input, gt_mask, anomaly_map and pred_mask; the overview.

A panel (`render_panel`) is a title strip over four square tiles of side T:

    title strip (TITLE_HEIGHT rows): two lines (what was chosen and why; subject, slice, score)
    tile 0: the input image
    tile 1: the image with the gt_mask outline (red)
    tile 2: the anomaly_map coloured over `value_range` (jet), blended over the image, gt_mask
            outline (red)
    tile 3: the image with pred_mask (anomaly_map >= tau) filled green, half transparent, and
            the gt_mask outline (red); without tau the image and the outline only

The arrays come at the evaluation size S; tiles are enlarged by an integer factor k = ceil(
min_tile / S) (nearest), so T = k * S and an outline stays one evaluation pixel wide. Tile i
starts at column i * (T + TILE_GAP): grey bars of TILE_GAP columns separate the tiles.
`overview_image` puts panels in columns under a header strip (one column per selection group).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from data_modules.visualize import OUTLINE_COLOR, draw_outline

__all__ = [
    "GT_COLOR",
    "MIN_TILE",
    "PRED_COLOR",
    "TILES",
    "TILE_GAP",
    "TITLE_HEIGHT",
    "colour_map",
    "overview_image",
    "render_panel",
    "text_strip",
]

GT_COLOR = OUTLINE_COLOR  # (255, 0, 0), as in the show-data grid
PRED_COLOR = (0, 255, 0)
TILES = 4  # tiles of a panel, in the order of the module docstring
TITLE_HEIGHT = 34  # rows of a panel's title strip (two lines of text)
MIN_TILE = 160  # smallest tile side of a panel, in pixels
TILE_GAP = 3  # grey columns between two tiles
LINE_HEIGHT = 15  # rows per line of text
FONT_SIZE = 12
_OVERLAY_ALPHA = 0.5
_COLORMAP = "jet"


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=FONT_SIZE)


def text_strip(
    lines: Sequence[str],
    width: int,
    height: int | None = None,
    fill: tuple[int, int, int] = (255, 255, 255),
) -> np.ndarray:
    """(height, width, 3) uint8: `lines` in `fill` (white) on black, LINE_HEIGHT rows each."""
    height = height if height is not None else 4 + LINE_HEIGHT * len(lines)
    strip = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(strip)
    font = _font()
    for i, line in enumerate(lines):
        draw.text((4, 2 + LINE_HEIGHT * i), line, fill=fill, font=font)
    return np.asarray(strip)


def colour_map(anomaly_map: np.ndarray, value_range: tuple[float, float]) -> np.ndarray:
    """(H, W) float -> (H, W, 3) float 0-255: jet over `value_range` (clipped)."""
    lo, hi = value_range
    scaled = (
        np.clip((anomaly_map - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(anomaly_map)
    )
    return matplotlib.colormaps[_COLORMAP](scaled)[..., :3] * 255.0


def _blend(
    image_rgb: np.ndarray, colours: np.ndarray, where: np.ndarray | None = None
) -> np.ndarray:
    """`image_rgb` (uint8) blended half-and-half with `colours` (float 0-255), where `where` is set
    (everywhere when None)."""
    mixed = (1.0 - _OVERLAY_ALPHA) * image_rgb + _OVERLAY_ALPHA * colours
    if where is not None:
        mixed = np.where(where[..., None], mixed, image_rgb)
    return (mixed + 0.5).astype(np.uint8)


def render_panel(
    image_rgb: np.ndarray,
    anomaly_map: np.ndarray,
    gt_mask: np.ndarray,
    pred_mask: np.ndarray | None,
    title: Sequence[str],
    value_range: tuple[float, float],
    min_tile: int = MIN_TILE,
) -> np.ndarray:
    """The panel of the module docstring as uint8 (TITLE_HEIGHT + T, TILES * (T + TILE_GAP) -
    TILE_GAP, 3).

    image_rgb (S, S, 3) uint8; anomaly_map (S, S) float; gt_mask / pred_mask (S, S) bool
    (pred_mask None: tau unknown); `title`: up to two lines.
    """
    heat = _blend(image_rgb, colour_map(anomaly_map, value_range))
    if pred_mask is None:
        pred = image_rgb
    else:
        pred = _blend(
            image_rgb, np.broadcast_to(np.asarray(PRED_COLOR, float), heat.shape), pred_mask
        )
    tiles = [
        image_rgb,
        draw_outline(image_rgb, gt_mask, GT_COLOR),
        draw_outline(heat, gt_mask, GT_COLOR),
        draw_outline(pred, gt_mask, GT_COLOR),
    ]
    k = max(1, math.ceil(min_tile / image_rgb.shape[0]))
    side = k * image_rgb.shape[0]
    gap = np.full((side, TILE_GAP, 3), 96, np.uint8)
    parts = []
    for i, tile in enumerate(tiles):
        parts += [gap] if i else []
        parts.append(tile.repeat(k, axis=0).repeat(k, axis=1))  # (T, T, 3)
    row = np.concatenate(parts, axis=1)
    return np.concatenate([text_strip(title[:2], row.shape[1], TITLE_HEIGHT), row], axis=0)


def overview_image(
    columns: Sequence[tuple[str, Sequence[np.ndarray]]], header: Sequence[str], gap: int = 6
) -> np.ndarray:
    """Panels in columns, each under its title, all under `header` lines; uint8 (H, W, 3).

    `columns`: (title, panels) pairs; panels of one overview share their width. A column without
    panels says so.
    """
    widths = [p.shape[1] for _, panels in columns for p in panels]
    width = max(widths) if widths else 400
    stacks = []
    for title, panels in columns:
        parts = [text_strip([title], width)]
        if not panels:
            parts.append(text_strip(["(no such test item)"], width))
        for p in panels:
            parts += [np.zeros((gap, width, 3), np.uint8), p]
        stacks.append(np.concatenate(parts, axis=0))
    height = max(s.shape[0] for s in stacks)
    padded = []
    for i, s in enumerate(stacks):
        s = np.concatenate([s, np.zeros((height - s.shape[0], width, 3), np.uint8)], axis=0)
        padded.append(
            s if i == 0 else np.concatenate([np.full((height, gap, 3), 64, np.uint8), s], 1)
        )
    body = np.concatenate(padded, axis=1)
    return np.concatenate([text_strip(header, body.shape[1]), body], axis=0)
