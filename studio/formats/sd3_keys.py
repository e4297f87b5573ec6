"""SD3 / SD3.5 names: SAI's MMDiT module names (kohya sd-scripts ``lora_sd3``, ComfyUI).

``joint_blocks.N.x_block`` is the image stream of diffusers ``transformer_blocks.N``,
``context_block`` its text stream; ``attn.qkv`` is fused (``attn.to_q / to_k / to_v`` or
``attn.add_q_proj / add_k_proj / add_v_proj``), SD3.5 Medium adds ``x_block.attn2``. The last
block's text stream is "pre only": its ``adaLN_modulation.1`` has 2 x width rows stored as
(shift, scale), like ``final_layer.adaLN_modulation.1``, where diffusers stores (scale, shift).
"""

from __future__ import annotations

import re

from studio.formats.original_names import NameScheme

JOINT = {
    "x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "x_block.attn.proj": ("attn.to_out.0",),
    "context_block.attn.proj": ("attn.to_add_out",),
    "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
    "x_block.attn2.proj": ("attn2.to_out.0",),
    "x_block.mlp.fc1": ("ff.net.0.proj",),
    "x_block.mlp.fc2": ("ff.net.2",),
    "context_block.mlp.fc1": ("ff_context.net.0.proj",),
    "context_block.mlp.fc2": ("ff_context.net.2",),
    "x_block.adaLN_modulation.1": ("norm1.linear",),
    "context_block.adaLN_modulation.1": ("norm1_context.linear",),
}
TOP = {
    "x_embedder.proj": "pos_embed.proj",
    "context_embedder": "context_embedder",
    "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
    "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
    "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}


def _swapped(original: str, out_rows: int, in_features: int) -> bool:
    if original == "final_layer.adaLN_modulation.1":
        return True
    return original.endswith("context_block.adaLN_modulation.1") and out_rows == 2 * in_features


SCHEME = NameScheme(family="sd3", blocks=(("joint_blocks", "transformer_blocks", JOINT),), top=TOP, swapped=_swapped)

KOHYA_STEM = re.compile(r"^lora_unet_(joint_blocks|x_embedder|t_embedder|y_embedder)")
COMFY_KEY = re.compile(r"^diffusion_model\.(joint_blocks|x_embedder|t_embedder|y_embedder)\.")
