"""Parse a LoRA file once into a `LoraAdapter`, validated against a base's module tree."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from studio.adapters.lora import LoraAdapter, LoraLayer
from studio.bases import ARCHITECTURES, ModuleTree, architecture_tree, module_tree
from studio.errors import BaseNotFoundError, FormatError, KeyMismatchError, UnsupportedVariantError
from studio.formats import keys as keyschemes
from studio.formats import lycoris, transformer_files
from studio.formats.safe import non_finite, safe_load

FORMAT_ONLY_METADATA = ("format", "lora_adapter_metadata")
SOURCE_FORMATS = {"loha": "lycoris-loha", "lokr": "lycoris-lokr"}


@dataclass
class RawLayer:
    """One layer as found in a file, before it is placed on a module."""

    stem: str
    variant: str
    parts: dict[str, Tensor]
    out_features: int = 0
    in_features: int = 0
    dense: tuple[Tensor, Tensor] | None = None  # LyCORIS dW as factors (left, right)


@dataclass
class Fit:
    """How a file's layers fit one module tree."""

    tree: ModuleTree
    placed: dict[str, str] = field(default_factory=dict)  # stem -> module
    wrong_shape: list[str] = field(default_factory=list)
    unplaced: list[str] = field(default_factory=list)

    @property
    def score(self) -> int:
        return len(self.placed) - len(self.wrong_shape)

    def summary(self, total: int) -> str:
        return (
            f"{len(self.placed)} of {total} layers match modules of {self.tree.label}, "
            f"{len(self.wrong_shape)} match a name with the wrong shape, {len(self.unplaced)} match no module"
        )


def _raw_layers(path: Path, fmt: str, tensors: dict[str, Tensor]) -> dict[str, RawLayer]:
    layers = {}
    for stem, parts in keyschemes.group_keys(fmt, list(tensors)).items():
        unknown = [tensors_key for part, tensors_key in parts.items() if part.startswith("unknown")]
        if unknown:
            raise FormatError(f"{path}: unknown keys for layer {stem!r}: {unknown[:3]}")
        named = {part: tensors[key] for part, key in parts.items()}
        variant = lycoris.variant_of(set(named))
        if variant.startswith("refused:"):
            raise UnsupportedVariantError(f"{path}: layer {stem!r} is {variant.removeprefix('refused:')}; not imported")
        layers[stem] = _shaped(path, RawLayer(stem, variant, named))
    return layers


def _shaped(path: Path, layer: RawLayer) -> RawLayer:
    """Fill in the layer's (out, in_flat), checking that its factors fit each other."""
    parts = layer.parts
    if layer.variant == "lora":
        if "down" not in parts or "up" not in parts:
            missing = "up" if "down" in parts else "down"
            raise FormatError(f"{path}: layer {layer.stem!r} has no {missing} weight")
        down, up = parts["down"], parts["up"]
        if down.dim() not in (2, 4) or up.dim() not in (2, 4) or down.shape[0] != up.shape[1]:
            raise FormatError(
                f"{path}: layer {layer.stem!r}: down {tuple(down.shape)} and up {tuple(up.shape)} do not fit "
                "(rank mismatch or wrong dimensions)"
            )
        layer.out_features, layer.in_features = int(up.shape[0]), int(down[0].numel())
        return layer
    try:
        layer.dense = lycoris.materialise(layer.variant, parts)
    except KeyError as error:
        raise FormatError(f"{path}: {layer.variant} layer {layer.stem!r} lacks tensor {error}") from error
    except RuntimeError as error:
        raise FormatError(f"{path}: {layer.variant} layer {layer.stem!r}: factors do not fit ({error})") from error
    layer.out_features, layer.in_features = int(layer.dense[0].shape[0]), int(layer.dense[1].shape[1])
    return layer


def fit(fmt: str, layers: dict[str, RawLayer], tree: ModuleTree) -> Fit:
    """Place each layer on a module of ``tree``, checking shapes."""
    result = Fit(tree)
    resolved = keyschemes.resolve_stems(fmt, list(layers), tree)
    for stem, layer in layers.items():
        module = resolved.get(stem)
        if module is None:
            result.unplaced.append(stem)
            continue
        shape = tree.modules[module].weight_shape
        if (shape[0], int(torch.Size(shape[1:]).numel())) == (layer.out_features, layer.in_features):
            result.placed[stem] = module
        else:
            result.wrong_shape.append(stem)
    return result


def candidate_trees() -> list[ModuleTree]:
    """Trees a base-less file is compared against: the embedded world and the real architectures."""
    trees = []
    try:
        trees.append(module_tree("world"))
    except BaseNotFoundError:
        pass
    return trees + [architecture_tree(arch) for arch in ARCHITECTURES]


def best_fit(fmt: str, layers: dict[str, RawLayer], trees: list[ModuleTree] | None = None) -> Fit:
    fits = [fit(fmt, layers, tree) for tree in (trees or candidate_trees())]
    return max(fits, key=lambda f: (f.score, -len(f.unplaced)))


def _check_fit(path: Path, fmt: str, layers: dict[str, RawLayer], chosen: Fit, explicit_base: bool) -> None:
    if chosen.placed and not chosen.wrong_shape:
        return
    likely = best_fit(fmt, layers)
    hint = ""
    if likely.tree.arch != chosen.tree.arch and likely.score > chosen.score:
        hint = f"; this LoRA looks like it is for {likely.tree.label} ({likely.summary(len(layers))})"
    base_text = f"the base is {chosen.tree.label}" if explicit_base else f"best guess {chosen.tree.label}"
    examples = (chosen.wrong_shape or chosen.unplaced)[:3]
    raise KeyMismatchError(
        f"{path}: {chosen.summary(len(layers))} ({base_text}){hint}; e.g. {examples}"
    )


def _diffusers_alphas(metadata: dict[str, str]) -> dict[str, dict]:
    """Per-component LoraConfig fields from diffusers' ``lora_adapter_metadata`` header entry."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        packed = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    per_component: dict[str, dict] = {}
    for key, value in packed.items():
        component, _, field_name = key.partition(".")
        per_component.setdefault(component, {})[field_name] = value
    return per_component


def _alpha_for(module: str, rank: int, parts: dict[str, Tensor], configs: dict[str, dict]) -> tuple[float, str]:
    if "alpha" in parts:
        alpha = parts["alpha"]
        if alpha.numel() != 1:
            raise FormatError(f"alpha of {module} has shape {tuple(alpha.shape)}, expected a scalar")
        return float(alpha.double()), "file"
    component, _, path = module.partition(".")
    config = configs.get(component)
    if config:
        for pattern, value in (config.get("alpha_pattern") or {}).items():
            if path == pattern or path.endswith("." + pattern):
                return float(value), "file"
        if "lora_alpha" in config:
            return float(config["lora_alpha"]), "file"
    return float(rank), "rank-default"


def _build_layer(layer: RawLayer, module: str, configs: dict, lycoris_rank: int) -> tuple[LoraLayer, float | None]:
    if layer.variant == "lora":
        rank = int(layer.parts["down"].shape[0])
        alpha, source = _alpha_for(module, rank, layer.parts, configs)
        return LoraLayer(layer.parts["down"], layer.parts["up"], alpha, source), None
    down, up, error = lycoris.truncate(layer.dense, lycoris_rank)
    return LoraLayer(down, up, float(down.shape[0]), "file"), error


def load_adapter(
    path: str | Path,
    base: str | ModuleTree | None = None,
    *,
    name: str | None = None,
    lycoris_rank: int = 16,
) -> LoraAdapter:
    """Read a LoRA file (kohya / A1111 / ComfyUI, diffusers, peft, LyCORIS LoHa / LoKr).

    Layers are placed on the module tree of ``base`` (a BASE string or a tree); without a base,
    the best-fitting known tree is used and named in ``adapter.base_arch``. Layers matching no
    module are skipped and listed in ``adapter.notes``; a file that fits no module, or whose
    names fit with wrong shapes (a LoRA for another base), is refused with a KeyMismatchError.
    """
    path = Path(path)
    tensors, metadata = safe_load(path)
    flagged = non_finite(tensors)
    if flagged:
        raise FormatError(f"{path}: {len(flagged)} tensors hold NaN or inf (fp16 overflow?), e.g. {flagged[:3]}")
    tree = module_tree(base) if isinstance(base, str) else base
    translated = transformer_files.translate(str(path), tensors, tree)  # FLUX.1 / SD3 layouts -> diffusers layout
    tensors = translated.tensors if translated is not None else tensors
    fmt = keyschemes.detect_format(list(tensors), str(path))
    layers = _raw_layers(path, fmt, tensors)
    chosen = best_fit(fmt, layers, tree.variants()) if tree is not None else best_fit(fmt, layers)
    _check_fit(path, fmt, layers, chosen, explicit_base=tree is not None)
    adapter = _assemble(path, fmt, layers, chosen, metadata, name, lycoris_rank)
    return transformer_files.finish(adapter, translated)


def _assemble(path: Path, fmt: str, layers: dict[str, RawLayer], chosen: Fit, metadata: dict[str, str], name: str | None, lycoris_rank: int) -> LoraAdapter:
    configs = _diffusers_alphas(metadata)
    lora_layers: dict[str, LoraLayer] = {}
    errors: dict[str, float] = {}
    for stem, module in chosen.placed.items():
        lora_layers[module], error = _build_layer(layers[stem], module, configs, lycoris_rank)
        if error is not None:
            errors[module] = error
    variants = {layers[stem].variant for stem in chosen.placed}
    source = next((SOURCE_FORMATS[v] for v in variants if v in SOURCE_FORMATS), fmt)
    adapter = LoraAdapter(
        name=name or path.stem,
        lora_layers=lora_layers,
        metadata={k: v for k, v in metadata.items() if k not in FORMAT_ONLY_METADATA},
        source_format=source,
        base_arch=chosen.tree.arch,
    )
    adapter.notes.extend(_notes(fmt, layers, chosen, lora_layers, errors, lycoris_rank))
    return adapter


def _notes(fmt, layers, chosen: Fit, lora_layers: dict[str, LoraLayer], errors: dict[str, float], lycoris_rank: int) -> list[str]:
    notes = []
    defaulted = [m for m, layer in lora_layers.items() if layer.alpha_source == "rank-default"]
    if defaulted and fmt == "kohya":
        notes.append(f"alpha missing in {len(defaulted)} layers: alpha = rank (scale 1) assumed")
    zero = [m for m, layer in lora_layers.items() if layer.alpha == 0]
    if zero:
        notes.append(f"alpha is 0 in {len(zero)} layers: they have no effect")
    if chosen.unplaced:
        notes.append(f"{len(chosen.unplaced)} layers match no module of {chosen.tree.label} and were skipped: {chosen.unplaced[:5]}")
    if errors:
        worst = max(errors.values())
        mean = sum(errors.values()) / len(errors)
        notes.append(f"LyCORIS layers materialised and truncated to rank {lycoris_rank}: relative error mean {mean:.2e}, max {worst:.2e}")
    return notes
