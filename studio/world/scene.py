"""The procedural world: one coloured shape on a coloured background, and its caption.

Scenes are sampled from a seed and rendered as a batch on a pixel grid (anti-aliased by 2x
super-sampling), so the whole data set is one uint8 tensor made in seconds. Every word a
caption can use is listed here, so the tokenizer can give each word exactly one token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (140, 50, 190),
    "pink": (245, 130, 190),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle", "star", "ring", "cross", "diamond")
SIZES: dict[str, float] = {"small": 9.0, "medium": 13.0, "large": 19.0}  # half-extent in pixels at 64x64
POSITIONS: dict[str, tuple[float, float]] = {  # (x, y) as a fraction of the image side
    "top left": (0.28, 0.28), "top": (0.5, 0.28), "top right": (0.72, 0.28),
    "left": (0.28, 0.5), "center": (0.5, 0.5), "right": (0.72, 0.5),
    "bottom left": (0.28, 0.72), "bottom": (0.5, 0.72), "bottom right": (0.72, 0.72),
}
GLUE_WORDS = ("a", "on", "background", "style", ",")


def world_words() -> list[str]:
    """Every word a caption of the plain world can contain (style triggers come on top)."""
    words = list(GLUE_WORDS) + list(COLOURS) + list(SHAPES) + list(SIZES)
    for position in POSITIONS:
        words += position.split()
    return list(dict.fromkeys(words))


@dataclass(frozen=True)
class Scene:
    """One image's content: what is drawn where, in the world's words."""

    colour: str
    shape: str
    size: str
    position: str
    background: str
    jitter: tuple[float, float] = (0.0, 0.0)

    def caption(self, size: bool = True, background: bool = True, position: bool = True) -> str:
        """'a small red circle on a blue background, top left', with optional parts left out."""
        text = f"a {self.size + ' ' if size else ''}{self.colour} {self.shape}"
        if background:
            text += f" on a {self.background} background"
        if position:
            text += f", {self.position}"
        return text


def sample_scenes(n: int, seed: int) -> list[Scene]:
    """``n`` scenes drawn uniformly (object colour differs from the background), from ``seed``."""
    rng = np.random.default_rng(seed)
    colours, positions = list(COLOURS), list(POSITIONS)
    scenes = []
    for _ in range(n):
        colour, background = rng.choice(len(colours), size=2, replace=False)
        scenes.append(Scene(
            colour=colours[colour], shape=SHAPES[rng.integers(len(SHAPES))],
            size=list(SIZES)[rng.integers(len(SIZES))], position=positions[rng.integers(len(positions))],
            background=colours[background], jitter=(float(rng.uniform(-2, 2)), float(rng.uniform(-2, 2))),
        ))
    return scenes


def captions_with_dropout(scenes: list[Scene], seed: int, p_size: float = 0.3, p_background: float = 0.15, p_position: float = 0.4) -> list[str]:
    """One caption per scene with parts left out at random, so short prompts are in-distribution."""
    rng = np.random.default_rng(seed)
    keep = rng.random((len(scenes), 3)) >= np.array([p_size, p_background, p_position])
    return [scene.caption(bool(k[0]), bool(k[1]), bool(k[2])) for scene, k in zip(scenes, keep)]


def shape_mask(shape: str, u: Tensor, v: Tensor) -> Tensor:
    """Boolean mask of ``shape`` in unit coordinates (u right, v down, extent about [-1, 1])."""
    au, av = u.abs(), v.abs()
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return torch.maximum(au, av) <= 0.85
    if shape == "diamond":
        return au + av <= 1.1
    if shape == "triangle":
        return (v <= 0.8) & (au <= (v + 1.0) / 1.8 * 1.0)
    if shape == "ring":
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= 0.36)
    if shape == "cross":
        return ((au <= 0.33) & (av <= 1.0)) | ((av <= 0.33) & (au <= 1.0))
    if shape == "star":
        angle = torch.atan2(u, -v)  # 0 pointing up
        period = 2 * math.pi / 5
        phase = torch.remainder(angle + period / 2, period) - period / 2  # distance to nearest point
        radius = 0.42 + 0.63 * (1 - phase.abs() / (period / 2)) ** 1.5
        return u * u + v * v <= radius * radius
    raise ValueError(f"unknown shape {shape!r}; the world knows {', '.join(SHAPES)}")


def render(scenes: list[Scene], size: int = 64, chunk: int = 2048) -> Tensor:
    """Render scenes as one uint8 tensor (N, 3, size, size); deterministic, CPU."""
    out = torch.empty(len(scenes), 3, size, size, dtype=torch.uint8)
    for start in range(0, len(scenes), chunk):
        out[start:start + chunk] = _render_chunk(scenes[start:start + chunk], size)
    return out


def _render_chunk(scenes: list[Scene], size: int) -> Tensor:
    sup = 2 * size
    grid = (torch.arange(sup, dtype=torch.float32) + 0.5) / 2  # pixel centres in output pixels
    ys, xs = grid[:, None], grid[None, :]
    scale = size / 64.0
    masks = torch.zeros(len(scenes), 1, sup, sup)
    for i, scene in enumerate(scenes):
        half = SIZES[scene.size] * scale
        fx, fy = POSITIONS[scene.position]
        cx = min(max(fx * size + scene.jitter[0] * scale, half + 1), size - half - 1)
        cy = min(max(fy * size + scene.jitter[1] * scale, half + 1), size - half - 1)
        masks[i, 0] = shape_mask(scene.shape, (xs - cx) / half, (ys - cy) / half).float()
    alpha = F.avg_pool2d(masks, 2)
    fg = torch.tensor([COLOURS[s.colour] for s in scenes], dtype=torch.float32)[:, :, None, None]
    bg = torch.tensor([COLOURS[s.background] for s in scenes], dtype=torch.float32)[:, :, None, None]
    return (alpha * fg + (1 - alpha) * bg).round().clamp(0, 255).to(torch.uint8)
