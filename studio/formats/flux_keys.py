"""FLUX.1 names: BFL's reference module names (kohya sd-scripts, ComfyUI) and XLabs' processor names.

BFL ``double_blocks.N`` are diffusers ``transformer_blocks.N``; ``single_blocks.N`` are
``single_transformer_blocks.N``. Fused: ``img_attn.qkv`` -> ``attn.to_q / to_k / to_v``,
``txt_attn.qkv`` -> ``attn.add_q_proj / add_k_proj / add_v_proj``, ``linear1`` -> ``attn.to_q /
to_k / to_v`` + ``proj_mlp`` (3 x hidden, then 4 x hidden rows). ``final_layer.adaLN_modulation.1``
stores (shift, scale) where diffusers' ``norm_out.linear`` stores (scale, shift).
"""

from __future__ import annotations

import re

from studio.formats.original_names import Group, NameScheme

DOUBLE = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.proj": ("attn.to_out.0",),
    "txt_attn.proj": ("attn.to_add_out",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
    "img_mod.lin": ("norm1.linear",),
    "txt_mod.lin": ("norm1_context.linear",),
}
SINGLE = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation.lin": ("norm.linear",),
}
TOP = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}

SCHEME = NameScheme(
    family="flux1",
    blocks=(("double_blocks", "transformer_blocks", DOUBLE), ("single_blocks", "single_transformer_blocks", SINGLE)),
    top=TOP,
    swapped=lambda original, out_rows, in_features: original == "final_layer.adaLN_modulation.1",
)

KOHYA_STEM = re.compile(r"^lora_unet_(double_blocks|single_blocks|img_in|txt_in|time_in|vector_in|guidance_in)")
COMFY_KEY = re.compile(r"^diffusion_model\.(double_blocks|single_blocks|img_in|txt_in|time_in|vector_in|guidance_in)\.")
XLABS_KEY = re.compile(r"^(?:diffusion_model\.)?(double|single)_blocks\.(\d+)\.processor\.([a-z_]+\d?)\.(down|up)\.weight$")
XLABS_PROCESSORS = {
    ("double", "qkv_lora1"): "img_attn.qkv",
    ("double", "qkv_lora2"): "txt_attn.qkv",
    ("double", "proj_lora1"): "img_attn.proj",
    ("double", "proj_lora2"): "txt_attn.proj",
    ("single", "proj_lora"): "linear2",
}
XLABS_SINGLE_QKV = ("attn.to_q", "attn.to_k", "attn.to_v")  # the q/k/v rows of linear1 only


def xlabs_group(kind: str, block: str, processor: str) -> Group | None:
    """The group of an XLabs processor LoRA (``double_blocks.0.processor.qkv_lora1``), or None."""
    if (kind, processor) == ("single", "qkv_lora"):
        return Group(f"single_blocks.{block}.linear1[q,k,v]", tuple(f"single_transformer_blocks.{block}.{p}" for p in XLABS_SINGLE_QKV))
    suffix = XLABS_PROCESSORS.get((kind, processor))
    return SCHEME.group(f"{kind}_blocks.{block}.{suffix}") if suffix else None
