"""FLUX.1 and SD3 LoRA files <-> the studio's diffusers-named layers.

Read: a file in one of the transformer layouts is translated, before the generic reader sees it,
into diffusers-layout tensors (``transformer.<module>.lora_A.weight`` / ``.lora_B.weight`` /
``.alpha``), fused layers split exactly into their pieces (`studio.formats.fused`):
- kohya sd-scripts (``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight``, ``lora_te1_``,
  ``lora_te3_`` for FLUX's T5; SD3: ``lora_unet_joint_blocks_0_x_block_attn_qkv``, ``lora_te1/2/3``),
- ComfyUI (the same BFL / SAI names, dotted, under ``diffusion_model.``, ``lora_down`` or ``lora_A``),
- XLabs (``double_blocks.0.processor.qkv_lora1.down.weight``; no alpha: scale 1),
- ai-toolkit's older kohya-like layout (``lora_transformer_<diffusers path>``),
- diffusers / peft / ai-toolkit / SimpleTuner (``transformer.`` prefix, also without it or under
  ``base_model.model.``): only the prefix is normalised.
Layers whose names fit no module are passed on under their own name, so the reader lists them
as unplaced (or refuses the file when nothing fits). Write: `kohya_state_dict` merges the pieces
back into BFL / SAI names (exact; see `fused.merge`).
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from studio.errors import FormatError, UnsupportedVariantError
from studio.formats import flux_keys, sd3_keys
from studio.formats.original_names import Group, NameScheme

if TYPE_CHECKING:  # torch and the fused-layer math are imported where a transformer file is translated
    from torch import Tensor

    from studio.formats import fused

SCHEMES: dict[str, NameScheme] = {"flux1": flux_keys.SCHEME, "sd3": sd3_keys.SCHEME}
TRANSFORMER_ROOTS = (
    "transformer_blocks.", "single_transformer_blocks.", "x_embedder.", "context_embedder.", "time_text_embed.",
    "norm_out.", "proj_out.", "pos_embed.",
)
KOHYA_PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "lora_A.weight": "down", "lora_B.weight": "up", "alpha": "alpha"}
COMFY_ENCODERS = {
    "flux1": {"clip_l": "text_encoder", "t5xxl": "text_encoder_2"},
    "sd3": {"clip_l": "text_encoder", "clip_g": "text_encoder_2", "t5xxl": "text_encoder_3"},
}
DEFAULT_TREES = {"flux1": "flux1", "sd3": "sd3"}


@dataclass
class Translation:
    """A file's tensors in diffusers layout, the layout it came in, and what reading it had to state."""

    tensors: dict[str, Tensor]
    source: str
    family: str | None
    notes: list[str] = field(default_factory=list)


def _normalise_prefixes(tensors: dict[str, Tensor]) -> dict[str, Tensor] | None:
    """Give unprefixed / peft-prefixed transformer keys the ``transformer.`` prefix; None if none needed it."""
    renamed, changed = {}, False
    for key, value in tensors.items():
        bare = key.removeprefix("base_model.model.")
        if bare.startswith(TRANSFORMER_ROOTS) and (".lora_" in bare or bare.endswith(".alpha")):
            key, changed = f"transformer.{bare}", True
        if key.startswith("transformer.") and (key.endswith(".lora_down.weight") or key.endswith(".lora_up.weight")):
            key, changed = key.replace(".lora_down.weight", ".lora_A.weight").replace(".lora_up.weight", ".lora_B.weight"), True
        renamed[key] = value
    return renamed if changed else None


def detect_layout(keys: list[str]) -> tuple[str, str | None] | None:
    """(layout, family) of a transformer LoRA file, or None when the keys are not one of them."""
    checks = (
        ("kohya", "flux1", flux_keys.KOHYA_STEM), ("kohya", "sd3", sd3_keys.KOHYA_STEM),
        ("comfyui", "flux1", flux_keys.COMFY_KEY), ("comfyui", "sd3", sd3_keys.COMFY_KEY),
        ("xlabs", "flux1", flux_keys.XLABS_KEY), ("ai-toolkit", None, re.compile(r"^lora_transformer_")),
    )
    for layout, family, pattern in checks:
        if any(pattern.search(key) for key in keys):
            return layout, family
    return None


def _split_key(key: str, layout: str) -> tuple[str, str]:
    """(stem, part) of a kohya / ComfyUI / ai-toolkit key; part is down, up, alpha or ``other:<name>``."""
    if layout == "xlabs":
        match = flux_keys.XLABS_KEY.match(key)
        if match is None:
            return key, f"other:{key}"
        return f"{match.group(1)}|{match.group(2)}|{match.group(3)}", match.group(4)
    for suffix, part in KOHYA_PARTS.items():
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], part
    stem, _, part = key.partition(".") if layout != "comfyui" else key.rpartition(".")
    return stem, f"other:{part}"


def _grouped(path: str, tensors: dict[str, Tensor], layout: str) -> dict[str, dict[str, Tensor]]:
    groups: dict[str, dict[str, Tensor]] = defaultdict(dict)
    for key, value in tensors.items():
        stem, part = _split_key(key, layout)
        if part.startswith("other:"):
            raise UnsupportedVariantError(
                f"{path}: layer {stem!r} has tensor {part.removeprefix('other:')!r}: only plain LoRA (down / up / alpha) is "
                "read for FLUX.1 / SD3 files (LyCORIS, DoRA and bias diffs are not converted)"
            )
        groups[stem][part] = value
    return dict(groups)


def translate(path: str, tensors: dict[str, Tensor], tree) -> Translation | None:
    """Translate a FLUX.1 / SD3 file to diffusers layout, or None when it is not a transformer layout."""
    detected = detect_layout(list(tensors))
    if detected is None:
        renamed = _normalise_prefixes(tensors)
        return None if renamed is None else Translation(renamed, "diffusers", None)
    layout, family = detected
    te_tree = _tree_for(family, tree)
    family = family or te_tree.family
    translator = _Translator(path, layout, family, te_tree)
    for stem, parts in _grouped(path, tensors, layout).items():
        translator.add(stem, parts)
    return translator.result()


def finish(adapter, translated: Translation | None):
    """Name the layout a translated file came in and put its notes first."""
    if translated is not None:
        adapter.source_format = translated.source
        adapter.notes[:0] = translated.notes
    return adapter


def _tree_for(family: str | None, tree):
    """The tree whose names resolve text-encoder (and ai-toolkit) stems: the base's, or the family's default."""
    from studio.bases import architecture_tree

    if tree is not None and tree.family in SCHEMES and (family is None or tree.family == family):
        return tree
    return architecture_tree(DEFAULT_TREES[family or "flux1"])


def encoder_table(tree, family: str) -> dict[str, str]:
    """kohya / ai-toolkit stem -> module, for the tree's text encoders and (``lora_transformer_``) transformer."""
    from studio.bases import BASES
    from studio.formats.keys import file_module_name

    prefixes = BASES[family].kohya_prefixes
    table = {}
    for module in tree.modules:
        component, _, path = module.partition(".")
        spellings = {path, file_module_name(module).partition(".")[2]}
        for spelled in spellings:
            underscored = spelled.replace(".", "_")
            if component == "transformer":
                table[f"lora_transformer_{underscored}"] = module
            elif component in prefixes:
                table[f"{prefixes[component]}_{underscored}"] = module
                if component == "text_encoder":  # diffusers' converter also takes lora_te_ for FLUX's CLIP
                    table[f"lora_te_{underscored}"] = module
    return table


class _Translator:
    """Collects one file's layers in diffusers layout (see `translate`)."""

    def __init__(self, path: str, layout: str, family: str, tree) -> None:
        self.path, self.layout, self.family = path, layout, family
        self.scheme = SCHEMES[family]
        self.tree = tree
        self.table = encoder_table(tree, family)
        self.out: dict[str, Tensor] = {}
        self.counts: dict[str, int] = defaultdict(int)

    def add(self, stem: str, parts: dict[str, Tensor]) -> None:
        from studio.formats import fused

        if "down" not in parts or "up" not in parts:
            missing = "up" if "down" in parts else "down"
            raise FormatError(f"{self.path}: layer {stem!r} has no {missing} weight")
        alpha = float(parts["alpha"].double()) if "alpha" in parts else None
        if alpha is None:
            self.counts["no_alpha"] += 1
        group = self._group(stem)
        if group is not None:
            self._add_group(stem, group, parts["down"], parts["up"], alpha)
            return
        module = self._encoder_module(stem) or self._unplaced_name(stem)
        self._emit(module, fused.Piece(parts["down"], parts["up"], alpha))

    @staticmethod
    def _unplaced_name(stem: str) -> str:
        """A name that places nowhere but tells the reader's note which file layer it was."""
        component = "text_encoder" if stem.startswith(("lora_te", "text_encoders.")) else "transformer"
        return f"{component}.{stem.replace('.', '_')}"

    def _group(self, stem: str) -> Group | None:
        if self.layout == "xlabs":
            kind, block, processor = stem.split("|")
            group = flux_keys.xlabs_group(kind, block, processor)
            if group is None:
                raise FormatError(f"{self.path}: XLabs processor {processor!r} in {kind}_blocks.{block} is not one diffusers converts")
            return group
        if self.layout == "kohya" and stem.startswith("lora_unet_"):
            dotted = self.scheme.dotted(stem.removeprefix("lora_unet_"))
            return self.scheme.group(dotted) if dotted else None
        if self.layout == "comfyui" and stem.startswith("diffusion_model."):
            return self.scheme.group(stem.removeprefix("diffusion_model."))
        return None

    def _encoder_module(self, stem: str) -> str | None:
        if stem in self.table:
            return self.table[stem]
        match = re.match(r"^text_encoders\.(\w+)\.transformer\.(.+)$", stem)
        component = COMFY_ENCODERS[self.family].get(match.group(1)) if match else None
        if component is None:
            return None
        from studio.formats.keys import file_names

        return file_names(self.tree).get(f"{component}.{match.group(2)}")

    def _add_group(self, stem: str, group: Group, down: Tensor, up: Tensor, alpha: float | None) -> None:
        from studio.formats import fused

        try:
            dims = group.dims(int(up.shape[0]), int(down[0].numel()))
            pieces = fused.split(down, up, alpha, dims) if len(dims) > 1 else [fused.Piece(down, up, alpha)]
        except ValueError as error:
            raise FormatError(f"{self.path}: layer {stem!r} ({group.original}): {error}") from error
        if len(pieces) > 1:
            self.counts["split"] += 1
            self.counts["sparse"] += int(pieces[0].rank != down.shape[0])
        if self.scheme.swapped(group.original, int(up.shape[0]), int(down[0].numel())):
            pieces = [fused.Piece(p.down, fused.swap_halves(p.up), p.alpha) for p in pieces]
        for piece_path, piece in zip(group.pieces, pieces):
            self._emit(f"transformer.{piece_path}", piece)

    def _emit(self, module: str, piece: fused.Piece) -> None:
        import torch

        if f"{module}.lora_A.weight" in self.out:
            raise FormatError(f"{self.path}: two layers of the file map onto {module}")
        self.out[f"{module}.lora_A.weight"] = piece.down
        self.out[f"{module}.lora_B.weight"] = piece.up
        if piece.alpha is not None:
            self.out[f"{module}.alpha"] = torch.tensor(piece.alpha, dtype=torch.float64)

    def result(self) -> Translation:
        notes = []
        if self.counts["split"]:
            sparse = f" ({self.counts['sparse']} stored block-diagonal, split qkv)" if self.counts["sparse"] else ""
            notes.append(f"{self.counts['split']} fused layers (qkv / linear1) split exactly into their diffusers modules{sparse}")
        if self.counts["no_alpha"]:
            why = "XLabs files carry no alpha" if self.layout == "xlabs" else "alpha missing"
            notes.append(f"{why} in {self.counts['no_alpha']} layers: alpha = rank (scale 1) assumed")
        return Translation(self.out, "kohya" if self.layout == "kohya" else self.layout, self.family, notes)


def adapter_family(adapter) -> str | None:
    """``flux1`` / ``sd3`` for an adapter on a transformer base, None for UNet bases."""
    from studio.bases import family_of

    if not any(module.startswith("transformer.") for module in adapter.lora_layers):
        return None
    family = family_of(adapter.base_arch or "")
    if family in SCHEMES:
        return family
    if any(".single_transformer_blocks." in m or ".guidance_embedder." in m for m in adapter.lora_layers):
        return "flux1"
    if any(".attn2." in m or ".pos_embed." in m for m in adapter.lora_layers):
        return "sd3"
    raise FormatError(f"adapter {adapter.name!r}: its base ({adapter.base_arch or 'unknown'}) does not say whether it is FLUX.1 or SD3")


def _dims(group: Group, pieces: list[fused.Piece | None]) -> list[int]:
    """Rows of every piece of a group; a missing piece's rows follow from a present one's width."""
    present = next(p for p in pieces if p is not None)
    hidden = int(present.down[0].numel())
    mlp = 4 * hidden  # FLUX.1 single blocks: mlp_ratio 4 (fixed in diffusers' FluxSingleTransformerBlock)
    return [int(p.up.shape[0]) if p is not None else (hidden if i < 3 else mlp) for i, p in enumerate(pieces)]


def _grouped_layers(adapter, scheme: NameScheme) -> tuple[dict[str, tuple[Group, list]], dict[str, str]]:
    from studio.formats import fused

    groups: dict[str, tuple[Group, list]] = {}
    encoders: dict[str, str] = {}
    for module, layer in adapter.lora_layers.items():
        component, _, path = module.partition(".")
        if component != "transformer":
            encoders[module] = component
            continue
        located = scheme.locate(path)
        if located is None:
            raise FormatError(f"adapter {adapter.name!r}: module {module} has no name in the {scheme.family} kohya layout")
        group, index = located
        entry = groups.setdefault(group.original, (group, [None] * len(group.pieces)))
        entry[1][index] = fused.Piece(layer.down, layer.up, layer.alpha)
    return groups, encoders


def kohya_state_dict(adapter, family: str) -> dict[str, Tensor]:
    """kohya sd-scripts keys for a FLUX.1 / SD3 adapter: BFL / SAI names, fused layers merged back."""
    from studio.bases import BASES
    from studio.formats import fused
    from studio.formats.keys import file_module_name

    scheme = SCHEMES[family]
    groups, encoders = _grouped_layers(adapter, scheme)
    tensors: dict[str, Tensor] = {}
    for original, (group, pieces) in groups.items():
        dims = _dims(group, pieces)
        merged = fused.merge(pieces, dims) if len(pieces) > 1 else pieces[0]
        up = fused.swap_halves(merged.up) if scheme.swapped(original, sum(dims), int(merged.down[0].numel())) else merged.up
        _put(tensors, "lora_unet_" + original.replace(".", "_"), merged.down, up, merged.alpha)
    prefixes = BASES[family].kohya_prefixes
    for module, component in encoders.items():
        if component not in prefixes:
            raise FormatError(f"adapter {adapter.name!r}: component {component} has no kohya prefix for {family}")
        layer = adapter.lora_layers[module]
        stem = f"{prefixes[component]}_{file_module_name(module).partition('.')[2].replace('.', '_')}"
        _put(tensors, stem, layer.down, layer.up, layer.alpha)
    return tensors


def _put(tensors: dict[str, Tensor], stem: str, down: Tensor, up: Tensor, alpha: float | None) -> None:
    import torch

    tensors[f"{stem}.lora_down.weight"] = down
    tensors[f"{stem}.lora_up.weight"] = up
    tensors[f"{stem}.alpha"] = torch.tensor(float(alpha if alpha is not None else down.shape[0]), dtype=torch.float32)
