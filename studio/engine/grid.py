"""A labelled image grid (one cell per adapter, same seed): pure PIL, no model code."""

from __future__ import annotations

import math
from typing import Sequence

LABEL_HEIGHT_FRACTION = 0.18
MIN_LABEL_HEIGHT = 12
MAX_LABEL_LINES = 4


def labelled_grid(images: Sequence, labels: Sequence[str], columns: int | None = None):
    """Images in rows of ``columns`` with each label written under its cell, whole: a label wider
    than its cell wraps onto more lines (at spaces, then at '-', '.', '_', then anywhere), and
    the label band grows to the longest one (up to ``MAX_LABEL_LINES``; only beyond that is it cut)."""
    from PIL import Image, ImageDraw

    if not images or len(images) != len(labels):
        raise ValueError(f"a grid needs one label per image, got {len(images)} images and {len(labels)} labels")
    width, height = images[0].size
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    line_height = max(MIN_LABEL_HEIGHT, int(height * LABEL_HEIGHT_FRACTION))
    font = _font(line_height)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [_wrap(measure, label, font, width - 4) for label in labels]
    label_height = line_height * max(len(lines) for lines in wrapped)
    grid = Image.new("RGB", (columns * width, rows * (height + label_height)), "white")
    draw = ImageDraw.Draw(grid)
    for index, (image, lines) in enumerate(zip(images, wrapped)):
        x, y = (index % columns) * width, (index // columns) * (height + label_height)
        grid.paste(image.convert("RGB"), (x, y))
        for number, line in enumerate(lines):
            draw.text((x + 2, y + height + 1 + number * line_height), line, fill="black", font=font)
    return grid


def _font(label_height: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=max(8, label_height - 3))
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def _wrap(draw, text: str, font, max_width: int) -> list[str]:
    """The label as lines that each fit the cell; the last allowed line ends in '...' only when
    the label needs more than ``MAX_LABEL_LINES``."""
    lines, rest = [], text
    while rest and len(lines) < MAX_LABEL_LINES:
        cut = _longest_fitting(draw, rest, font, max_width)
        lines.append(rest[:cut].rstrip())
        rest = rest[cut:].lstrip()
    if rest:
        lines[-1] = _shortened(draw, lines[-1], font, max_width)
    return lines or [""]


def _longest_fitting(draw, text: str, font, max_width: int) -> int:
    """How many leading characters of ``text`` to put on one line: the most that fit, ended at a
    space or after a '-', '.', '_' when there is one (always at least one character)."""
    fits = 1
    while fits < len(text) and draw.textlength(text[:fits + 1], font=font) <= max_width:
        fits += 1
    if fits == len(text):
        return fits
    breaks = [i + 1 for i, char in enumerate(text[:fits + 1]) if char in " -._"]
    return breaks[-1] if breaks and breaks[-1] <= fits and breaks[-1] > fits // 3 else fits


def _shortened(draw, text: str, font, max_width: int) -> str:
    """A line shortened with '...' until it fits."""
    while text and draw.textlength(text + "...", font=font) > max_width:
        text = text[:-1]
    return text + "..."
