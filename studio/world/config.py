"""The world recipe's typed config: the ``[world]`` table of ``pipelines/world.toml``.

Every field has a default (the full GPU build); the quick size for tests overrides a few.
Unknown keys and wrong types are refused with the file and field named.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, get_args

from studio.errors import ConfigError
from studio.options import option
from studio.train.config import LossWeighting
from studio.world.models import ModelSizes


@dataclass
class WorldConfig:
    """How to build the embedded world (data, VAE, base, zoo) and where to put it."""

    out_dir: str = option("assets/world", "folder the pipeline, the zoo and report.json are written to")
    work_dir: str = option("runs/world", "folder of the build's intermediate results (data, VAE, checkpoints, stage markers)")
    styles: str = option("studio/world/styles.toml", "TOML file of the zoo's styles")
    only_styles: list[str] = option(default_factory=list, help="build only these styles (empty: every style of the file)")
    seed: int = option(0, "seed of the data, the initialisations and every draw")
    device: str = option("auto", "auto (cuda when available), cpu, cuda or cuda:N")
    # data
    image_size: int = option(64, "side of every image in pixels")
    base_images: int = option(20000, "plain scenes the VAE and base learn from")
    style_images: int = option(1024, "training images per style")
    val_images: int = option(64, "held-out images per style (the report's validation loss)")
    # networks
    unet_channels: list[int] = option(default_factory=lambda: [64, 128, 128], help="UNet block widths")
    unet_heads: int = option(8, "UNet attention head dimension")
    vae_channels: list[int] = option(default_factory=lambda: [32, 64, 64], help="VAE block widths (latent side = image side / 2^(blocks - 1))")
    text_hidden: int = option(64, "text encoder width (the UNet's cross-attention dimension)")
    text_layers: int = option(2, "text encoder layers")
    max_length: int = option(20, "tokens per caption, padded")
    # VAE
    vae_steps: int = option(1500, "VAE training steps")
    vae_batch: int = option(64, "VAE images per step")
    vae_lr: float = option(1e-3, "VAE peak learning rate (cosine schedule)")
    # base
    base_steps: int = option(2500, "base (text encoder + UNet) training steps")
    base_batch: int = option(256, "base images per step")
    base_lr: float = option(3e-4, "base peak learning rate (cosine schedule)")
    empty_caption_prob: float = option(0.1, "share of empty captions in base training (for classifier-free guidance)")
    checkpoint_every: int = option(500, "steps between checkpoints of the base and of each zoo group (0: none)")
    # zoo
    lora_rank: int = option(8, "rank of every zoo LoRA")
    lora_alpha: float = option(8.0, "alpha of every zoo LoRA (scale alpha / rank)")
    lora_targets: list[str] = option(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"], help="attention projections the zoo LoRAs adapt")
    lora_steps: int = option(800, "training steps of each zoo group")
    lora_per_style: int = option(16, "images per style and step")
    lora_lr: float = option(2e-3, "zoo peak learning rate (cosine schedule)")
    lora_loss_weighting: str = option("none", "timestep weighting of the zoo's loss, as studio train's loss_weighting: none, min_snr, debiased, sampler")
    lora_min_snr_gamma: float = option(5.0, "gamma of min_snr weighting (zoo)")
    zoo_group: int = option(14, "styles trained together (one LoRA per sample of the batch)")
    diffusers_copies: list[str] = option(default_factory=lambda: ["noir", "mosaic", "quad"], help="styles also saved in the diffusers (peft) layout")
    # evaluation
    eval_prompts: int = option(64, "prompts of the report's caption-following check")
    eval_steps: int = option(25, "DDIM steps of the report's images")
    guidance: float = option(4.0, "CFG scale of the report's images")
    min_improvement: float = option(0.2, "held-out loss improvement a LoRA must reach to count as passing")

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
    if config.lora_loss_weighting not in get_args(LossWeighting):
        raise ConfigError(f"{source}: field 'lora_loss_weighting' must be one of {', '.join(get_args(LossWeighting))}, got {config.lora_loss_weighting!r}")
    if config.lora_min_snr_gamma <= 0:
        raise ConfigError(f"{source}: field 'lora_min_snr_gamma' must be positive, got {config.lora_min_snr_gamma}")


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
