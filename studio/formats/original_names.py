"""Original (BFL / SAI) module names of transformer denoisers <-> diffusers module names.

kohya sd-scripts, ComfyUI and XLabs name FLUX.1 and SD3 layers as the reference code does
(``double_blocks.0.img_attn.qkv``, ``joint_blocks.0.x_block.attn.qkv``), where one fused Linear
holds several diffusers modules (``attn.to_q``, ``attn.to_k``, ``attn.to_v``). A `NameScheme` holds
one family's tables (in `flux_keys` and `sd3_keys`) and answers both directions: the `Group` of
diffusers modules an original name stands for, and where a diffusers module sits in its group.
The tables follow diffusers' own single-file converters (``convert_flux_transformer_checkpoint_to_diffusers``,
``convert_sd3_transformer_checkpoint_to_diffusers``); tests check them against those converters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

BlockTable = dict[str, tuple[str, ...]]  # original suffix in a block -> diffusers pieces (suffixes)


@dataclass(frozen=True)
class Group:
    """The diffusers modules (paths inside the transformer) one original module stands for."""

    original: str
    pieces: tuple[str, ...]

    def dims(self, out_rows: int, in_features: int) -> list[int]:
        """Rows of each piece in the fused output: equal thirds for q/k/v, then the MLP's rest."""
        n = len(self.pieces)
        if n == 1:
            return [out_rows]
        if n == 3:
            if out_rows % 3:
                raise ValueError(f"{self.original}: {out_rows} rows do not split into q, k, v")
            return [out_rows // 3] * 3
        return [in_features] * 3 + [out_rows - 3 * in_features]


@dataclass(frozen=True)
class NameScheme:
    """One family's original names: per-block tables, top-level names and swapped outputs."""

    family: str
    blocks: tuple[tuple[str, str, BlockTable], ...]  # (original block list, diffusers block list, table)
    top: dict[str, str]  # original path -> diffusers path, outside the blocks
    swapped: Callable[[str, int, int], bool]  # (original, out_rows, in_features) -> rows stored as (shift, scale)
    _reverse: dict = field(default_factory=dict, compare=False, repr=False)

    def group(self, original: str) -> Group | None:
        """The group of a dotted original name, or None when the name is not this family's."""
        if original in self.top:
            return Group(original, (self.top[original],))
        for block, diffusers_block, table in self.blocks:
            match = re.fullmatch(rf"{block}\.(\d+)\.(.+)", original)
            if match and match.group(2) in table:
                prefix = f"{diffusers_block}.{match.group(1)}."
                return Group(original, tuple(prefix + piece for piece in table[match.group(2)]))
        return None

    def dotted(self, underscored: str) -> str | None:
        """A kohya-style name (dots as underscores) back to the dotted original, if it is one."""
        for name in self.top:
            if name.replace(".", "_") == underscored:
                return name
        for block, _, table in self.blocks:
            match = re.fullmatch(rf"{block}_(\d+)_(.+)", underscored)
            if not match:
                continue
            for suffix in table:
                if suffix.replace(".", "_") == match.group(2):
                    return f"{block}.{match.group(1)}.{suffix}"
        return None

    def locate(self, path: str) -> tuple[Group, int] | None:
        """The group a diffusers module path belongs to and its index in the group."""
        for original, diffusers_path in self.top.items():
            if diffusers_path == path:
                return Group(original, (path,)), 0
        for block, diffusers_block, table in self.blocks:
            match = re.fullmatch(rf"{diffusers_block}\.(\d+)\.(.+)", path)
            if not match:
                continue
            for suffix, pieces in table.items():
                if match.group(2) in pieces:
                    group = self.group(f"{block}.{match.group(1)}.{suffix}")
                    return group, pieces.index(match.group(2))
        return None
