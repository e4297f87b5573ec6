"""Paths, fingerprints and done-markers of one world build (shared by the build and the zoo).

A stage's fingerprint hashes the config fields it depends on and its upstream stage's
fingerprint, so changing a field re-runs that stage and every stage after it, nothing before.
"""

from __future__ import annotations

import json
from pathlib import Path

from studio.fileio import write_text
from studio.world.config import WorldConfig
from studio.world.styles import Style


class Stages:
    """Paths, fingerprints and markers of one build."""

    def __init__(self, config: WorldConfig, styles: list[Style]):
        self.config, self.styles = config, styles
        self.out = Path(config.out_dir)
        self.work = Path(config.work_dir)
        words = [s.trigger for s in styles]
        c = config
        self.data_fp = c.fingerprint("seed", "image_size", "base_images", "style_images", "val_images", "max_length", upstream=styles_fingerprint(styles))
        self.vae_fp = c.fingerprint("vae_channels", "vae_steps", "vae_batch", "vae_lr", upstream=self.data_fp)
        self.base_fp = c.fingerprint("unet_channels", "unet_heads", "text_hidden", "text_layers", "base_steps", "base_batch", "base_lr", "empty_caption_prob", upstream=self.vae_fp + ",".join(words))

    def marker(self, name: str) -> Path:
        return self.work / f"{name}.done.json"

    def done(self, name: str, fingerprint: str) -> bool:
        path = self.marker(name)
        return path.exists() and json.loads(path.read_text()).get("fingerprint") == fingerprint

    def mark(self, name: str, fingerprint: str, **info) -> None:
        write_text(self.marker(name), json.dumps({"fingerprint": fingerprint, **info}, indent=1))


def styles_fingerprint(styles: list[Style]) -> str:
    """The styles' names, triggers and transform steps as canonical JSON (the data stage's upstream)."""
    return json.dumps([[s.name, s.trigger, [[st.op, st.params] for st in s.steps]] for s in styles], sort_keys=True, default=str)
