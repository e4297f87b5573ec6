"""Small module trees for family tests (no model needed)."""

from __future__ import annotations

from studio.bases import ModuleInfo, ModuleTree

SHAPES = {
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (32, 48),
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (32, 24),
    "unet.mid_block.attentions.0.proj_in": (40, 40, 1, 1),
    "unet.mid_block.resnets.0.conv1": (16, 8, 3, 3),
}


def tree(shapes=SHAPES) -> ModuleTree:
    return ModuleTree("test", {name: ModuleInfo("conv" if len(s) == 4 else "linear", tuple(s)) for name, s in shapes.items()})


ALL = ("to_q", "to_k", "proj_in", "conv1")
