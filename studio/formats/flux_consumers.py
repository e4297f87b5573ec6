"""How kohya sd-scripts, ComfyUI and diffusers read a FLUX.1 LoRA file; A1111 has no FLUX loader.

The FLUX.1 sibling of `studio.formats.consumers` (same `Reading`, same scale rules), modelled from
reading each loader's source (no code copied). kohya's and ComfyUI's FLUX models are BFL's
reference model, whose Linears fuse diffusers modules: ``double_blocks.N.img_attn.qkv`` holds
``attn.to_q / to_k / to_v`` (rows stacked), ``single_blocks.N.linear1`` holds those and
``proj_mlp``, and ``final_layer.adaLN_modulation.1`` is diffusers' ``norm_out.linear`` with its two
halves swapped (`studio.formats.flux_keys`). A tool's patches on one BFL weight are summed (kept
factored), then split by rows into the diffusers modules, so each projection of the tool's fused
dW is compared with the studio's own dW for it; rows the tool leaves at zero are not applied.

- kohya sd-scripts ``networks/lora_flux.py`` ``create_network_from_weights`` then
  ``load_state_dict(strict=False)``: ``lora_name = key.split(".")[0]``, dim from ``lora_down``,
  alpha ``modules_alpha[lora_name]`` (a layer without ``.alpha`` raises KeyError: the whole file
  fails), alpha 0 -> dim. LoRA modules on every Linear inside ``DoubleStreamBlock`` /
  ``SingleStreamBlock`` (``lora_unet_`` + BFL path, dots as underscores; fused qkv / linear1 are
  one module: ``split_qkv`` is off when loading, the file holds them merged), plus ``img_in``,
  ``time_in``, ``vector_in``, ``guidance_in``, ``txt_in`` when the file names them (``in_dims``),
  never ``final_layer``. CLIP-L: ``lora_te1_`` on CLIPAttention / CLIPMLP Linears; T5-XXL:
  ``lora_te3_`` on T5Attention / T5DenseGatedActDense Linears, created only when a ``lora_te3``
  key is in the file. A factor of another shape than its module's is a size-mismatch error: the
  whole file fails. dW = alpha / dim * up @ down.
- ComfyUI ``comfy/lora.py`` ``model_lora_keys_unet`` (Flux branch), ``model_lora_keys_clip``,
  ``comfy/utils.py`` ``flux_to_diffusers`` and ``weight_adapter/lora.py``: ``lora_unet_<BFL path>``
  and ``diffusion_model.<BFL path>`` patch the whole BFL weight; ``transformer.<diffusers path>``,
  ``lycoris_`` / ``lora_transformer_<diffusers path>`` and the bare diffusers path patch a row
  slice of it (``i * hidden`` for q / k / v, rows ``3 * hidden`` on for ``proj_mlp``, hidden from
  the model config), ``norm_out.linear`` through ``swap_scale_shift``;
  ``diffusion_model.single_blocks.N.linear1_qkv`` the first ``3 * hidden`` rows of linear1. CLIP-L:
  ``lora_te_`` / ``lora_te1_text_model_encoder_layers_*`` and ``text_encoder.text_model...`` for
  the six projections, ``text_encoders.clip_l.transformer.<path>``; T5-XXL: ``lora_te2_`` and
  ``lora_te3_<path>``, ``text_encoders.[t5xxl.]transformer.<path>`` (no diffusers
  ``text_encoder_2.`` key). Parts and scale as for SD (`consumers.comfy_patch`); a patch whose
  size does not fit its slice is logged by ComfyUI and skipped.
- diffusers: ``FluxLoraLoaderMixin.load_lora_weights`` itself, on a weightless FluxTransformer2DModel
  and CLIP-L of the tree's architecture; its FLUX loader puts nothing on T5.
- A1111 (1.10, built-in Lora extension) has no FLUX model at all: reported as not supported.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from studio.bases import ModuleTree
from studio.formats import flux_keys
from studio.formats.consumers import CLIP_PROJECTIONS, Delta, Reading, _hollow, _lora_delta, _peft_deltas, comfy_patch, kohya_dims_alphas
from studio.formats.fused import swap_halves
from studio.formats.keys import file_module_name

A1111_UNSUPPORTED = "not supported (A1111 has no FLUX loader)"
KOHYA_BLOCKS = ("double_blocks.", "single_blocks.")
KOHYA_IN_LAYERS = ("img_in", "txt_in", "time_in.", "vector_in.", "guidance_in.")  # in_dims filters
T5_LINEARS = ("SelfAttention.q", "SelfAttention.k", "SelfAttention.v", "SelfAttention.o",
              "DenseReluDense.wi_0", "DenseReluDense.wi_1", "DenseReluDense.wo")


@dataclass(frozen=True)
class Fused:
    """One BFL Linear: its diffusers pieces as (module, first row, rows) in diffusers row order."""

    pieces: tuple[tuple[str, int, int], ...]
    rows: int
    in_features: int
    swapped: bool  # stored as (shift, scale) where diffusers stores (scale, shift)


def bfl_modules(tree: ModuleTree) -> dict[str, Fused]:
    """BFL module path -> its diffusers pieces, for every transformer Linear of the tree."""
    found: dict[str, dict[int, tuple[str, tuple[int, ...]]]] = defaultdict(dict)
    sizes: dict[str, int] = {}
    for module, info in tree.modules.items():
        component, _, path = module.partition(".")
        located = flux_keys.SCHEME.locate(path) if component == "transformer" else None
        if located is not None:
            group, index = located
            found[group.original][index] = (module, info.weight_shape)
            sizes[group.original] = len(group.pieces)
    fused = {}
    for original, pieces in found.items():
        if sorted(pieces) != list(range(sizes[original])):
            continue  # a tree without every piece has no row layout for this weight
        laid, start = [], 0
        for index in range(sizes[original]):
            module, shape = pieces[index]
            laid.append((module, start, int(shape[0])))
            start += int(shape[0])
        in_features = int(pieces[0][1][1])
        fused[original] = Fused(tuple(laid), start, in_features, flux_keys.SCHEME.swapped(original, start, in_features))
    return fused


def _on_rows(delta: Delta, start: int, rows: int) -> Delta:
    """A row slice's dW placed at ``start`` in a weight of ``rows`` rows (zero elsewhere)."""
    left, right = delta
    if start == 0 and left.shape[0] == rows:
        return delta
    full = left.new_zeros((rows, left.shape[1]))
    full[start:start + left.shape[0]] = left
    return full, right


def _summed(deltas: list[Delta]) -> Delta:
    """The sum of patches on one weight: factors side by side, or dense when one is dense."""
    if len(deltas) == 1:
        return deltas[0]
    if any(right is None for _, right in deltas):
        return sum(left if right is None else left @ right for left, right in deltas), None
    return torch.cat([left for left, _ in deltas], dim=1), torch.cat([right for _, right in deltas], dim=0)


def split_fused(patches: dict[str, list[Delta]], fused: dict[str, Fused], reading: Reading) -> None:
    """Each weight's summed dW into ``reading.deltas``; a BFL weight's split by rows into its pieces."""
    for target, parts in patches.items():
        left, right = _summed(parts)
        if target not in fused:
            reading.deltas[target] = (left, right)
            continue
        if fused[target].swapped:
            left = swap_halves(left)
        for module, start, rows in fused[target].pieces:
            block = left[start:start + rows]
            if bool(block.any()):
                reading.deltas[module] = (block, right)


def _shape_of(target: str, fused: dict[str, Fused], tree: ModuleTree) -> tuple[int, int]:
    if target in fused:
        return fused[target].rows, fused[target].in_features
    out, *rest = tree.modules[target].weight_shape
    return int(out), int(torch.Size(rest).numel())


# -- kohya ---------------------------------------------------------------------------------------

def kohya_flux_names(tree: ModuleTree, fused: dict[str, Fused], t5: bool) -> dict[str, str]:
    """lora_name -> BFL module (transformer) or tree module (text encoders) kohya's network creates."""
    names = {f"lora_unet_{o.replace('.', '_')}": o for o in fused if o.startswith(KOHYA_BLOCKS + KOHYA_IN_LAYERS)}
    for module in tree.modules:
        component, _, path = module.partition(".")
        if component == "text_encoder" and path.endswith(CLIP_PROJECTIONS):
            names["lora_te1_" + file_module_name(module).partition(".")[2].replace(".", "_")] = module
        elif component == "text_encoder_2" and t5 and path.endswith(T5_LINEARS):
            names["lora_te3_" + path.replace(".", "_")] = module
    return names


def kohya_flux_reads(tensors: dict[str, Tensor], tree: ModuleTree) -> Reading:
    """kohya's ``lora_flux.create_network_from_weights`` and ``load_state_dict(strict=False)``."""
    reading, fused = Reading("kohya"), bfl_modules(tree)
    dims, alphas = kohya_dims_alphas(tensors)
    names = kohya_flux_names(tree, fused, t5=any("lora_te3" in name for name in dims.keys() | alphas.keys()))
    patches: dict[str, list[Delta]] = defaultdict(list)
    for lora_name, target in names.items():
        if lora_name not in dims:
            continue
        if lora_name not in alphas:
            return _refused(reading, f"KeyError: {lora_name!r} (kohya takes every layer's alpha from the file)")
        down, up = tensors[f"{lora_name}.lora_down.weight"], tensors.get(f"{lora_name}.lora_up.weight")
        out, inp = _shape_of(target, fused, tree)
        dim = dims[lora_name]
        if tuple(down.shape) != (dim, inp) or (up is not None and tuple(up.shape) != (out, dim)):
            shown = tuple(up.shape) if up is not None else None
            return _refused(reading, f"size mismatch for {lora_name}: file down {tuple(down.shape)} / up {shown}, "
                                     f"module needs {(dim, inp)} / {(out, dim)}")
        if up is not None:
            patches[target].append(_lora_delta(up, down, (alphas[lora_name] or dim) / dim))
    split_fused(patches, fused, reading)
    reading.ignored = [k for k in tensors if k.split(".")[0] not in names or k.split(".")[0] not in dims]
    return reading


def _refused(reading: Reading, why: str) -> Reading:
    reading.refused = why
    reading.deltas.clear()
    return reading


# -- ComfyUI -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Slot:
    """Where a ComfyUI key-map entry lands: a weight, a row slice of it, and whether it is swapped."""

    target: str  # BFL module path or tree module
    start: int = 0
    rows: int | None = None  # None: the whole weight
    swap: bool = False  # ComfyUI's swap_scale_shift applied to the patch


def _diffusers_slot(original: str, index: int, fused: Fused, hidden: int) -> Slot:
    """``flux_to_diffusers``' target for piece ``index``: q / k / v at ``i * hidden``, proj_mlp after them."""
    if len(fused.pieces) == 1:
        return Slot(original, swap=fused.swapped)
    if index < 3:
        return Slot(original, index * hidden, hidden)
    return Slot(original, 3 * hidden, 4 * hidden)


def comfyui_flux_key_map(tree: ModuleTree, fused: dict[str, Fused]) -> dict[str, Slot]:
    """ComfyUI's lora key -> slot map for a FLUX.1 model and its CLIP-L / T5-XXL."""
    config = tree.unet_config
    hidden = int(config.get("num_attention_heads", 0)) * int(config.get("attention_head_dim", 0))
    key_map: dict[str, Slot] = {}
    for original, module in fused.items():
        key_map[f"lora_unet_{original.replace('.', '_')}"] = key_map[f"diffusion_model.{original}"] = Slot(original)
        for index, (piece, _, _) in enumerate(module.pieces):
            path = piece.removeprefix("transformer.")
            slot = _diffusers_slot(original, index, module, hidden)
            for key in (f"transformer.{path}", f"lycoris_{path.replace('.', '_')}", f"lora_transformer_{path.replace('.', '_')}", path):
                key_map[key] = slot
        if original.endswith(".linear1"):
            key_map[f"diffusion_model.{original}_qkv"] = Slot(original, 0, 3 * hidden)
    key_map.update(_comfy_text_keys(tree))
    return key_map


def _comfy_text_keys(tree: ModuleTree) -> dict[str, Slot]:
    """``model_lora_keys_clip`` for FLUX's clip_l + t5xxl (T5 gets lora_te2_ and lora_te3_: CLIP-L is there)."""
    keys: dict[str, Slot] = {}
    for module in tree.modules:
        component, _, path = module.partition(".")
        if component == "text_encoder":
            dotted = file_module_name(module).partition(".")[2]
            keys[f"text_encoders.clip_l.transformer.{dotted}"] = Slot(module)
            if dotted.endswith(CLIP_PROJECTIONS) and dotted.startswith("text_model.encoder.layers."):
                underscored = dotted.replace(".", "_")
                keys[f"lora_te_{underscored}"] = keys[f"lora_te1_{underscored}"] = keys[f"text_encoder.{dotted}"] = Slot(module)
        elif component == "text_encoder_2":
            for key in (f"lora_te2_{path.replace('.', '_')}", f"lora_te3_{path.replace('.', '_')}",
                        f"text_encoders.t5xxl.transformer.{path}", f"text_encoders.transformer.{path}"):
                keys[key] = Slot(module)
    return keys


def _fitted(delta: Delta, rows: int, width: int) -> Delta | None:
    """The patch as ComfyUI adds it to a (rows, width) slice: reshaped when only the size agrees, else None."""
    left, right = delta
    shape = (left.shape[0], left.shape[1] if right is None else right.shape[1])
    if shape == (rows, width):
        return delta
    if shape[0] * shape[1] != rows * width:
        return None
    return (left if right is None else left @ right).reshape(rows, width), None


def comfyui_flux_reads(tensors: dict[str, Tensor], tree: ModuleTree) -> Reading:
    """ComfyUI's ``load_lora`` over its FLUX key map, patches placed on their row slices."""
    reading, fused, loaded = Reading("comfyui"), bfl_modules(tree), set()
    patches: dict[str, list[Delta]] = defaultdict(list)
    for x, slot in comfyui_flux_key_map(tree, fused).items():
        delta = comfy_patch(x, tensors, loaded)
        if delta is None:
            continue
        if delta == "native":
            pieces = fused[slot.target].pieces if slot.target in fused else ((slot.target, 0, 0),)
            reading.native.extend(piece for piece, _, _ in pieces)
            continue
        rows, width = _shape_of(slot.target, fused, tree)
        placed = _fitted(delta, slot.rows or rows, width)
        if placed is None:
            reading.ignored.append(f"{x} (size does not fit {slot.target}: ComfyUI logs an error and skips it)")
            continue
        if slot.swap:
            placed = (swap_halves(placed[0]), placed[1])
        patches[slot.target].append(_on_rows(placed, slot.start, rows))
    split_fused(patches, fused, reading)
    reading.ignored += [k for k in tensors if k not in loaded]
    return reading


# -- diffusers -----------------------------------------------------------------------------------

_HOSTS: dict[str, object] = {}
_HOST_LOCK = threading.Lock()


def _flux_host(arch: str):
    """A FluxLoraLoaderMixin holding a weightless transformer and CLIP-L of ``arch`` (built once: ~4 s)."""
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin

    from studio.bases.meta import arch_config, denoiser_on_meta, text_encoder_on_meta

    class Host(FluxLoraLoaderMixin):
        """The two components FluxPipeline.load_lora_weights puts LoRA layers on, and nothing else."""

        hf_device_map = None

        def __init__(self, transformer, text_encoder) -> None:
            self.transformer, self.text_encoder = transformer, text_encoder
            self.components = {"transformer": transformer, "text_encoder": text_encoder}

    if arch not in _HOSTS:
        try:
            config = arch_config(arch)
        except FileNotFoundError as error:
            raise ValueError(f"the diffusers reading is modelled on the bundled FLUX.1 architectures, not {arch!r}") from error
        transformer, text_encoder = denoiser_on_meta(config["transformer"]), text_encoder_on_meta(config["text_encoder"])
        _hollow(transformer)
        _hollow(text_encoder)
        _HOSTS[arch] = Host(transformer, text_encoder)
    return _HOSTS[arch]


@contextmanager
def _loaded_host(arch: str):
    """The shared host, LoRA layers removed again afterwards (rebuilt next time if that fails)."""
    with _HOST_LOCK:
        host = _flux_host(arch)
        try:
            yield host
        finally:
            try:
                host.unload_lora_weights()
            except Exception:  # noqa: BLE001 - a host in an unknown state is dropped, never reused
                _HOSTS.pop(arch, None)


def diffusers_flux_reads(path: str | Path, tree: ModuleTree) -> Reading:
    """diffusers' own ``FluxPipeline.load_lora_weights`` (conversion, checks, peft injection)."""
    reading = Reading("diffusers")
    with _loaded_host(tree.arch) as host:
        try:
            host.load_lora_weights(str(path), adapter_name="x")
        except (ValueError, KeyError, RuntimeError, TypeError, AttributeError) as error:
            return _refused(reading, f"{type(error).__name__}: {str(error)[:300]}")
        for name in ("transformer", "text_encoder"):
            _peft_deltas(name, getattr(host, name), "x", reading)
    return reading


def read_as(tool: str, path: str | Path, tree: ModuleTree) -> Reading:
    """What ``tool`` applies from a FLUX.1 file (A1111: not supported)."""
    from studio.formats.safe import safe_load

    if tool == "a1111":
        return Reading("a1111", refused=A1111_UNSUPPORTED, unsupported=True)
    if tool == "diffusers":
        return diffusers_flux_reads(path, tree)
    tensors, _ = safe_load(path)
    return {"kohya": kohya_flux_reads, "comfyui": comfyui_flux_reads}[tool](tensors, tree)
