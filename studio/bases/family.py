"""One `Base` description per denoiser family: what holds adapters and how a batch is conditioned.

The engine and the trainer ask the `Base` of a pipeline (``base_of(pipe)``) or of a module tree
(``base_for(tree)``) instead of checking pipeline classes: which components take adapters, which
text encoders make the sequence and the pooled embeddings, whether guidance is a CFG batch
(SD, SDXL, SD3) or an embedding the transformer reads (FLUX.1-dev; FLUX.1-schnell has none),
whether SDXL's added time ids are needed, whether latents are packed into 2x2 tokens (FLUX), and
what the training target is (noise / v from the scheduler config, or the flow-matching velocity).
No torch or diffusers import here: this module is data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from studio.errors import BaseNotFoundError

Guidance = Literal["cfg", "embedded", "none"]
Target = Literal["scheduler", "flow"]

ARCH_LABELS = {
    "sd15": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL", "world": "the embedded world",
    "flux1": "FLUX.1", "flux1-schnell": "FLUX.1 [schnell]", "flux1-custom": "a FLUX.1-type transformer",
    "sd3": "SD3.5", "sd3.5-large": "SD3.5 Large", "sd3.5-medium": "SD3.5 Medium", "sd3-custom": "an SD3-type transformer",
}


@dataclass(frozen=True)
class Base:
    """What the studio needs to know about one denoiser family.

    Component names are diffusers pipeline attributes; they are also the first part of every
    module name in a `ModuleTree` and in a `LoraAdapter` (``transformer.transformer_blocks.0...``).
    """

    id: str
    label: str
    denoiser: Literal["unet", "transformer"]
    denoiser_class: str
    pipeline_class: str
    adapter_components: tuple[str, ...]  # every component a LoRA file can target, denoiser first
    diffusers_loadable: tuple[str, ...]  # the components diffusers' load_lora_weights accepts
    text_encoders: tuple[str, ...]  # in pipeline order, paired with ``tokenizers``
    tokenizers: tuple[str, ...]
    sequence_encoders: tuple[str, ...]  # encoders whose hidden states form encoder_hidden_states
    pooled_encoders: tuple[str, ...]  # encoders whose pooled output is concatenated into pooled_projections / text_embeds
    guidance: Guidance  # "cfg": uncond + cond batch; "embedded": guidance scale fed to the transformer
    added_time_ids: bool  # SDXL: (orig_h, orig_w, crop_top, crop_left, target_h, target_w) per image
    packed_latents: bool  # FLUX: latents packed into 2x2 patch tokens, with img_ids / txt_ids
    target: Target  # "scheduler": epsilon / v_prediction from the scheduler config; "flow": noise - latents
    timestep_divisor: float  # the denoiser is called with timestep / divisor (FLUX 1000, others 1)
    kohya_prefixes: dict[str, str] = field(default_factory=dict)  # component -> kohya / sd-scripts prefix
    notes: str = ""

    def guidance_for(self, denoiser_config: dict[str, Any]) -> Guidance:
        """The guidance mode of one checkpoint (FLUX.1-schnell has no guidance embedding)."""
        if self.id == "flux1" and not denoiser_config.get("guidance_embeds", True):
            return "none"
        return self.guidance

    def denoiser_inputs(self) -> tuple[str, ...]:
        """Keyword arguments the denoiser's forward takes beyond latents and timestep."""
        if self.denoiser == "unet":
            return ("encoder_hidden_states", "added_cond_kwargs") if self.added_time_ids else ("encoder_hidden_states",)
        if self.packed_latents:
            return ("encoder_hidden_states", "pooled_projections", "guidance", "txt_ids", "img_ids")
        return ("encoder_hidden_states", "pooled_projections")


CLIP_KOHYA = {"unet": "lora_unet", "text_encoder": "lora_te"}

BASES: dict[str, Base] = {
    "sd": Base(
        "sd", "Stable Diffusion 1.x / 2.x", "unet", "UNet2DConditionModel", "StableDiffusionPipeline",
        ("unet", "text_encoder"), ("unet", "text_encoder"), ("text_encoder",), ("tokenizer",),
        ("text_encoder",), (), "cfg", False, False, "scheduler", 1.0, CLIP_KOHYA,
    ),
    "sdxl": Base(
        "sdxl", "Stable Diffusion XL", "unet", "UNet2DConditionModel", "StableDiffusionXLPipeline",
        ("unet", "text_encoder", "text_encoder_2"), ("unet", "text_encoder", "text_encoder_2"),
        ("text_encoder", "text_encoder_2"), ("tokenizer", "tokenizer_2"),
        ("text_encoder", "text_encoder_2"), ("text_encoder_2",), "cfg", True, False, "scheduler", 1.0,
        {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
        "penultimate hidden states of both CLIPs concatenated; pooled = text_encoder_2's text_embeds",
    ),
    "flux1": Base(
        "flux1", "FLUX.1", "transformer", "FluxTransformer2DModel", "FluxPipeline",
        ("transformer", "text_encoder", "text_encoder_2"), ("transformer", "text_encoder"),
        ("text_encoder", "text_encoder_2"), ("tokenizer", "tokenizer_2"),
        ("text_encoder_2",), ("text_encoder",), "embedded", False, True, "flow", 1000.0,
        {"transformer": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te3"},
        "sequence = T5 last hidden state, pooled = CLIP pooler_output; no negative batch",
    ),
    "sd3": Base(
        "sd3", "Stable Diffusion 3.5", "transformer", "SD3Transformer2DModel", "StableDiffusion3Pipeline",
        ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3"), ("transformer", "text_encoder", "text_encoder_2"),
        ("text_encoder", "text_encoder_2", "text_encoder_3"), ("tokenizer", "tokenizer_2", "tokenizer_3"),
        ("text_encoder", "text_encoder_2", "text_encoder_3"), ("text_encoder", "text_encoder_2"), "cfg", False, False, "flow", 1.0,
        {"transformer": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2", "text_encoder_3": "lora_te3"},
        "sequence = both CLIPs' penultimate states concatenated (padded to T5 width) then T5 tokens; pooled = both CLIP text_embeds",
    ),
}

DENOISER_FAMILIES = {"FluxTransformer2DModel": "flux1", "SD3Transformer2DModel": "sd3"}


def arch_label(arch: str) -> str:
    return ARCH_LABELS.get(arch, arch)


def family_of(arch: str, config: dict[str, Any] | None = None) -> str:
    """The family id of an architecture id, or of a denoiser config when the id says nothing."""
    if arch.startswith("flux1"):
        return "flux1"
    if arch.startswith("sd3"):
        return "sd3"
    if arch == "sdxl":
        return "sdxl"
    config = config or {}
    if config.get("_class_name") in DENOISER_FAMILIES:
        return DENOISER_FAMILIES[config["_class_name"]]
    if config.get("addition_embed_type") == "text_time":
        return "sdxl"
    return "sd"


def base_for(tree) -> Base:
    """The `Base` of a `ModuleTree`."""
    return BASES[tree.family]


def base_of(pipe) -> Base:
    """The `Base` of a live diffusers pipeline, from its denoiser (not from the pipeline class)."""
    transformer = getattr(pipe, "transformer", None)
    if transformer is not None:
        family = DENOISER_FAMILIES.get(type(transformer).__name__)
        if family is None:
            raise BaseNotFoundError(f"denoiser {type(transformer).__name__} is not one the studio knows ({', '.join(DENOISER_FAMILIES)})")
        return BASES[family]
    unet = getattr(pipe, "unet", None)
    if unet is None:
        raise BaseNotFoundError(f"{type(pipe).__name__} has neither a unet nor a transformer")
    return BASES[family_of("", dict(unet.config))]
