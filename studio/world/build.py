"""Build the embedded world in resumable stages: data, VAE, base, zoo LoRAs, report.

Each stage writes its result (atomically) before the next starts, with a fingerprint of the
config fields it depends on; a re-run skips every stage whose result is there with the same
fingerprint, so a build cut off by a time limit continues where it stopped. The base stage also
checkpoints every ``checkpoint_every`` steps. ``python -m studio.world.build recipe.toml`` runs it
without the CLI.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Iterator

import torch

from studio.events import Done, Event, Message, Progress, Saved
from studio.fileio import write_text
from studio.world.config import WorldConfig, load_config
from studio.world.data import BASE, WorldData, load_world, render_world, save_world
from studio.world.models import assemble_pipeline, make_scheduler, make_text_encoder, make_unet, make_vae
from studio.world.scene import world_words
from studio.world.stages import Stages
from studio.world.styles import Style, load_styles
from studio.world.tokenizer import build_tokenizer
from studio.world.train import Plan, encode_latents, to_unit, train_base, train_vae
from studio.world.zoo import evaluate_zoo, train_zoo_group

__all__ = ["WorldConfig", "build_world", "load_config"]


def pick_device(config: WorldConfig) -> torch.device:
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(config.device)


def select_styles(config: WorldConfig) -> list[Style]:
    styles = load_styles(config.styles)
    if not config.only_styles:
        return styles
    known = {s.name for s in styles}
    missing = sorted(set(config.only_styles) - known)
    if missing:
        from studio.errors import ConfigError

        raise ConfigError(f"[world] only_styles names unknown styles {missing}; {config.styles} has {sorted(known)}")
    return [s for s in styles if s.name in config.only_styles]


def build_world(config: WorldConfig) -> Iterator[Event]:
    """Run every stage not yet done; yields Progress/Message/Saved and finally Done(report)."""
    start = time.time()
    torch.manual_seed(config.seed)
    styles = select_styles(config)
    stages = Stages(config, styles)
    device = pick_device(config)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
    yield Message(f"building the world on {device} ({len(styles)} styles) into {stages.out}")
    tokenizer = build_tokenizer(world_words() + [s.trigger for s in styles], stages.work / "tokenizer_src", config.max_length)
    data = yield from _data_stage(stages, tokenizer)
    data = data.to(device)
    vae = yield from _vae_stage(stages, data, device)
    latents = encode_latents(vae, data.images) * vae.config.scaling_factor
    yield from _base_stage(stages, vae, tokenizer, data, latents, device)
    timings = {"total_before_zoo_s": time.time() - start}
    for first in range(0, len(styles), config.zoo_group):
        yield from train_zoo_group(stages, list(range(first, min(first + config.zoo_group, len(styles)))), data, latents, device)
    report = yield from evaluate_zoo(stages, data, latents, device)
    report["timings"] = {**timings, **report.get("timings", {}), "total_s": time.time() - start}
    report["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    path = write_text(stages.out / "report.json", json.dumps(report, indent=1))
    yield Saved(path, "report")
    yield Done(report)


def _data_stage(stages: Stages, tokenizer):
    path = stages.work / "data.safetensors"
    c = stages.config
    if stages.done("data", stages.data_fp) and path.exists():
        yield Message("data: already rendered, loading")
        return load_world(path)
    yield Message("data: rendering the world")
    t0 = time.time()
    data = render_world(stages.styles, tokenizer, c.base_images, c.style_images, c.val_images, c.seed, c.image_size)
    yield Saved(save_world(data, path), "data")
    stages.mark("data", stages.data_fp, images=len(data.images), seconds=time.time() - t0)
    return data


def _vae_stage(stages: Stages, data: WorldData, device: torch.device):
    from diffusers import AutoencoderKL

    folder = stages.work / "vae"
    c = stages.config
    if stages.done("vae", stages.vae_fp) and (folder / "config.json").exists():
        yield Message("vae: already trained, loading")
        return AutoencoderKL.from_pretrained(folder, torch_dtype=torch.float32).to(device).eval()
    yield Message("vae: training")
    t0 = time.time()
    torch.manual_seed(c.seed)
    vae = make_vae(c.sizes()).to(device)
    train_images = data.images[~data.heldout]
    vae = yield from train_vae(vae, train_images, Plan(c.vae_steps, c.vae_batch, c.vae_lr, c.seed))
    base_latents = encode_latents(vae, data.images[data.style == BASE][:4096])
    vae.register_to_config(scaling_factor=float(1.0 / base_latents.std()))
    recon = _vae_error(vae, data.images[data.style == BASE][:256])
    _save_folder(vae, folder)
    yield Saved(folder, "vae")
    seconds = time.time() - t0
    stages.mark("vae", stages.vae_fp, seconds=seconds, scaling_factor=vae.config.scaling_factor, recon_mse=recon, steps=c.vae_steps)
    yield Message(f"vae: {seconds:.0f} s, reconstruction MSE {recon:.5f}, scaling_factor {vae.config.scaling_factor:.4f}")
    return vae


@torch.no_grad()
def _vae_error(vae, images: torch.Tensor) -> float:
    x = to_unit(images)
    return float(((vae.decode(vae.encode(x).latent_dist.mean).sample - x) ** 2).mean())


def _save_folder(model, folder: Path) -> None:
    """save_pretrained into a temporary folder, then swap it in."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def _base_stage(stages: Stages, vae, tokenizer, data: WorldData, latents: torch.Tensor, device: torch.device):
    c = stages.config
    if stages.done("base", stages.base_fp) and (stages.out / "model_index.json").exists():
        yield Message("base: already trained")
        return
    yield Message("base: training text encoder + UNet")
    t0 = time.time()
    torch.manual_seed(c.seed + 1)
    sizes = c.sizes()
    unet = make_unet(sizes).to(device)
    text_encoder = make_text_encoder(sizes, len(tokenizer)).to(device)
    base = data.style == BASE
    empty = tokenizer([""], padding="max_length", max_length=c.max_length, return_tensors="pt")["input_ids"][0].to(device)
    checkpoints = stages.work / f"base-{stages.base_fp}.ckpt"
    plan = Plan(c.base_steps, c.base_batch, c.base_lr, c.seed, checkpoints, c.checkpoint_every)
    yield from train_base(unet, text_encoder, latents[base], data.ids[base], empty, c.empty_caption_prob, plan, make_scheduler())
    yield from save_pipeline(stages.out, vae, text_encoder, tokenizer, unet)
    shutil.copyfile(c.styles, stages.out / "styles.toml")
    seconds = time.time() - t0
    stages.mark("base", stages.base_fp, seconds=seconds, steps=c.base_steps)
    shutil.rmtree(checkpoints, ignore_errors=True)
    yield Message(f"base: {seconds:.0f} s")


def save_pipeline(out: Path, vae, text_encoder, tokenizer, unet) -> Iterator[Event]:
    """Save the pipeline in fp16 safetensors: into a temporary folder, then swap each part in."""
    import copy

    parts = [copy.deepcopy(m).to("cpu", torch.float16) for m in (vae, text_encoder, unet)]
    pipe = assemble_pipeline(parts[0], parts[1], tokenizer, parts[2])
    tmp = out.parent / f".{out.name}.pipeline.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    out.mkdir(parents=True, exist_ok=True)
    for part in ("vae", "text_encoder", "tokenizer", "unet", "scheduler"):
        shutil.rmtree(out / part, ignore_errors=True)
        (tmp / part).rename(out / part)
    (tmp / "model_index.json").replace(out / "model_index.json")
    shutil.rmtree(tmp, ignore_errors=True)
    yield Saved(out, "pipeline")


def main(argv: list[str] | None = None) -> int:
    """``python -m studio.world.build pipelines/world.toml [field=value ...]``: run and print events."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print("usage: python -m studio.world.build RECIPE.toml [field=value ...]", file=sys.stderr)
        return 2
    config = load_config(argv[0])
    if len(argv) > 1:
        import tomllib

        from studio.world.config import config_from_dict
        import dataclasses

        overrides = tomllib.loads("\n".join(argv[1:]))
        config = config_from_dict({**dataclasses.asdict(config), **overrides}, "command line")
    for event in build_world(config):
        if isinstance(event, Progress):
            print(f"[{event.stage}] {event.step}/{event.total} loss {event.loss if event.loss is None else round(event.loss, 5)} {({k: round(v, 1) for k, v in event.metrics.items()})}", flush=True)
        elif isinstance(event, Done):
            print(json.dumps(event.result, indent=1), flush=True)
        else:
            print(event, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
