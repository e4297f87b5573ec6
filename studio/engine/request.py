"""Typed requests and results of generation."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from studio.engine.infotext import ImageParameters, save_png

DtypeName = Literal["auto", "float32", "float16", "bfloat16"]
DEFAULT_GUIDANCE = {"world": 4.0}
FALLBACK_GUIDANCE = 7.5
FAMILY_GUIDANCE = {"flux1": 3.5, "sd3": 7.0}  # the pipelines' own defaults (FLUX.1-dev's embedded guidance)


@dataclass
class GenerateRequest:
    """One generation: what the CLI flags, the app's form and a recipe all fill in.

    ``adapters`` are SPECs (``FILE[:w]``, ``COLLECTION.safetensors#NAME[:w]``) or names registered
    in the engine (``Engine.generate`` also takes adapter objects and ``(adapter, weight)`` pairs);
    several mix into one. With ``per_image`` each image of the batch gets its own
    entry (``none`` for no adapter) and ``batch`` is the number of entries. Image i uses seed
    ``seed + i``. ``guidance`` None picks the base's usual value (4 for the world, 3.5 for
    FLUX.1-dev's guidance embedding, 0 for FLUX.1-schnell which has none, 7 for SD3, else 7.5);
    on FLUX it is the embedded (distilled) guidance, not a CFG scale. ``width`` / ``height``
    None pick the base's native size.
    """

    prompt: str
    base: str = "world"
    negative_prompt: str = ""
    adapters: list[str] = field(default_factory=list)
    per_image: bool = False
    seed: int = 0
    steps: int = 25
    guidance: float | None = None
    width: int | None = None
    height: int | None = None
    scheduler: str | None = None
    batch: int = 1
    scale: float = 1.0
    device: str | None = None
    dtype: DtypeName = "auto"

    def guidance_for(self, base_label: str, family: str = "", mode: str = "cfg") -> float:
        """The guidance of this request on a base (``family`` / ``mode`` from its ``studio.bases.Base``)."""
        if self.guidance is not None:
            return float(self.guidance)
        if mode == "none":
            return 0.0
        if base_label in DEFAULT_GUIDANCE:
            return DEFAULT_GUIDANCE[base_label]
        return FAMILY_GUIDANCE.get(family, FALLBACK_GUIDANCE)


@dataclass
class GeneratedImage:
    """An image and the parameters that make it again (written into its PNG)."""

    image: Any  # PIL.Image.Image
    parameters: ImageParameters
    pixels: Any = None  # numpy float array (H, W, 3) in [0, 1], as the pipeline returned it

    @property
    def infotext(self) -> str:
        return self.parameters.to_text()

    def save(self, path: str | Path) -> Path:
        """Write a PNG carrying the A1111-style ``parameters`` text."""
        return save_png(self.image, self.parameters, path)
