"""Parse a LoRA file once into a `LoraAdapter`, validated against a base's module tree."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from studio.bases import ARCHITECTURES, ModuleTree, architecture_tree, module_tree
from studio.errors import BaseNotFoundError, FormatError, KeyMismatchError, StudioError, UnsupportedVariantError
from studio.formats import keys as keyschemes
from studio.formats import transformer_files
from studio.formats.configs import AdapterConfig, component_configs
from studio.formats.safe import FINITE_BYTES, finite_bytes, safe_load_screened

if TYPE_CHECKING:  # torch-bound modules are imported where tensors are built, not with this module
    from torch import Tensor

    from studio.adapters.lora import LoraAdapter, LoraLayer

FORMAT_ONLY_METADATA = ("format", "lora_adapter_metadata", "sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256")
LYCORIS_TARGET = 0.01  # LoHa / LoKr -> LoRA: smallest rank whose relative error is at most 1% ...
LYCORIS_MAX_RANK = 256  # ... but never above this rank
SOURCE_FORMATS = {"loha": "lycoris-loha", "lokr": "lycoris-lokr"}
# Files the studio itself writes, read by the room that writes them ("module:function", imported when
# such a file is opened; the function takes (path, base, name) and returns a LoraAdapter or raises).
STUDIO_FILES = {
    "trained-adapter/1": "studio.train.native:read_as_lora",
    "studio.eigenlora-collection": "studio.subspace.collection:refuse_as_lora",
}


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
    from studio.formats import lycoris

    layers = {}
    for stem, parts in keyschemes.group_keys(fmt, list(tensors)).items():
        unknown = [tensors_key for part, tensors_key in parts.items() if part.startswith("unknown")]
        if unknown:
            raise FormatError(f"{path}: unknown keys for layer {stem!r}: {unknown[:3]}")
        named = {part: tensors[key] for part, key in parts.items()}
        variant = lycoris.variant_of(set(named))
        if variant.startswith("refused:"):
            raise UnsupportedVariantError(f"{path}: layer {stem!r} is {variant.removeprefix('refused:')}; not imported")
        try:
            layers[stem] = _shaped(RawLayer(stem, variant, named))
        except FormatError as error:  # the shape checks name the tensor; the file and layer are added here
            raise type(error)(f"{path}: {variant} layer {stem!r}: {error}") from error
    return layers


def _check_alpha(parts: dict[str, Tensor]) -> None:
    alpha = parts.get("alpha")
    if alpha is not None and alpha.numel() != 1:
        raise FormatError(f"alpha has shape {tuple(alpha.shape)}, expected a scalar")


def _shaped(layer: RawLayer) -> RawLayer:
    """Fill in the layer's (out, in_flat) from shapes alone, checking that its factors fit each other.

    Nothing is multiplied here: LyCORIS layers are materialised only once they are placed on a
    module whose weight has the same shape (so dW is never larger than that weight).
    """
    parts = layer.parts
    _check_alpha(parts)
    if layer.variant != "lora":
        from studio.formats import lycoris

        layer.out_features, layer.in_features = lycoris.dense_shape(layer.variant, parts)
        return layer
    if "down" not in parts or "up" not in parts:
        raise FormatError(f"has no {'up' if 'down' in parts else 'down'} weight")
    down, up = parts["down"], parts["up"]
    if not down.is_floating_point() or not up.is_floating_point():
        raise FormatError(f"down ({down.dtype}) and up ({up.dtype}) must be floating-point tensors")
    if down.dim() not in (2, 4) or up.dim() not in (2, 4) or down.shape[0] != up.shape[1]:
        raise FormatError(f"down {tuple(down.shape)} and up {tuple(up.shape)} do not fit (rank mismatch or wrong dimensions)")
    if down.shape[0] == 0 or down.numel() == 0 or up.numel() == 0:
        raise FormatError(f"down {tuple(down.shape)} / up {tuple(up.shape)}: rank 0 or an empty factor")
    if up.dim() == 4 and tuple(up.shape[2:]) != (1, 1):
        raise FormatError(f"conv up {tuple(up.shape)} must be 1x1")
    layer.out_features, layer.in_features = int(up.shape[0]), int(down[0].numel())
    return layer


RESOLVED_CACHE = 64  # (format, tree, stems) placements remembered: a collection's files share their keys
_resolved: dict[tuple, tuple[ModuleTree, dict[str, str]]] = {}


def _resolve_stems(fmt: str, stems: list[str], tree: ModuleTree) -> dict[str, str]:
    """`keys.resolve_stems`, remembered per (format, tree, stems): building a tree's name tables
    costs more than parsing a small file, and the files of one collection repeat the same keys."""
    key = (fmt, id(tree), len(tree.modules), tuple(stems))
    found = _resolved.get(key)
    if found is not None and found[0] is tree:  # the same tree object, not a new one at a reused id
        return found[1]
    resolved = keyschemes.resolve_stems(fmt, stems, tree)
    if len(_resolved) >= RESOLVED_CACHE:
        _resolved.clear()
    _resolved[key] = (tree, resolved)
    return resolved


def fit(fmt: str, layers: dict[str, RawLayer], tree: ModuleTree) -> Fit:
    """Place each layer on a module of ``tree``, checking shapes."""
    result = Fit(tree)
    resolved = _resolve_stems(fmt, list(layers), tree)
    for stem, layer in layers.items():
        module = resolved.get(stem)
        if module is None:
            result.unplaced.append(stem)
            continue
        shape = tree.modules[module].weight_shape
        if (shape[0], math.prod(shape[1:])) == (layer.out_features, layer.in_features):
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


def _kohya_alpha(layer: RawLayer, rank: int) -> tuple[float, str]:
    """kohya / LyCORIS rule: alpha from the file; missing or 0 means alpha = rank (scale 1)."""
    if "alpha" not in layer.parts:
        return float(rank), "rank-default"
    alpha = float(layer.parts["alpha"].double())
    if alpha == 0:
        return float(rank), "rank-default"
    return alpha, "file"


def _lora_alpha(layer: RawLayer, module: str, configs: dict[str, AdapterConfig]) -> tuple[float, str]:
    """A plain LoRA layer's alpha and where it came from: the component's peft / diffusers config
    (when the file has no alpha for the layer), else the kohya rule."""
    rank = int(layer.parts["down"].shape[0])
    config = configs.get(module.partition(".")[0])
    if config is not None and "alpha" not in layer.parts:
        return config.alpha_for(module, rank), "file"
    return _kohya_alpha(layer, rank)


def _build_layer(layer: RawLayer, module: str, tree: ModuleTree, configs: dict[str, AdapterConfig],
                 lycoris_rank: int | None) -> tuple[LoraLayer, float | None]:
    """The in-memory layer of one placed file layer, and the truncation error of a LyCORIS one."""
    from studio.adapters.lora import LoraLayer
    from studio.formats import lycoris

    if layer.variant == "lora":
        alpha, source = _lora_alpha(layer, module, configs)
        down, up = _conv_shaped(layer.parts["down"], layer.parts["up"], tree.modules[module].weight_shape)
        return LoraLayer(down, up, alpha, source), None
    factors = lycoris.materialise(layer.variant, layer.parts)
    down, up, error = lycoris.truncate(factors, lycoris_rank, LYCORIS_TARGET, LYCORIS_MAX_RANK)
    down, up = _conv_shaped(down, up, tree.modules[module].weight_shape)
    return LoraLayer(down.contiguous(), up.contiguous(), float(down.shape[0]), "file"), error


def _conv_shaped(down: Tensor, up: Tensor, shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Conv factors in the 4-D shapes kohya and diffusers load: down (r, in, kh, kw), up (out, r, 1, 1)."""
    if len(shape) != 4:
        return down, up
    return down.reshape(down.shape[0], *shape[1:]), up.reshape(up.shape[0], up.shape[1], 1, 1)


def check_lycoris_rank(lycoris_rank: int | None) -> None:
    """``None`` picks the rank per layer by the error target; a given rank must be a positive integer."""
    if lycoris_rank is None:
        return
    if isinstance(lycoris_rank, bool) or not isinstance(lycoris_rank, int) or lycoris_rank < 1:
        raise StudioError(f"lycoris_rank must be a positive integer (or left out to pick the rank by a "
                          f"{LYCORIS_TARGET:.0%} error target), not {lycoris_rank!r}")


def load_adapter(
    path: str | Path,
    base: str | ModuleTree | None = None,
    *,
    name: str | None = None,
    lycoris_rank: int | None = None,
) -> LoraAdapter:
    """Read a LoRA file (kohya / A1111 / ComfyUI, diffusers, peft, LyCORIS LoHa / LoKr).

    Layers are placed on the module tree of ``base`` (a BASE string or a tree); without a base,
    the best-fitting known tree is used and named in ``adapter.base_arch``. Layers matching no
    module are skipped and listed in ``adapter.notes``; a file that fits no module, or whose
    names fit with wrong shapes (a LoRA for another base), is refused with a KeyMismatchError.
    LoHa / LoKr layers become LoRA layers of ``lycoris_rank``, or (``None``) of the smallest
    rank reaching a 1% relative error per layer (at most 256); the error is stated in the notes.
    """
    check_lycoris_rank(lycoris_rank)
    path = Path(path)
    tensors, metadata, flagged = safe_load_screened(path)
    studio_format = metadata.get("studio.format", "")
    if studio_format in STUDIO_FILES:
        return _studio_file(studio_format, path, base, name)
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


def _studio_file(studio_format: str, path: Path, base: str | ModuleTree | None, name: str | None) -> LoraAdapter:
    import importlib

    module, _, function = STUDIO_FILES[studio_format].partition(":")
    return getattr(importlib.import_module(module), function)(path, base, name)


def _assemble(path: Path, fmt: str, layers: dict[str, RawLayer], chosen: Fit, metadata: dict[str, str], name: str | None,
              lycoris_rank: int | None) -> LoraAdapter:
    from studio.adapters.lora import LoraAdapter

    configs, config_notes = component_configs(path, fmt, metadata)
    lora_layers: dict[str, LoraLayer] = {}
    errors: dict[str, float] = {}
    for stem, module in chosen.placed.items():
        try:
            lora_layers[module], error = _build_layer(layers[stem], module, chosen.tree, configs, lycoris_rank)
        except FormatError as error:
            raise type(error)(f"{path}: layer {stem!r}: {error}") from error
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
    adapter.notes.extend(config_notes)
    adapter.notes.extend(_notes(fmt, layers, chosen, lora_layers, errors, lycoris_rank))
    return adapter


def _notes(fmt, layers, chosen: Fit, lora_layers: dict[str, LoraLayer], errors: dict[str, float], lycoris_rank: int | None) -> list[str]:
    notes = []
    placed = {module: layers[stem] for stem, module in chosen.placed.items()}
    missing = [m for m, raw in placed.items() if raw.variant == "lora" and lora_layers[m].alpha_source == "rank-default" and "alpha" not in raw.parts]
    zero = [m for m, raw in placed.items() if "alpha" in raw.parts and float(raw.parts["alpha"].double()) == 0]
    if missing:
        who = "as kohya does" if fmt == "kohya" else "as diffusers' loader does"
        notes.append(f"alpha missing in {len(missing)} layers: alpha = rank (scale 1) assumed, {who}")
    if zero:
        notes.append(f"alpha is 0 in {len(zero)} layers: alpha = rank (scale 1) taken, as kohya and LyCORIS do "
                     "(ComfyUI and A1111 would apply these layers with scale 0)")
    if chosen.unplaced:
        notes.append(f"{len(chosen.unplaced)} layers match no module of {chosen.tree.label} and were skipped: {chosen.unplaced[:5]}")
    if errors:
        notes.append(lycoris_note(errors, lora_layers, lycoris_rank))
    return notes


def lycoris_note(errors: dict[str, float], lora_layers: dict[str, LoraLayer], lycoris_rank: int | None) -> str:
    """What converting LoHa / LoKr layers to LoRA cost: ranks and relative errors; a warning above 1%."""
    worst = max(errors.values())
    mean = sum(errors.values()) / len(errors)
    ranks = sorted({lora_layers[m].rank for m in errors})
    how = f"truncated to rank {lycoris_rank}" if lycoris_rank else (
        f"converted at the smallest rank reaching a {LYCORIS_TARGET:.0%} error (at most {LYCORIS_MAX_RANK})")
    rank_text = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}"
    text = f"LyCORIS layers materialised and {how}, {rank_text}: relative error mean {mean:.2e}, max {worst:.2e}"
    if worst > LYCORIS_TARGET:
        return f"warning: {text}; above {LYCORIS_TARGET:.0%}: the LoRA differs from the LyCORIS file (raise the rank)"
    return text


# ---------------------------------------------------------------- header-only view (studio inspect)

HEADER_PARTS = {"down", "up", "alpha"}  # a layer of only these parts is a plain LoRA layer (no LyCORIS math)
# Float dtypes the header view checks for NaN / inf from the bytes (`safe.finite_bytes`); F64 scalars are
# checked by value; F8 and other F64 tensors go to the full reader.
HEADER_FLOATS = {name: FINITE_BYTES[name] for name in ("F16", "BF16", "F32")}
SCALARS = {"F16": "<e", "F32": "<f", "F64": "<d", "I64": "<q", "I32": "<i", "I16": "<h", "I8": "<b", "U8": "<B"}


@dataclass
class HeaderTensor:
    """A tensor as the file's header describes it (shape and dtype, no data), with what `_shaped`,
    `fit` and the alpha rules ask of a tensor; a scalar's value (an alpha) is read from the bytes."""

    shape: tuple[int, ...]
    dtype: str
    value: float | None = None

    def dim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        return math.prod(self.shape)

    def is_floating_point(self) -> bool:
        return self.dtype in HEADER_FLOATS or self.dtype == "F64"

    def __getitem__(self, index: int) -> "HeaderTensor":
        if index != 0 or not self.shape:
            raise IndexError(index)
        return HeaderTensor(self.shape[1:], self.dtype)

    def double(self) -> float:
        if self.value is None:
            raise FormatError(f"a {self.dtype} alpha cannot be read from the header")
        return self.value


@dataclass
class HeaderLayer:
    """One placed layer of a header view: its rank and alpha (with the alpha's source)."""

    rank: int
    alpha: float
    alpha_source: str


@dataclass
class HeaderAdapter:
    """What `studio inspect` shows of a plain LoRA file, read from its header and scalar values:
    the same fields as the `LoraAdapter` `load_adapter` would build, without its tensors."""

    name: str
    lora_layers: dict[str, HeaderLayer]
    metadata: dict[str, str]
    source_format: str
    base_arch: str
    notes: list[str] = field(default_factory=list)

    @property
    def ranks(self) -> list[int]:
        return sorted({layer.rank for layer in self.lora_layers.values()})

    @property
    def alphas(self) -> list[float]:
        return sorted({layer.alpha for layer in self.lora_layers.values()})


def header_adapter(path: str | Path) -> HeaderAdapter | None:
    """`load_adapter(path)`'s layers, ranks, alphas, base and notes from the header alone (no torch),
    or None when the file needs the full reader: a studio file, a FLUX.1 / SD3 layout, a LyCORIS or
    unknown part, a dtype other than F16 / F32 / F64 / BF16, NaN / inf values, or anything the
    reader would refuse (the full reader then gives its exact error). Files whose peft / diffusers
    config sets the alphas import peft (and so torch) for its pattern rules."""
    path = Path(path)
    try:
        return _header_adapter(path)
    except (StudioError, ValueError, TypeError, IndexError, KeyError, OSError, OverflowError):
        return None


def _header_adapter(path: Path) -> HeaderAdapter | None:
    from studio.formats.safe import read_header_layout

    entries, metadata, data_start = read_header_layout(path)
    if metadata.get("studio.format") or transformer_files.detect_layout(list(entries)) is not None:
        return None
    if transformer_files._normalise_prefixes(entries) is not None:
        return None
    tensors = _header_tensors(path, entries, data_start)
    if tensors is None:
        return None
    fmt = keyschemes.detect_format(list(tensors), str(path))
    layers = {}
    for stem, parts in keyschemes.group_keys(fmt, list(tensors)).items():
        if not set(parts) <= HEADER_PARTS:
            return None
        layers[stem] = _shaped(RawLayer(stem, "lora", {part: tensors[key] for part, key in parts.items()}))
    chosen = best_fit(fmt, layers)
    _check_fit(path, fmt, layers, chosen, explicit_base=False)
    configs, config_notes = component_configs(path, fmt, metadata)
    placed = {}
    for stem, module in chosen.placed.items():
        alpha, source = _lora_alpha(layers[stem], module, configs)
        placed[module] = HeaderLayer(int(layers[stem].parts["down"].shape[0]), alpha, source)
    adapter = HeaderAdapter(path.stem, placed, {k: v for k, v in metadata.items() if k not in FORMAT_ONLY_METADATA}, fmt, chosen.tree.arch)
    adapter.notes.extend(config_notes)
    adapter.notes.extend(_notes(fmt, layers, chosen, placed, {}, None))
    return adapter


def _header_tensors(path: Path, entries: dict[str, dict], start: int) -> dict[str, HeaderTensor] | None:
    """Header tensors with scalar values filled in (``start``: where the data begins); None if a float
    tensor is not finite or of a dtype this view does not check."""
    raw = path.read_bytes()
    tensors = {}
    for key, entry in entries.items():
        dtype, shape = entry["dtype"], tuple(entry["shape"])
        begin, end = (start + offset for offset in entry["data_offsets"])
        scalar = math.prod(shape) == 1
        if dtype.startswith("F8") or dtype == "F64" and not scalar or dtype in HEADER_FLOATS and not finite_bytes(raw, begin, end, *HEADER_FLOATS[dtype]):
            return None
        value = _scalar(raw[begin:end], dtype) if scalar and (dtype in SCALARS or dtype == "BF16") else None
        if dtype == "F64" and not _float32_finite(value):
            return None
        tensors[key] = HeaderTensor(shape, dtype, value)
    return tensors


def _float32_finite(value: float) -> bool:
    """Whether a float64 value stays finite as float32 (the full reader checks values as float32)."""
    import struct

    try:
        return math.isfinite(value) and math.isfinite(struct.unpack("<f", struct.pack("<f", value))[0])
    except OverflowError:
        return False




def _scalar(data: bytes, dtype: str) -> float:
    import struct

    if dtype == "BF16":
        return struct.unpack("<f", b"\x00\x00" + data)[0]
    return float(struct.unpack(SCALARS[dtype], data)[0])
