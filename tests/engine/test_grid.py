"""Labelled grids keep their labels whole: a long adapter name wraps under its cell."""

from __future__ import annotations

from PIL import Image, ImageDraw

from studio.engine.grid import MAX_LABEL_LINES, _font, _wrap, labelled_grid


def _cells(n: int, size: int = 64):
    return [Image.new("RGB", (size, size), (40 * i, 80, 120)) for i in range(n)]


def test_short_labels_take_one_line():
    grid = labelled_grid(_cells(3), ["none", "noir", "pop"])
    assert grid.size == (2 * 64, 2 * (64 + 12))  # 2 x 2 cells, one label line of 12 px


def test_a_long_name_wraps_whole_and_the_band_grows():
    name = "browser-run.lora-best-checkpoint"
    draw, font = ImageDraw.Draw(Image.new("RGB", (1, 1))), _font(12)
    lines = _wrap(draw, name, font, 60)
    assert len(lines) > 1 and "".join(lines) == name  # every character kept, in order
    assert all(draw.textlength(line, font=font) <= 60 for line in lines)
    grid = labelled_grid(_cells(2), ["none", name], columns=2)
    assert grid.size == (128, 64 + 12 * len(lines))


def test_only_a_label_beyond_the_line_cap_is_cut():
    draw, font = ImageDraw.Draw(Image.new("RGB", (1, 1))), _font(12)
    lines = _wrap(draw, "x" * 400, font, 60)
    assert len(lines) == MAX_LABEL_LINES and lines[-1].endswith("...")
