"""Key schemes of LoRA files, translated to (stem, part) pairs and then to module names.

This is the only place in the studio that knows other tools' key strings. A *stem* names one
layer in the file's own scheme (``lora_unet_down_blocks_0_..._to_q`` for kohya, a dotted
prefixed module path for diffusers/peft); a *part* is one of ``down``, ``up``, ``alpha``,
``mid`` or a LyCORIS / DoRA tensor name (``hada_w1_a``, ``lokr_w1``, ``dora_scale``, ...).
Kohya stems are mapped to module names through a table derived from the base's module tree.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Literal

from studio.bases import ModuleTree
from studio.errors import FormatError, UnsupportedVariantError
from studio.formats.sgm import sgm_path, sgm_table

FileFormat = Literal["kohya", "diffusers", "diffusers-old", "peft"]

KOHYA_PREFIXES = {"lora_unet": "unet", "lora_te": "text_encoder", "lora_te1": "text_encoder", "lora_te2": "text_encoder_2"}
KOHYA_PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha", "lora_mid.weight": "mid"}
LYCORIS_PARTS = {
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
    "dora_scale", "diff", "diff_b", "w_norm", "b_norm", "oft_blocks", "oft_diag",
}
CLIP_ROOTS = ("encoder.layers.", "embeddings.", "final_layer_norm")
SAFELORAS = re.compile(r"^(unet|text_encoder):\d+:(up|down)$")


def detect_format(keys: list[str], path: str) -> FileFormat:
    """Name the key scheme of a file, or raise naming what was found."""
    if not keys:
        raise FormatError(f"{path}: the file holds no tensors")
    if any(SAFELORAS.match(key) for key in keys):
        raise UnsupportedVariantError(
            f"{path}: cloneofsimo 'safeloras' layout (keys like 'unet:0:down'): layers are stored by module "
            "order, not by name, so they cannot be placed reliably; re-export it with a kohya or diffusers tool"
        )
    if any(key.startswith(tuple(f"{p}_" for p in KOHYA_PREFIXES)) for key in keys):
        return "kohya"
    if any(key.startswith("base_model.model.") for key in keys):
        return "peft"
    if any(".lora_A." in key or ".lora_B." in key for key in keys):
        return "diffusers"
    if any(re.search(r"(\.lora\.|_lora\.|\.lora_linear_layer\.)(down|up)\.weight$", key) for key in keys):
        return "diffusers-old"
    raise FormatError(f"{path}: no LoRA key scheme recognised (kohya, diffusers, peft); first keys: {keys[:3]}")


def _kohya_split(key: str) -> tuple[str, str]:
    stem, _, part = key.partition(".")
    if part == "weight" and stem.endswith(("_lora_down", "_lora_up")):  # hand-made "x_lora_down.weight"
        stem, _, which = stem.rpartition("_lora_")
        part = f"lora_{which}.weight"
    if part in KOHYA_PARTS:
        return stem, KOHYA_PARTS[part]
    if part in LYCORIS_PARTS:
        return stem, part
    return stem, f"unknown:{part}"


def _diffusers_split(key: str) -> tuple[str, str]:
    match = re.match(r"^(.*)\.lora_([AB])(?:\.[A-Za-z0-9_]+)?\.weight$", key)
    if match:
        return match.group(1), "down" if match.group(2) == "A" else "up"
    if key.endswith(".alpha"):
        return key[: -len(".alpha")], "alpha"
    return key, "unknown"


def _old_diffusers_split(key: str) -> tuple[str, str]:
    match = re.match(r"^(.*)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$", key)
    if match:
        module = match.group(2) + (".0" if match.group(2) == "to_out" else "")
        return f"{match.group(1)}.{module}", match.group(3)
    match = re.match(r"^(.*)\.(?:lora|lora_linear_layer)\.(down|up)\.weight$", key)
    if match:
        return match.group(1), match.group(2)
    if key.endswith(".alpha"):
        return key[: -len(".alpha")], "alpha"
    return key, "unknown"


def _with_component(stem: str) -> str:
    """Give an unprefixed dotted module path its component prefix."""
    if stem.startswith(("unet.", "transformer.", "text_encoder.", "text_encoder_2.", "text_encoder_3.")):
        return stem
    return ("text_encoder." if stem.startswith("text_model.") else "unet.") + stem


def group_keys(fmt: FileFormat, keys: list[str]) -> dict[str, dict[str, str]]:
    """Group a file's keys per layer: ``{stem: {part: key}}``."""
    groups: dict[str, dict[str, str]] = defaultdict(dict)
    for key in keys:
        if fmt == "kohya":
            stem, part = _kohya_split(key)
        elif fmt == "peft":
            stem, part = _diffusers_split(key.removeprefix("base_model.model."))
            stem = _with_component(stem)
        elif fmt == "diffusers":
            stem, part = _diffusers_split(key)
            stem = _with_component(stem)
        else:
            stem, part = _old_diffusers_split(key)
            stem = _with_component(stem)
        groups[stem][part] = key
    return dict(groups)


def kohya_prefix(component: str, has_second_encoder: bool) -> str:
    if component == "unet":
        return "lora_unet"
    if component == "text_encoder_2":
        return "lora_te2"
    return "lora_te1" if has_second_encoder else "lora_te"


def kohya_name(module: str, has_second_encoder: bool) -> str:
    """The kohya stem of a prefixed module name: prefix + path with dots as underscores."""
    component, _, path = module.partition(".")
    return f"{kohya_prefix(component, has_second_encoder)}_{path.replace('.', '_')}"


def file_module_name(module: str) -> str:
    """A module's name as files write it.

    transformers 5 dropped CLIP's ``text_model.`` level from module paths; every LoRA file (kohya,
    diffusers, peft) still names text-encoder layers ``text_model.encoder.layers...``.
    """
    component, _, path = module.partition(".")
    if component.startswith("text_encoder") and path.startswith(CLIP_ROOTS):  # not T5 (encoder.block...)
        return f"{component}.text_model.{path}"
    return module  # text_projection sits beside text_model, not inside it


def file_names(tree: ModuleTree) -> dict[str, str]:
    """Dotted file name -> module name, for every module of the tree (both spellings accepted)."""
    table = {module: module for module in tree.modules}
    table.update({file_module_name(module): module for module in tree.modules})
    return table


def kohya_table(tree: ModuleTree) -> dict[str, str]:
    """kohya stem -> module name, derived from the tree.

    Both ``lora_te`` and ``lora_te1`` are accepted, and UNet modules under their diffusers names
    and their original SGM names (kohya's SDXL files, A1111-style compvis names).
    """
    has_second = "text_encoder_2" in tree.components
    table = {}
    for file_name, module in file_names(tree).items():
        table[kohya_name(file_name, has_second)] = module
        if file_name.startswith("text_encoder."):
            table[kohya_name(file_name, not has_second)] = module
    unet = [m.removeprefix("unet.") for m in tree.modules if m.startswith("unet.")]
    for path, sgm in sgm_table(unet, tree.unet_config).items():
        table.setdefault(f"lora_unet_{sgm.replace('.', '_')}", f"unet.{path}")
    return table


def kohya_stem(module: str, has_second_encoder: bool, unet_config: dict | None = None) -> str:
    """The stem kohya writes for a module: SGM names for the UNet when ``unet_config`` is given (SDXL)."""
    component, _, path = module.partition(".")
    if component == "unet" and unet_config is not None:
        sgm = sgm_path(path, unet_config)
        if sgm is not None:
            return f"lora_unet_{sgm.replace('.', '_')}"
    return kohya_name(file_module_name(module), has_second_encoder)


def resolve_stems(fmt: FileFormat, stems: list[str], tree: ModuleTree) -> dict[str, str]:
    """Map each stem that names a module of ``tree`` to that module; others are left out."""
    if fmt != "kohya":
        names = file_names(tree)
        return {stem: names[stem] for stem in stems if stem in names}
    table = kohya_table(tree)
    resolved = {}
    for stem in stems:
        candidate = stem
        if candidate not in table:  # hand-made files repeat the component: lora_unet_unet_...
            candidate = re.sub(r"^(lora_unet)_unet_", r"\1_", candidate)
        if candidate in table:
            resolved[stem] = table[candidate]
    return resolved
