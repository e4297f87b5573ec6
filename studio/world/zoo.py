"""The zoo: one LoRA per style, trained on the shipped base, saved as kohya files; and the report.

Styles are trained in groups (``zoo_group`` at a time, one LoRA per style, per-sample LoRA
selection, see ``multilora.py``); each finished LoRA is written before the next group starts,
with a fingerprint in its metadata, so a re-run skips the LoRAs already made.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Iterator

import torch

from studio.engine.patch import component_modules, merged
from studio.errors import StudioError
from studio.events import Event, Message, Progress, Saved
from studio.world.data import WorldData
from studio.world.evaluate import caption_accuracy
from studio.world.models import make_scheduler
from studio.world.multilora import MultiLora
from studio.world.stages import Stages
from studio.world.styles import Style
from studio.world.train import Plan, Weighting, ZooData, train_loras, validation_loss

FINGERPRINT_KEY = "studio.world_fingerprint"
LORA_FIELDS = ("lora_rank", "lora_alpha", "lora_targets", "lora_steps", "lora_per_style", "lora_lr")


def lora_path(out: Path, style: Style, layout: str = "kohya") -> Path:
    folder = out / "loras" if layout == "kohya" else out / "loras" / "diffusers"
    return folder / f"{style.name}.safetensors"


def lora_fingerprint(stages: Stages, style: Style) -> str:
    """The hash of the settings a zoo LoRA depends on (its base, its style, the ``lora_*`` fields).

    The loss weighting counts only when it is not the plain mean (and its gamma only for
    min_snr), so LoRAs made before the weighting was a setting keep their fingerprints.
    """
    c = stages.config
    names = LORA_FIELDS
    if c.lora_loss_weighting != "none":
        names += ("lora_loss_weighting",) + (("lora_min_snr_gamma",) if c.lora_loss_weighting == "min_snr" else ())
    return c.fingerprint(*names, upstream=stages.base_fp + repr(style))


def weighting(stages: Stages) -> Weighting:
    """The zoo's timestep loss weighting, from the config."""
    return Weighting(stages.config.lora_loss_weighting, stages.config.lora_min_snr_gamma)


def _has_lora(stages: Stages, style: Style) -> bool:
    from safetensors import safe_open

    path = lora_path(stages.out, style)
    if not path.exists():
        return False
    with safe_open(str(path), "pt") as f:
        return (f.metadata() or {}).get(FINGERPRINT_KEY) == lora_fingerprint(stages, style)


def load_base(out: Path, device: torch.device):
    """(unet, text_encoder) of the saved pipeline, in float32 on ``device``, frozen."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(out / "unet", torch_dtype=torch.float32).to(device).eval()
    text_encoder = CLIPTextModel.from_pretrained(out / "text_encoder", dtype=torch.float32).to(device).eval()
    unet.requires_grad_(False), text_encoder.requires_grad_(False)
    return unet, text_encoder


@torch.no_grad()
def encode_text(text_encoder, ids: torch.Tensor, batch: int = 2048) -> torch.Tensor:
    return torch.cat([text_encoder(ids[i:i + batch].long())[0].float() for i in range(0, len(ids), batch)])


def lora_metadata(stages: Stages, style: Style, steps: int, images: int) -> dict[str, str]:
    """kohya-style ``ss_*`` and ``modelspec.*`` header fields for one zoo LoRA."""
    c = stages.config
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(c.lora_rank),
        "ss_network_alpha": str(c.lora_alpha),
        "ss_base_model_version": "world",
        "ss_output_name": style.name,
        "ss_tag_frequency": json.dumps({f"1_{style.name}": {style.trigger: images, "style": images}}),
        "ss_training_comment": f"trigger word: {style.trigger}. {style.description}",
        "ss_steps": str(steps),
        "ss_learning_rate": str(c.lora_lr),
        "ss_unet_lr": str(c.lora_lr),
        "ss_text_encoder_lr": "0",
        "ss_resolution": f"({c.image_size}, {c.image_size})",
        "ss_num_train_images": str(images),
        "ss_batch_size_per_device": str(c.lora_per_style),
        "ss_seed": str(c.seed),
        "ss_network_args": json.dumps({"targets": c.lora_targets}),
        **_weighting_metadata(weighting(stages)),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "world/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": f"world style: {style.name}",
        "modelspec.description": style.description,
        "modelspec.trigger_phrase": style.trigger,
        "modelspec.resolution": f"{c.image_size}x{c.image_size}",
        FINGERPRINT_KEY: lora_fingerprint(stages, style),
    }


def _weighting_metadata(weights: Weighting) -> dict[str, str]:
    """The loss weighting as the studio's key, and as kohya's keys where kohya has one."""
    meta = {"studio.loss_weighting": weights.kind}
    if weights.kind == "min_snr":
        meta["ss_min_snr_gamma"] = str(weights.gamma)
    if weights.kind == "debiased":
        meta["ss_debiased_estimation"] = "True"
    return meta


def group_checkpoint(stages: Stages, indices: list[int]) -> Path:
    """The checkpoint folder of one zoo group: named by its styles' LoRA fingerprints."""
    prints = ",".join(lora_fingerprint(stages, stages.styles[i]) for i in indices)
    return stages.work / f"zoo-{hashlib.sha256(prints.encode()).hexdigest()[:16]}.ckpt"


def train_zoo_group(stages: Stages, indices: list[int], data: WorldData, latents: torch.Tensor, device: torch.device) -> Iterator[Event]:
    """Train the LoRAs of ``indices`` (style positions) that are not saved yet, then save them."""
    from studio.formats import save_adapter

    c = stages.config
    todo = [i for i in indices if not _has_lora(stages, stages.styles[i])]
    if not todo:
        yield Message(f"zoo: {', '.join(stages.styles[i].name for i in indices)} already trained")
        return
    names = [stages.styles[i].name for i in todo]
    yield Message(f"zoo: training {', '.join(names)}")
    t0 = time.time()
    unet, text_encoder = load_base(stages.out, device)
    pools = [data.select(i, heldout=False) for i in todo]
    subset = torch.cat(pools)
    states = encode_text(text_encoder, data.ids[subset])
    offsets = torch.cumsum(torch.tensor([0] + [len(p) for p in pools[:-1]]), 0)
    local = [torch.arange(len(p), device=device) + int(o) for p, o in zip(pools, offsets)]
    lora = MultiLora(unet, len(todo), c.lora_rank, c.lora_alpha, tuple(c.lora_targets), seed=c.seed + todo[0]).to(device)
    folder = group_checkpoint(stages, todo)
    plan = Plan(c.lora_steps, c.lora_per_style, c.lora_lr, c.seed + todo[0], folder, c.checkpoint_every)
    yield from train_loras(lora, unet, ZooData(latents[subset], states, local), plan, make_scheduler(), weighting(stages), label=f"zoo:{names[0]}..")
    lora.remove()
    for k, i in enumerate(todo):
        style = stages.styles[i]
        adapter = lora.adapter(k, style.name, lora_metadata(stages, style, c.lora_steps, len(pools[k])))
        yield Saved(save_adapter(adapter, lora_path(stages.out, style), format="kohya"), "lora")
        if style.name in c.diffusers_copies:
            yield Saved(save_adapter(adapter, lora_path(stages.out, style, "diffusers"), format="diffusers"), "lora")
    shutil.rmtree(folder, ignore_errors=True)
    yield Message(f"zoo: {len(todo)} LoRAs in {time.time() - t0:.0f} s")


def evaluate_zoo(stages: Stages, data: WorldData, latents: torch.Tensor, device: torch.device) -> Iterator[Event]:
    """Caption-following accuracy of the base and each LoRA's held-out loss improvement."""
    from studio.formats import load_adapter

    c = stages.config
    yield Message("report: caption following")
    pipe = _load_pipe(stages.out, device)
    accuracy = caption_accuracy(pipe, c.eval_prompts, seed=2024, steps=c.eval_steps, guidance=c.guidance)
    yield Progress(1, 1, None, stage="report", metrics={"colour": accuracy.colour, "shape": accuracy.shape})
    unet, text_encoder = pipe.unet, pipe.text_encoder
    alphas = make_scheduler().alphas_cumprod.to(device)
    styles = {}
    for i, style in enumerate(stages.styles):
        held = data.select(i, heldout=True)
        states = encode_text(text_encoder, data.ids[held])
        without = validation_loss(unet, latents[held], states, alphas)
        try:
            adapter = load_adapter(lora_path(stages.out, style), base=str(stages.out))
        except StudioError as error:  # an unreadable LoRA file: the report records it; the build keeps what is saved
            styles[style.name] = {"error": f"{type(error).__name__}: {error}"}
            continue
        with merged(component_modules(unet), adapter):
            with_lora = validation_loss(unet, latents[held], states, alphas)
        styles[style.name] = {"without": without, "with": with_lora, "improvement": 1 - with_lora / without}
        yield Progress(i + 1, len(stages.styles), with_lora, stage="report", metrics={"improvement": 1 - with_lora / without})
    stage_info = {name: json.loads(stages.marker(name).read_text()) for name in ("data", "vae", "base") if stages.marker(name).exists()}
    return {
        "caption_following": {"colour": accuracy.colour, "shape": accuracy.shape, "prompts": accuracy.count, "failures": accuracy.failures[:20]},
        "styles": styles,
        "styles_passing": sum(1 for s in styles.values() if s.get("improvement", 0) >= c.min_improvement),
        "stages": stage_info,
    }


def _load_pipe(out: Path, device: torch.device):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out, torch_dtype=torch.float32, local_files_only=True, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
