"""Judge an adapter of a world style by the images it makes, not by its loss.

Two measures, both from pixels of generated images (same prompts, same seeds for every adapter):

- **style**: how far the images moved from the base's own images toward the style. The target
  is the base's images with the style applied by the world's own transform (the ground truth of
  the style, in the generated images' own domain, so blur or artefacts common to all generated
  images do not count). Image statistics (a coarse colour histogram, directional gradient
  energy, a radial power spectrum, brightness and saturation) are averaged over the set; with
  ``b`` the base's mean, ``t`` the target's and ``g`` the adapter's:
  ``style = <g - b, t - b> / |t - b|^2`` (1 = moved by the whole style, 0 = not at all) and
  ``distance = |g - t| / |b - t|`` (how far from the target, 1 = as far as the base). Noise
  scores a large ``style`` too (it adds high frequencies as stripes do) but lands far from the
  target, so both are read together.
- **caption following**: the world's pixel judge (``judge.py``) reads the object's colour and
  shape; ``kept`` is the share of the prompts the base gets right that the adapter also gets right.

Prompts are the world's evaluation scenes ("a red circle on a white background"); adapters get
their trigger word in front (as a user would type it), the base gets the plain prompt.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from studio.world import judge as pixel_judge
from studio.world.scene import Scene, render, sample_scenes
from studio.world.styles import Style

HISTOGRAM_LEVELS = 4  # per channel: 4^3 colour bins
SPECTRUM_BANDS = 6
EVAL_SEED = 2024
MIN_SPREAD = 0.02  # floor of a statistic's scale (2% of the pixels for a histogram bin)


@dataclass
class ImageScore:
    """What the images of one adapter (or the base) showed."""

    label: str
    style: float
    distance: float
    colour: float
    shape: float
    kept: float | None = None  # share of the base's correct prompts still correct
    correct: list[bool] = field(default_factory=list, repr=False)

    def as_json(self) -> dict[str, Any]:
        values = asdict(self)
        values.pop("correct")
        return values


def image_statistics(images: np.ndarray) -> np.ndarray:
    """(N, F) statistics of uint8 images (N, H, W, 3): colour histogram, gradients, spectrum, tone."""
    x = images.astype(np.float32) / 255.0
    n = len(x)
    bins = np.clip((x * HISTOGRAM_LEVELS).astype(np.int64), 0, HISTOGRAM_LEVELS - 1)
    codes = (bins[..., 0] * HISTOGRAM_LEVELS + bins[..., 1]) * HISTOGRAM_LEVELS + bins[..., 2]
    histogram = np.stack([np.bincount(c.ravel(), minlength=HISTOGRAM_LEVELS**3) for c in codes]) / codes[0].size
    gray = x.mean(axis=3)
    gradients = np.stack([
        np.abs(np.diff(gray, axis=2)).mean(axis=(1, 2)),
        np.abs(np.diff(gray, axis=1)).mean(axis=(1, 2)),
        np.abs(gray[:, 1:, 1:] - gray[:, :-1, :-1]).mean(axis=(1, 2)),
    ], axis=1)
    spectrum = _radial_spectrum(gray)
    saturation = (x.max(axis=3) - x.min(axis=3)).mean(axis=(1, 2))
    tone = np.stack([gray.mean(axis=(1, 2)), gray.std(axis=(1, 2)), saturation], axis=1)
    return np.concatenate([histogram, gradients * 4, spectrum, tone], axis=1).reshape(n, -1)


def _radial_spectrum(gray: np.ndarray) -> np.ndarray:
    """Log power in ``SPECTRUM_BANDS`` rings of spatial frequency, per image."""
    power = np.abs(np.fft.fftshift(np.fft.fft2(gray - gray.mean(axis=(1, 2), keepdims=True)), axes=(1, 2))) ** 2
    h, w = gray.shape[1:]
    yy, xx = np.mgrid[:h, :w]
    radius = np.hypot(yy - h / 2, xx - w / 2) / (min(h, w) / 2)
    edges = np.linspace(0, 1.0, SPECTRUM_BANDS + 1)
    bands = [power[:, (radius >= lo) & (radius < hi)].mean(axis=1) for lo, hi in zip(edges[:-1], edges[1:])]
    return np.log1p(np.stack(bands, axis=1)) / 10.0


@dataclass
class StyleReference:
    """Mean statistics of the base's images and of the same images with the style applied."""

    base: np.ndarray
    target: np.ndarray
    spread: np.ndarray

    @classmethod
    def of(cls, style: Style, base_images: torch.Tensor, seed: int = 0) -> "StyleReference":
        """From the base's generated images (N, 3, H, W) uint8 and the style's transform."""
        base = image_statistics(_hwc(base_images))
        target = image_statistics(_hwc(style.apply(base_images.cpu(), seed=seed)))
        spread = np.maximum(np.concatenate([base, target]).std(axis=0), MIN_SPREAD)  # statistics that never vary must not dominate
        return cls(base.mean(axis=0) / spread, target.mean(axis=0) / spread, spread)

    def mean(self, images: np.ndarray) -> np.ndarray:
        """Mean scaled statistics of images (N, H, W, 3) uint8."""
        return image_statistics(images).mean(axis=0) / self.spread

    def score(self, generated: np.ndarray) -> tuple[float, float]:
        """(style, distance) of mean statistics ``generated``: the projection of ``g - b`` on
        ``t - b`` and ``|g - t| / |b - t|``."""
        direction = self.target - self.base
        unit = max(float(np.linalg.norm(direction)), 1e-9)
        return float((generated - self.base) @ direction) / unit**2, float(np.linalg.norm(generated - self.target)) / unit


def _hwc(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) uint8 tensor -> (N, H, W, 3) numpy."""
    return images.permute(0, 2, 3, 1).cpu().numpy()


def evaluation_scenes(count: int, seed: int = EVAL_SEED) -> list[Scene]:
    """The fixed evaluation scenes (the same as the world's caption-following report)."""
    return sample_scenes(count, seed)


def prompts_for(scenes: list[Scene], trigger: str = "") -> list[str]:
    """Short prompts of the scenes ('a red circle on a white background'), trigger in front."""
    plain = [scene.caption(size=False, position=False) for scene in scenes]
    return [f"{trigger} style, {prompt}" for prompt in plain] if trigger else plain


def score_images(label: str, images: torch.Tensor, scenes: list[Scene], reference: StyleReference,
                 judge: "StyledJudge", base_correct: list[bool] | None = None) -> ImageScore:
    """Style score and caption following of generated images (N, 3, H, W) uint8 of ``scenes``
    (the reference holds the base's images of the same scenes and seeds); ``judge`` reads
    colour and shape."""
    verdicts = [judge(image, scene) for image, scene in zip(images, scenes)]
    correct = [v.colour_ok and v.shape_ok for v in verdicts]
    kept = None
    if base_correct is not None:
        wanted = [i for i, ok in enumerate(base_correct) if ok]
        kept = sum(correct[i] for i in wanted) / len(wanted) if wanted else float("nan")
    style, distance = reference.score(reference.mean(_hwc(images)))
    return ImageScore(
        label, style, distance, float(np.mean([v.colour_ok for v in verdicts])),
        float(np.mean([v.shape_ok for v in verdicts])), kept, correct,
    )


PATTERN_SHARE = 0.04  # a colour covering this share of a styled empty background is background
BLEND_STEPS = (0.2, 0.4, 0.6, 0.8)  # a background half-way to its pattern colour is still background


class StyledJudge:
    """The world's pixel judge seen through a style: palette colours as the style shows them,
    and the colours the style paints on an empty background (stripes, dots, frames) counted as
    background, as are the blends of the background with those colours: a style drawn at part
    strength (faint stripes, as a LoRA at weight 0.5 or a short run draws them) mixes the pattern
    into the background pixel by pixel, and those pixels are neither. ``accuracy_on_renders``
    says how far it can be trusted for that style (``strength`` < 1: on blends of the plain and
    the styled renders)."""

    def __init__(self, style: Style | None, size: int = 64):
        names, classify = pixel_judge.NAMES, pixel_judge.classify_pixels
        self.style = style
        swatches = torch.tensor(pixel_judge.PALETTE, dtype=torch.uint8)[:, :, None, None].expand(-1, -1, size, size).contiguous()
        shown = style.apply(swatches, seed=0) if style is not None else swatches
        self.palette = shown.float().flatten(2).median(dim=2).values.numpy()
        self.background_labels: dict[str, tuple[int, ...]] = {}
        self.palettes: dict[str, np.ndarray] = {}
        for index, name in enumerate(names):
            labels = classify(shown[index].permute(1, 2, 0).numpy(), self.palette)
            share = np.bincount(labels[labels >= 0], minlength=len(names)) / labels.size
            pattern = sorted({index, *np.nonzero(share >= PATTERN_SHARE)[0].tolist()})
            blends = [(1 - f) * self.palette[index] + f * self.palette[other] for other in pattern if other != index for f in BLEND_STEPS]
            self.palettes[name] = np.concatenate([self.palette, np.array(blends, np.float32).reshape(-1, 3)])
            extra = range(len(names), len(names) + len(blends))  # blend rows: background, never an object's colour
            self.background_labels[name] = tuple(pattern) + tuple(extra)

    def __call__(self, image, scene: Scene):
        """The judge's verdict on one image of ``scene``, through the style."""
        return pixel_judge.judge(image, scene.colour, scene.shape, scene.background, palette=self.palettes[scene.background],
                                 background_labels=self.background_labels[scene.background])

    def accuracy_on_renders(self, scenes: list[Scene], size: int = 64, seed: int = 0, strength: float = 1.0) -> float:
        """Share of the style's own renders of ``scenes`` it judges right (colour and shape); with
        ``strength`` < 1, of the renders blended with their styled versions by that share."""
        images = render(scenes, size)
        if self.style is not None:
            styled = self.style.apply(images, seed=seed).float()
            images = (images.float() * (1 - strength) + styled * strength).round().to(torch.uint8)
        verdicts = [self(image, scene) for image, scene in zip(images, scenes)]
        return float(np.mean([v.colour_ok and v.shape_ok for v in verdicts]))


DECODE_STEPS, DECODE_LR = 100, 0.05


def decodable(vae, images: torch.Tensor, steps: int = DECODE_STEPS, lr: float = DECODE_LR) -> torch.Tensor:
    """The nearest images (uint8 (N, 3, H, W)) the pipeline's decoder can show to ``images``:
    latents started at the encoder's estimate and fitted by Adam to the mean absolute pixel error.

    Every generated image is a decode of some latent, so this is the best a perfect adapter could
    draw: applied to the styled target it is the *ceiling* of the style and caption columns. The
    world's VAE (16 x 16 latents for 64 px) softens corners and rings at the pinstripes, so the
    ceiling reads fewer captions right than the styled target itself does. Only ``z`` is
    optimised; the VAE's own gradients are never touched."""
    from studio.world.train import to_unit

    device, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
    x = to_unit(images).to(device, dtype)
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean.clone()
    z.requires_grad_(True)
    optimizer = torch.optim.Adam([z], lr=lr)
    for _ in range(steps):
        with torch.enable_grad():
            loss = (vae.decode(z).sample - x).abs().mean()
            (z.grad,) = torch.autograd.grad(loss, z)
        optimizer.step()
    with torch.no_grad():
        decoded = vae.decode(z).sample
    return ((decoded.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
