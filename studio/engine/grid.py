"""A labelled image grid (one cell per adapter, same seed): pure PIL, no model code."""

from __future__ import annotations

import math
from typing import Sequence

LABEL_HEIGHT_FRACTION = 0.18
MIN_LABEL_HEIGHT = 12


def labelled_grid(images: Sequence, labels: Sequence[str], columns: int | None = None):
    """Images in rows of ``columns`` with each label written under its cell."""
    from PIL import Image, ImageDraw

    if not images or len(images) != len(labels):
        raise ValueError(f"a grid needs one label per image, got {len(images)} images and {len(labels)} labels")
    width, height = images[0].size
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    label_height = max(MIN_LABEL_HEIGHT, int(height * LABEL_HEIGHT_FRACTION))
    grid = Image.new("RGB", (columns * width, rows * (height + label_height)), "white")
    draw = ImageDraw.Draw(grid)
    font = _font(label_height)
    for index, (image, label) in enumerate(zip(images, labels)):
        x, y = (index % columns) * width, (index // columns) * (height + label_height)
        grid.paste(image.convert("RGB"), (x, y))
        draw.text((x + 2, y + height + 1), _fit(draw, label, font, width - 4), fill="black", font=font)
    return grid


def _font(label_height: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=max(8, label_height - 3))
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def _fit(draw, text: str, font, max_width: int) -> str:
    """The label, shortened with '...' until it fits the cell."""
    if draw.textlength(text, font=font) <= max_width:
        return text
    while text and draw.textlength(text + "...", font=font) > max_width:
        text = text[:-1]
    return text + "..."
