"""Axes for the TensorBoard heatmaps, drawn with numpy: tick labels (slot i down the
side, block j along the bottom), axis titles and a colour bar with its scale.

TensorBoard shows an image as it is, so a bare grid of colours says neither which pair a
cell is nor what a colour means. The frame is drawn here rather than with matplotlib:
sinks run on the training thread at every probe, where a figure costs tens of
milliseconds and a few cheap numpy copies do not, and the monitor needs no plotting
extra. Text uses a 3 x 5 pixel font, scaled up.
"""

from __future__ import annotations

import math

import numpy as np

# Each glyph: 5 rows of 3 pixels, top to bottom.
_GLYPHS = {
    "0": ("111", "101", "101", "101", "111"),
    "1": ("010", "110", "010", "010", "111"),
    "2": ("111", "001", "111", "100", "111"),
    "3": ("111", "001", "111", "001", "111"),
    "4": ("101", "101", "111", "001", "001"),
    "5": ("111", "100", "111", "001", "111"),
    "6": ("111", "100", "111", "101", "111"),
    "7": ("111", "001", "001", "001", "001"),
    "8": ("111", "101", "111", "101", "111"),
    "9": ("111", "101", "111", "001", "111"),
    ".": ("000", "000", "000", "000", "010"),
    "-": ("000", "000", "111", "000", "000"),
    "+": ("000", "010", "111", "010", "000"),
    "e": ("000", "111", "111", "100", "111"),
    "s": ("000", "011", "110", "011", "110"),
    "l": ("010", "010", "010", "010", "010"),
    "o": ("000", "111", "101", "101", "111"),
    "t": ("010", "111", "010", "010", "011"),
    "i": ("010", "000", "010", "010", "010"),
    "b": ("100", "100", "111", "101", "111"),
    "c": ("000", "111", "100", "100", "111"),
    "k": ("100", "101", "110", "101", "101"),
    "j": ("001", "000", "001", "101", "111"),
    " ": ("000", "000", "000", "000", "000"),
}
SCALE = 2  # screen pixels per font pixel
GLYPH_W, GLYPH_H, GAP = 3 * SCALE, 5 * SCALE, SCALE
INK = np.array([20, 20, 20], dtype=np.uint8)
PAPER = np.array([255, 255, 255], dtype=np.uint8)
BAR_WIDTH = 12


def text_mask(text: str) -> np.ndarray:
    """A boolean ``h x w`` mask of `text` (unknown characters are left blank)."""
    if not text:
        return np.zeros((GLYPH_H, 0), dtype=bool)
    columns = []
    for k, ch in enumerate(text):
        glyph = np.array([[c == "1" for c in row] for row in _GLYPHS.get(ch, _GLYPHS[" "])])
        columns.append(np.kron(glyph, np.ones((SCALE, SCALE), dtype=bool)))
        if k < len(text) - 1:
            columns.append(np.zeros((GLYPH_H, GAP), dtype=bool))
    return np.concatenate(columns, axis=1)


def number(value: float) -> str:
    """A short label: 3 significant digits (``0.0123``, ``1.5e-05``)."""
    if value == 0:
        return "0"
    return f"{value:.3g}".replace("e-0", "e-").replace("e+0", "e+")


def _stamp(canvas: np.ndarray, mask: np.ndarray, top: int, left: int) -> None:
    h, w = mask.shape
    canvas[top : top + h, left : left + w][mask] = INK


def tick_every(n: int, cell: int, label_px: int) -> int:
    """Label every k-th slot so that labels `label_px` wide do not touch."""
    return max(1, math.ceil((label_px + 2 * SCALE) / cell))


def framed(
    cells: np.ndarray,
    n: int,
    bar: np.ndarray,
    bar_labels: list[tuple[float, str]],
    row_title: str = "slot i",
    column_title: str = "block j",
) -> np.ndarray:
    """`cells` (an ``n*cell`` square heatmap image, row i = slot i) with its axes: slot
    numbers down the left and along the bottom, axis titles, and on the right the colour
    bar `bar` (its colours from top to bottom, ``m x 3``) with `bar_labels`
    (``(position from the top in [0, 1], text)``)."""
    size = cells.shape[0]
    cell = size // max(1, n)
    widest = max(text_mask(str(n - 1)).shape[1], 1)
    every = tick_every(n, cell, max(widest, GLYPH_H))
    bar_text = max((text_mask(t).shape[1] for _, t in bar_labels), default=0)
    tick = 3
    left = GLYPH_H + 3 * SCALE + widest + tick + SCALE  # rotated title, labels, ticks
    top = GLYPH_H // 2 + SCALE
    bottom = tick + SCALE + GLYPH_H + 2 * SCALE + GLYPH_H + SCALE
    right = 4 * SCALE + BAR_WIDTH + tick + SCALE + bar_text + 2 * SCALE
    canvas = np.empty((top + size + bottom, left + size + right, 3), dtype=np.uint8)
    canvas[:] = PAPER
    canvas[top : top + size, left : left + size] = cells
    for s in range(0, n, every):
        centre = s * cell + cell // 2
        label = text_mask(str(s))
        # rows: slot i, labels right-aligned against the ticks
        canvas[top + centre, left - tick : left] = INK
        _stamp(canvas, label, top + centre - GLYPH_H // 2, left - tick - SCALE - label.shape[1])
        # columns: block j, labels centred under the ticks
        canvas[top + size : top + size + tick, left + centre] = INK
        _stamp(canvas, label, top + size + tick + SCALE, left + centre - label.shape[1] // 2)
    title = text_mask(column_title)
    _stamp(
        canvas, title, top + size + tick + 3 * SCALE + GLYPH_H, left + (size - title.shape[1]) // 2
    )
    title = np.rot90(text_mask(row_title))  # read bottom to top
    _stamp(canvas, title, top + (size - title.shape[0]) // 2, SCALE)
    # the colour bar, stretched to the heatmap's height
    x0 = left + size + 4 * SCALE
    rows = np.linspace(0, len(bar) - 1, size).round().astype(int)
    canvas[top : top + size, x0 : x0 + BAR_WIDTH] = bar[rows][:, None, :]
    for fraction, text in bar_labels:
        y = top + min(size - 1, round(fraction * (size - 1)))
        canvas[y, x0 + BAR_WIDTH : x0 + BAR_WIDTH + tick] = INK
        mask = text_mask(text)
        y0 = min(max(y - GLYPH_H // 2, 0), canvas.shape[0] - GLYPH_H)
        _stamp(canvas, mask, y0, x0 + BAR_WIDTH + tick + SCALE)
    return canvas
