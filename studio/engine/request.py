"""Typed requests and results of generation.

The request is the generate verb's (`studio.verbs.generate.GenerateRequest`: its fields, their
help text and its checks live there); the engine takes it as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from studio.engine.infotext import ImageParameters, save_png
from studio.verbs.generate import DtypeName, GenerateRequest

__all__ = ["DtypeName", "GeneratedImage", "GenerateRequest"]


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
