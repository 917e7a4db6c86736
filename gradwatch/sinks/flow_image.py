"""Render per-layer gradient norms over steps as a heat map image.

Rows are parameters in model order, columns are steps, and the colour is
log10 of the gradient norm. Drawing uses Pillow, which tensorboard already
depends on, so gradwatch needs no plotting library.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["render_flow"]

#: Colour stops from low to high (dark violet, blue, teal, green, yellow).
_STOPS = np.array(
    [[48, 18, 80], [58, 82, 139], [32, 144, 140], [94, 201, 98], [250, 230, 40]],
    dtype=np.float64,
)
_MISSING = (120, 120, 120)
_NONFINITE = (230, 25, 25)
_BACKGROUND = (255, 255, 255)
_INK = (20, 20, 20)

_TARGET_WIDTH = 720
_TARGET_HEIGHT = 420
_TEXT_HEIGHT = 12
_LABEL_CHARS = 32
_TITLE = "gradient norm per parameter, log10 colour scale, rows in model order"


def render_flow(
    names: Sequence[str], steps: Sequence[int], norms: Sequence[Sequence[float | None]]
) -> np.ndarray:
    """Return the heat map as an ``HxWx3`` uint8 array.

    Args:
        names: Row labels, top to bottom (parameter qualified names).
        steps: The step of each column, left to right.
        norms: ``norms[row][column]``: a gradient norm, None where the parameter
            had no gradient at that step; NaN and Inf are drawn in red.
    """
    shape = (len(names), len(steps))
    missing = np.array([[v is None for v in row] for row in norms], dtype=bool)
    values = np.array(
        [[0.0 if v is None else v for v in row] for row in norms], dtype=np.float64
    )
    missing, values = missing.reshape(shape), values.reshape(shape)
    low, high = _log_range(values[~missing])
    cell_w = max(1, min(24, _TARGET_WIDTH // max(len(steps), 1)))
    cell_h = max(1, min(18, _TARGET_HEIGHT // max(len(names), 1)))
    cells = _colour(values, missing, low, high)
    cells = cells.repeat(cell_h, axis=0).repeat(cell_w, axis=1)

    font = ImageFont.load_default()
    label_w = 6 * min(_LABEL_CHARS, max((len(n) for n in names), default=1)) + 8
    top, left = 2 * _TEXT_HEIGHT + 6, label_w
    width = max(left + cells.shape[1] + 70, len(_TITLE) * 6 + 10)
    height = top + cells.shape[0] + 3 * _TEXT_HEIGHT + 8
    image = Image.new("RGB", (width, height), _BACKGROUND)
    image.paste(Image.fromarray(cells, "RGB"), (left, top))
    draw = ImageDraw.Draw(image)

    draw.text((4, 2), _TITLE, fill=_INK, font=font)
    _draw_row_labels(draw, font, names, top, left, cell_h)
    _draw_step_axis(draw, font, steps, left, top + cells.shape[0] + 2, cell_w)
    _draw_colour_bar(draw, left + cells.shape[1] + 10, top, cells.shape[0], low, high)
    _draw_bar_labels(
        draw, font, left + cells.shape[1] + 26, top, cells.shape[0], low, high
    )
    _draw_legend(draw, font, left, height - _TEXT_HEIGHT - 2)
    return np.asarray(image)


def _log_range(values: np.ndarray) -> tuple[int, int]:
    positive = values[np.isfinite(values) & (values > 0)]
    if positive.size == 0:
        return -1, 0
    low = math.floor(float(np.log10(positive.min())))
    high = math.ceil(float(np.log10(positive.max())))
    return low, max(high, low + 1)


def _colour(values: np.ndarray, missing: np.ndarray, low: int, high: int) -> np.ndarray:
    """Map norms to RGB on a log10 scale; grey where missing, red if not finite."""
    cells = np.empty((*values.shape, 3), dtype=np.uint8)
    cells[:] = _MISSING
    finite = np.isfinite(values) & ~missing
    cells[~np.isfinite(values)] = _NONFINITE
    positive = finite & (values > 0)
    position = np.zeros(values.shape)
    with np.errstate(divide="ignore"):
        position[positive] = (np.log10(values[positive]) - low) / (high - low)
    cells[positive] = _palette(position[positive])
    cells[finite & (values == 0)] = _palette(np.zeros(1))[0]
    return cells


def _palette(position: np.ndarray) -> np.ndarray:
    scaled = np.clip(position, 0.0, 1.0) * (len(_STOPS) - 1)
    index = np.minimum(scaled.astype(int), len(_STOPS) - 2)
    fraction = (scaled - index)[:, None]
    rgb = _STOPS[index] * (1 - fraction) + _STOPS[index + 1] * fraction
    return rgb.round().astype(np.uint8)


def _draw_row_labels(draw, font, names, top, left, cell_h) -> None:
    every = max(1, math.ceil(_TEXT_HEIGHT / cell_h))
    for row in range(0, len(names), every):
        label = names[row]
        if len(label) > _LABEL_CHARS:
            label = "..." + label[-(_LABEL_CHARS - 3) :]
        y = top + row * cell_h + (cell_h - _TEXT_HEIGHT) // 2 + 1
        x = left - 4 - int(draw.textlength(label, font=font))
        draw.text((x, y), label, fill=_INK, font=font)


def _draw_step_axis(draw, font, steps, left, y, cell_w) -> None:
    if not steps:
        return
    ticks = min(len(steps), 6)
    columns = sorted(
        {round(i * (len(steps) - 1) / max(ticks - 1, 1)) for i in range(ticks)}
    )
    for column in columns:
        x = left + column * cell_w + cell_w // 2
        draw.line([(x, y), (x, y + 3)], fill=_INK)
        draw.text((x - 3, y + 4), str(steps[column]), fill=_INK, font=font)
    draw.text((left, y + 4 + _TEXT_HEIGHT), "step", fill=_INK, font=font)


def _draw_colour_bar(draw, x, top, height, low, high) -> None:
    for offset in range(height):
        position = 1.0 - offset / max(height - 1, 1)
        rgb = tuple(int(c) for c in _palette(np.array([position]))[0])
        draw.line([(x, top + offset), (x + 12, top + offset)], fill=rgb)


def _draw_bar_labels(draw, font, x, top, height, low, high) -> None:
    draw.text((x, top), f"1e{high}", fill=_INK, font=font)
    draw.text((x, top + height - _TEXT_HEIGHT), f"1e{low}", fill=_INK, font=font)


def _draw_legend(draw, font, x, y) -> None:
    for colour, text in ((_MISSING, "no gradient"), (_NONFINITE, "NaN or Inf")):
        draw.rectangle([(x, y + 2), (x + 9, y + 10)], fill=colour)
        draw.text((x + 13, y), text, fill=_INK, font=font)
        x += 13 + int(draw.textlength(text, font=font)) + 16
