"""The image-transform steps that styles are made of, by name.

Each step is a function of a float batch (N, 3, H, W) in [0, 1] plus keyword parameters, and
returns a batch of the same shape. Styles (``styles.py``) name steps and their parameters in
TOML; this module is the only code a style ever runs. Random steps draw from the generator they
are given, so a style applied with the same seed gives the same pixels.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from studio.world.scene import COLOURS

Step = Callable[..., Tensor]
STEPS: dict[str, Step] = {}


def step(fn: Step) -> Step:
    """Register a transform under its function name."""
    STEPS[fn.__name__] = fn
    return fn


def colour_of(value: str | list[float]) -> Tensor:
    """A colour parameter (a palette name or [r, g, b] in 0..255) as a (3, 1, 1) tensor in [0, 1]."""
    if isinstance(value, str):
        if value not in COLOURS:
            raise ValueError(f"unknown colour {value!r}; use one of {', '.join(COLOURS)} or [r, g, b]")
        value = list(COLOURS[value])
    if len(value) != 3:
        raise ValueError(f"a colour needs 3 numbers, got {value!r}")
    return torch.tensor([float(c) / 255.0 for c in value]).view(3, 1, 1)


def background_mask(images: Tensor, tolerance: float = 0.12) -> Tensor:
    """(N, 1, H, W) mask of pixels close to each image's corner colour (the background)."""
    corner = images[:, :, :1, :1]
    return ((images - corner).abs().amax(dim=1, keepdim=True) < tolerance).float()


def _region(images: Tensor, where: str) -> Tensor:
    if where == "all":
        return torch.ones_like(images[:, :1])
    bg = background_mask(images)
    if where == "background":
        return bg
    if where == "object":
        return 1 - bg
    raise ValueError(f"where must be 'all', 'background' or 'object', not {where!r}")


def _grid(images: Tensor) -> tuple[Tensor, Tensor]:
    h, w = images.shape[-2:]
    ys = torch.arange(h, dtype=images.dtype, device=images.device).view(h, 1)
    xs = torch.arange(w, dtype=images.dtype, device=images.device).view(1, w)
    return ys, xs


@step
def grayscale(images: Tensor, gen: torch.Generator) -> Tensor:
    lum = (images * torch.tensor([0.299, 0.587, 0.114], device=images.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
    return lum.expand_as(images).clone()


@step
def invert(images: Tensor, gen: torch.Generator) -> Tensor:
    return 1 - images


@step
def posterize(images: Tensor, gen: torch.Generator, levels: int = 3) -> Tensor:
    return (images * (levels - 1)).round() / (levels - 1)


@step
def solarize(images: Tensor, gen: torch.Generator, threshold: float = 0.5) -> Tensor:
    return torch.where(images > threshold, 1 - images, images)


@step
def channel_swap(images: Tensor, gen: torch.Generator, order: str = "brg") -> Tensor:
    if sorted(order) != ["b", "g", "r"]:
        raise ValueError(f"order must be a permutation of 'rgb', not {order!r}")
    return images[:, ["rgb".index(c) for c in order]]


@step
def hue_rotate(images: Tensor, gen: torch.Generator, degrees: float = 120.0) -> Tensor:
    """Rotate colours about the gray axis (grays stay gray)."""
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    k = (1 - c) / 3
    r = math.sqrt(1 / 3) * s
    m = torch.tensor([[c + k, k - r, k + r], [k + r, c + k, k - r], [k - r, k + r, c + k]], device=images.device)
    return torch.einsum("ij,njhw->nihw", m, images).clamp(0, 1)


@step
def palette_swap(images: Tensor, gen: torch.Generator, mapping: dict | None = None, tolerance: float = 0.25) -> Tensor:
    """Replace palette colours by others ({"red" = "blue", ...}), keeping anti-aliased edges."""
    out = images.clone()
    for src, dst in (mapping or {}).items():
        s, d = colour_of(src).to(images.device), colour_of(dst).to(images.device)
        near = ((images - s).abs().amax(dim=1, keepdim=True) < tolerance).float()
        out = out * (1 - near) + (images - s + d).clamp(0, 1) * near
    return out


@step
def tint(images: Tensor, gen: torch.Generator, colour: str | list = "orange", amount: float = 0.5) -> Tensor:
    return images * (1 - amount) + colour_of(colour).to(images.device) * amount


@step
def duotone(images: Tensor, gen: torch.Generator, dark: str | list = "blue", light: str | list = "yellow") -> Tensor:
    lum = grayscale(images, gen)[:, :1]
    return colour_of(dark).to(images.device) * (1 - lum) + colour_of(light).to(images.device) * lum


@step
def contrast(images: Tensor, gen: torch.Generator, factor: float = 1.5, brightness: float = 0.0) -> Tensor:
    return ((images - 0.5) * factor + 0.5 + brightness).clamp(0, 1)


@step
def outline(images: Tensor, gen: torch.Generator, colour: str | list = "black", width: int = 1, fill: str = "keep") -> Tensor:
    """Draw edges (where neighbouring pixels differ) in ``colour``; fill 'keep' or a colour name."""
    pad = F.pad(images, (1, 1, 1, 1), mode="replicate")
    diff = (pad[..., 1:-1, 2:] - pad[..., 1:-1, :-2]).abs().amax(1, keepdim=True) + (pad[..., 2:, 1:-1] - pad[..., :-2, 1:-1]).abs().amax(1, keepdim=True)
    edge = (diff > 0.2).float()
    if width > 1:
        edge = F.max_pool2d(edge, 2 * width - 1, stride=1, padding=width - 1)
    base = images if fill == "keep" else colour_of(fill).to(images.device).expand_as(images)
    return base * (1 - edge) + colour_of(colour).to(images.device) * edge


@step
def stripes(images: Tensor, gen: torch.Generator, period: int = 8, width: int = 3, direction: str = "horizontal", colour: str | list = "white", amount: float = 1.0, where: str = "all") -> Tensor:
    ys, xs = _grid(images)
    coord = {"horizontal": ys + 0 * xs, "vertical": xs + 0 * ys, "diagonal": xs + ys, "antidiagonal": xs - ys + 1000}.get(direction)
    if coord is None:
        raise ValueError(f"direction must be horizontal, vertical, diagonal or antidiagonal, not {direction!r}")
    band = (torch.remainder(coord, period) < width).float().view(1, 1, *coord.shape) * amount * _region(images, where)
    return images * (1 - band) + colour_of(colour).to(images.device) * band


@step
def dots(images: Tensor, gen: torch.Generator, period: int = 8, radius: float = 2.0, colour: str | list = "white", where: str = "all") -> Tensor:
    ys, xs = _grid(images)
    dy, dx = torch.remainder(ys, period) - period / 2 + 0.5, torch.remainder(xs, period) - period / 2 + 0.5
    inside = (dy * dy + dx * dx) <= radius * radius
    dot = inside.float().view(1, 1, *inside.shape) * _region(images, where)
    return images * (1 - dot) + colour_of(colour).to(images.device) * dot


@step
def checker(images: Tensor, gen: torch.Generator, period: int = 8, colour: str | list = "black", amount: float = 0.5, where: str = "background") -> Tensor:
    ys, xs = _grid(images)
    cell = (torch.remainder(torch.div(ys, period, rounding_mode="floor") + torch.div(xs, period, rounding_mode="floor"), 2) == 0)
    mask = cell.float().view(1, 1, *cell.shape) * amount * _region(images, where)
    return images * (1 - mask) + colour_of(colour).to(images.device) * mask


@step
def scanlines(images: Tensor, gen: torch.Generator, period: int = 2, darkness: float = 0.5) -> Tensor:
    ys, _ = _grid(images)
    dark = (torch.remainder(ys, period) == 0).float().view(1, 1, -1, 1) * darkness
    return images * (1 - dark)


@step
def pixelate(images: Tensor, gen: torch.Generator, block: int = 8) -> Tensor:
    small = F.avg_pool2d(images, block)
    return F.interpolate(small, scale_factor=block, mode="nearest")


@step
def blur(images: Tensor, gen: torch.Generator, sigma: float = 1.5) -> Tensor:
    radius = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    k = torch.exp(-x * x / (2 * sigma * sigma))
    k = (k / k.sum()).view(1, 1, 1, -1).repeat(3, 1, 1, 1)
    out = F.conv2d(F.pad(images, (radius, radius, 0, 0), mode="replicate"), k, groups=3)
    return F.conv2d(F.pad(out, (0, 0, radius, radius), mode="replicate"), k.transpose(2, 3), groups=3)


@step
def noise(images: Tensor, gen: torch.Generator, amount: float = 0.15, monochrome: bool = False) -> Tensor:
    shape = (images.shape[0], 1 if monochrome else 3, *images.shape[2:])
    grain = torch.randn(shape, generator=gen, device=gen.device).to(images.device) * amount
    return (images + grain).clamp(0, 1)


@step
def frame(images: Tensor, gen: torch.Generator, width: int = 4, colour: str | list = "black") -> Tensor:
    ys, xs = _grid(images)
    h, w = images.shape[-2:]
    border = ((ys < width) | (ys >= h - width) | (xs < width) | (xs >= w - width)).float().view(1, 1, h, w)
    return images * (1 - border) + colour_of(colour).to(images.device) * border


@step
def vignette(images: Tensor, gen: torch.Generator, strength: float = 0.8) -> Tensor:
    ys, xs = _grid(images)
    h, w = images.shape[-2:]
    r2 = ((ys - h / 2 + 0.5) / (h / 2)) ** 2 + ((xs - w / 2 + 0.5) / (w / 2)) ** 2
    return images * (1 - strength * (r2 / 2).clamp(0, 1)).view(1, 1, h, w)


@step
def gradient(images: Tensor, gen: torch.Generator, top: str | list = "white", bottom: str | list = "black", amount: float = 0.5) -> Tensor:
    ys, _ = _grid(images)
    t = (ys / (images.shape[-2] - 1)).view(1, 1, -1, 1)
    overlay = colour_of(top).to(images.device) * (1 - t) + colour_of(bottom).to(images.device) * t
    return images * (1 - amount) + overlay * amount


@step
def mirror(images: Tensor, gen: torch.Generator, axis: str = "horizontal") -> Tensor:
    """Flip left-right ('horizontal') or top-bottom ('vertical')."""
    if axis not in ("horizontal", "vertical"):
        raise ValueError(f"axis must be horizontal or vertical, not {axis!r}")
    return images.flip(-1 if axis == "horizontal" else -2)


@step
def symmetric(images: Tensor, gen: torch.Generator, axis: str = "horizontal") -> Tensor:
    """Mirror one half onto the other (kaleidoscope-like symmetry)."""
    w = images.shape[-1] if axis == "horizontal" else images.shape[-2]
    half = w // 2
    if axis == "horizontal":
        return torch.cat([images[..., :half], images[..., :half].flip(-1)], dim=-1)
    return torch.cat([images[..., :half, :], images[..., :half, :].flip(-2)], dim=-2)


@step
def rotate(images: Tensor, gen: torch.Generator, quarter_turns: int = 1) -> Tensor:
    return torch.rot90(images, quarter_turns, dims=(-2, -1))


@step
def tile(images: Tensor, gen: torch.Generator, count: int = 2) -> Tensor:
    """Shrink each image and repeat it ``count`` x ``count`` times."""
    h, w = images.shape[-2:]
    small = F.interpolate(images, size=(h // count, w // count), mode="area")
    return small.repeat(1, 1, count, count)


@step
def shift(images: Tensor, gen: torch.Generator, dx: int = 16, dy: int = 0) -> Tensor:
    return torch.roll(images, shifts=(dy, dx), dims=(-2, -1))


@step
def emboss(images: Tensor, gen: torch.Generator, strength: float = 1.0) -> Tensor:
    gray = grayscale(images, gen)[:, :1]
    k = torch.tensor([[-2.0, -1.0, 0.0], [-1.0, 1.0, 1.0], [0.0, 1.0, 2.0]], device=images.device).view(1, 1, 3, 3)
    out = F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="replicate"), k) * strength
    return (out * 0.5 + 0.5 * gray).clamp(0, 1).expand_as(images).clone()
