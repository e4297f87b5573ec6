"""The world recipe's typed config: the ``[world]`` table of ``pipelines/world.toml``.

Every field has a default (the full GPU build); the quick size for tests overrides a few.
Unknown keys and wrong types are refused with the file and field named.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from studio.errors import ConfigError
from studio.world.models import ModelSizes


@dataclass
class WorldConfig:
    """How to build the embedded world (data, VAE, base, zoo) and where to put it."""

    out_dir: str = "assets/world"
    work_dir: str = "runs/world"
    styles: str = "studio/world/styles.toml"
    only_styles: list[str] = field(default_factory=list)
    seed: int = 0
    device: str = "auto"
    # data
    image_size: int = 64
    base_images: int = 20000
    style_images: int = 1024
    val_images: int = 64
    # networks
    unet_channels: list[int] = field(default_factory=lambda: [64, 128, 128])
    unet_heads: int = 8
    vae_channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    text_hidden: int = 64
    text_layers: int = 2
    max_length: int = 20
    # VAE
    vae_steps: int = 1500
    vae_batch: int = 64
    vae_lr: float = 1e-3
    # base
    base_steps: int = 2500
    base_batch: int = 256
    base_lr: float = 3e-4
    empty_caption_prob: float = 0.1
    checkpoint_every: int = 500
    # zoo
    lora_rank: int = 8
    lora_alpha: float = 8.0
    lora_targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    lora_steps: int = 800
    lora_per_style: int = 16
    lora_lr: float = 2e-3
    zoo_group: int = 14
    diffusers_copies: list[str] = field(default_factory=lambda: ["noir", "mosaic", "quad"])
    # evaluation
    eval_prompts: int = 64
    eval_steps: int = 25
    guidance: float = 4.0
    min_improvement: float = 0.2

    def sizes(self) -> ModelSizes:
        return ModelSizes(
            unet_channels=tuple(self.unet_channels), unet_heads=self.unet_heads, vae_channels=tuple(self.vae_channels),
            text_hidden=self.text_hidden, text_layers=self.text_layers, max_length=self.max_length, image_size=self.image_size,
        )

    def fingerprint(self, *names: str, upstream: str = "") -> str:
        """A short hash of the named fields (and an upstream stage's hash), for resuming."""
        values = {name: getattr(self, name) for name in names}
        text = json.dumps(values, sort_keys=True) + upstream
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def config_from_dict(table: dict[str, Any], source: str = "[world]") -> WorldConfig:
    """Build a WorldConfig from a TOML table, checking names and types."""
    known = {f.name: f for f in fields(WorldConfig)}
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise ConfigError(f"{source}: unknown field(s) {unknown}; known: {sorted(known)}")
    defaults = WorldConfig()
    for name, value in table.items():
        expected = getattr(defaults, name)
        if isinstance(expected, bool) or isinstance(value, bool):
            ok = isinstance(value, bool) == isinstance(expected, bool)
        elif isinstance(expected, float):
            ok = isinstance(value, (int, float))
        else:
            ok = isinstance(value, type(expected))
        if not ok:
            raise ConfigError(f"{source}: field {name!r} must be {type(expected).__name__}, got {value!r}")
    config = dataclasses.replace(defaults, **{k: (float(v) if isinstance(getattr(defaults, k), float) else v) for k, v in table.items()})
    _validate(config, source)
    return config


def _validate(config: WorldConfig, source: str) -> None:
    positive = ("image_size", "base_images", "style_images", "val_images", "vae_steps", "vae_batch", "base_steps", "base_batch", "lora_rank", "lora_steps", "lora_per_style", "zoo_group", "eval_prompts", "eval_steps")
    for name in positive:
        if getattr(config, name) <= 0:
            raise ConfigError(f"{source}: field {name!r} must be positive, got {getattr(config, name)}")
    if config.image_size % 2 ** (len(config.vae_channels) - 1):
        raise ConfigError(f"{source}: image_size {config.image_size} must divide by 2^(len(vae_channels)-1)")
    if config.device not in ("auto", "cpu", "cuda") and not config.device.startswith("cuda:"):
        raise ConfigError(f"{source}: field 'device' must be auto, cpu or cuda[:n], got {config.device!r}")


def load_config(path: str | Path) -> WorldConfig:
    """Read the ``[world]`` table of a recipe file."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: recipe file not found") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: invalid TOML: {error}") from None
    kind = data.get("job", {}).get("kind", "world")
    if kind != "world":
        raise ConfigError(f"{path}: [job] kind is {kind!r}, not 'world'")
    return config_from_dict(data.get("world", {}), f"{path} [world]")
