"""A pixel checker for world images: which colour is the object, and which shape is it?

Because the world is procedural, a generated image can be judged without any model:
- every pixel is classified to the nearest palette colour (too far from all: 'other');
- pixels of the requested background colour are the background; the dominant palette colour
  among the remaining pixels is the object's colour;
- the object's mask (its colour's largest connected blob) is compared with each shape's
  template, rendered by the world's own shape function and fitted to the mask's bounding box;
  the template with the highest overlap (IoU) names the shape. The fill ratio (mask area over
  bounding box area) and left-right / top-bottom symmetry are reported alongside.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from studio.world.scene import COLOURS, SHAPES, shape_mask

PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)
NAMES = list(COLOURS)
MAX_DISTANCE = 80.0  # RGB distance beyond which a pixel belongs to no palette colour
TEMPLATE = 64  # side of the template masks


@dataclass
class Verdict:
    """What the checker saw, and whether it matches the request."""

    colour: str | None
    shape: str | None
    colour_ok: bool
    shape_ok: bool
    fill_ratio: float
    symmetry_lr: float
    symmetry_tb: float
    shape_scores: dict[str, float]


def classify_pixels(image: np.ndarray, palette: np.ndarray = PALETTE) -> np.ndarray:
    """(H, W) palette indices of an (H, W, 3) uint8 image; -1 where no colour is near.

    ``palette`` (C, 3) defaults to the world's colours; a style's judge passes the colours as
    that style shows them (``quality.StyledJudge``)."""
    pixels = image.reshape(-1, 3).astype(np.float32)
    dist = np.linalg.norm(pixels[:, None, :] - palette[None], axis=2)
    labels = dist.argmin(1)
    labels[dist.min(1) > MAX_DISTANCE] = -1
    return labels.reshape(image.shape[:2])


def _templates() -> dict[str, np.ndarray]:
    grid = (torch.arange(TEMPLATE * 2, dtype=torch.float32) + 0.5) / (TEMPLATE * 2) * 2.4 - 1.2
    v, u = grid[:, None].expand(-1, grid.numel()), grid[None, :].expand(grid.numel(), -1)
    out = {}
    for shape in SHAPES:
        mask = shape_mask(shape, u, v).numpy()
        rows, cols = np.where(mask)
        out[shape] = mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    return out


_TEMPLATES: dict[str, np.ndarray] | None = None


def _fit(template: np.ndarray, height: int, width: int) -> np.ndarray:
    t = torch.from_numpy(template.astype(np.float32))[None, None]
    return F.interpolate(t, size=(height, width), mode="area")[0, 0].numpy() >= 0.5


def shape_scores(mask: np.ndarray) -> dict[str, float]:
    """IoU of the mask's bounding-box crop with each shape's template fitted to that box."""
    global _TEMPLATES
    if _TEMPLATES is None:
        _TEMPLATES = _templates()
    rows, cols = np.where(mask)
    crop = mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    scores = {}
    for shape, template in _TEMPLATES.items():
        fitted = _fit(template, *crop.shape)
        union = np.logical_or(fitted, crop).sum()
        scores[shape] = float(np.logical_and(fitted, crop).sum() / max(union, 1))
    return scores


def _largest_blob(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = ndimage.sum(mask, labels, index=range(1, count + 1))
    return labels == (int(np.argmax(sizes)) + 1)


def _symmetry(crop: np.ndarray, axis: int) -> float:
    flipped = np.flip(crop, axis=axis)
    return float(np.logical_and(crop, flipped).sum() / max(np.logical_or(crop, flipped).sum(), 1))


def judge(image, colour: str, shape: str, background: str, min_pixels: int = 12,
          palette: np.ndarray = PALETTE, background_labels: tuple[int, ...] | None = None) -> Verdict:
    """Judge one image (PIL image, (H, W, 3) uint8 array or (3, H, W) tensor) against a request.

    ``background_labels`` are the palette indices that count as background (default: the
    requested background colour alone; a style that paints stripes or dots on the background
    adds their colours)."""
    array = _as_array(image)
    labels = classify_pixels(array, palette)
    ignored = background_labels if background_labels is not None else (NAMES.index(background),)
    foreground = ~np.isin(labels, ignored) & (labels >= 0)
    counts = np.bincount(labels[foreground], minlength=len(NAMES)) if foreground.any() else np.zeros(len(NAMES), int)
    if counts.max() < min_pixels:
        return Verdict(None, None, False, False, 0.0, 0.0, 0.0, {})
    found = NAMES[int(counts.argmax())]
    mask = _largest_blob(labels == NAMES.index(found))
    scores = shape_scores(mask)
    rows, cols = np.where(mask)
    crop = mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    best = max(scores, key=scores.get)
    return Verdict(
        colour=found, shape=best, colour_ok=found == colour, shape_ok=best == shape,
        fill_ratio=float(crop.mean()), symmetry_lr=_symmetry(crop, 1), symmetry_tb=_symmetry(crop, 0),
        shape_scores=scores,
    )


def _as_array(image) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        if image.dim() == 3 and image.shape[0] == 3:
            image = image.permute(1, 2, 0)
        return image.numpy().astype(np.uint8)
    array = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an RGB image, got an array of shape {array.shape}")
    return array.astype(np.uint8)
