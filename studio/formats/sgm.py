"""The original (SGM / LDM) names of UNet modules, which kohya's SDXL files, A1111 and ComfyUI use.

kohya sd-scripts trains SDXL on its own LDM-layout UNet (``library/sdxl_original_unet.py``), so its
SDXL LoRA names are ``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``,
``lora_unet_input_blocks_1_0_in_layers_2`` (a resnet's conv1) and so on; SD1.x files use diffusers
names. The table is the one of kohya's ``sdxl_model_util`` / diffusers' original-checkpoint
conversion, derived here from the UNet config (levels, layers per block, which blocks attend):

- ``down_blocks.i.{resnets,attentions}.j`` -> ``input_blocks.(L+1)i+j+1.{0,1}``, a downsampler ->
  ``input_blocks.(L+1)(i+1).0.op``; ``mid_block`` -> ``middle_block.{0,1,2}``;
- ``up_blocks.i.{resnets,attentions}.j`` -> ``output_blocks.(L+1)i+j.{0,1}``, an upsampler ->
  ``output_blocks.(L+1)i+L.{1 or 2}.conv`` (2 when the block attends);
- inside a resnet ``conv1/conv2/time_emb_proj/conv_shortcut`` -> ``in_layers.2/out_layers.3/
  emb_layers.1/skip_connection``; ``conv_in`` -> ``input_blocks.0.0``, ``conv_out`` -> ``out.2``,
  ``time_embedding.linear_{1,2}`` -> ``time_embed.{0,2}``, ``add_embedding.linear_{1,2}`` ->
  ``label_emb.0.{0,2}``. Attention internals keep their names.
"""

from __future__ import annotations

import re

RESNET_PARTS = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
                "conv_shortcut": "skip_connection", "norm1": "in_layers.0", "norm2": "out_layers.0"}
TOP_LEVEL = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
             "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0"}
BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)(?:\.(.*))?$")
MID = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)(?:\.(.*))?$")


def _layers_per_block(config: dict) -> int | None:
    value = config.get("layers_per_block", 2)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _attends(config: dict, kind: str, index: int) -> bool:
    types = config.get(f"{kind}_block_types") or ()
    return index < len(types) and "CrossAttn" in str(types[index])


def _inner(kind: str, rest: str | None) -> str:
    if rest is None:
        return ""
    if kind == "resnets":
        head, dot, tail = rest.partition(".")
        return "." + RESNET_PARTS.get(head, head) + (dot + tail if dot else "")
    return "." + rest


def sgm_path(path: str, config: dict) -> str | None:
    """The SGM name of a diffusers UNet module path (no ``unet.`` prefix), or None if it has none."""
    lpb = _layers_per_block(config)
    if lpb is None:
        return None
    if path in TOP_LEVEL:
        return TOP_LEVEL[path]
    match = MID.match(path)
    if match:
        kind, j, rest = match.group(1), int(match.group(2)), match.group(3)
        return f"middle_block.{1 if kind == 'attentions' else 2 * j}{_inner(kind, rest)}"
    match = BLOCK.match(path)
    if not match:
        return None
    side, i, kind, j, rest = match.group(1), int(match.group(2)), match.group(3), int(match.group(4)), match.group(5)
    if side == "down_blocks":
        if kind == "downsamplers":
            return f"input_blocks.{(lpb + 1) * (i + 1)}.0.op" if rest == "conv" else None
        return f"input_blocks.{(lpb + 1) * i + j + 1}.{1 if kind == 'attentions' else 0}{_inner(kind, rest)}"
    if kind == "upsamplers":
        return f"output_blocks.{(lpb + 1) * i + lpb}.{2 if _attends(config, 'up', i) else 1}.conv" if rest == "conv" else None
    if kind == "downsamplers":
        return None
    return f"output_blocks.{(lpb + 1) * i + j}.{1 if kind == 'attentions' else 0}{_inner(kind, rest)}"


def sgm_table(unet_paths: list[str], config: dict) -> dict[str, str]:
    """diffusers UNet module path -> SGM path, for every path that has one."""
    table = {}
    for path in unet_paths:
        name = sgm_path(path, config)
        if name is not None:
            table[path] = name
    return table
