"""How each tool reads a LoRA file: which layers it applies and with which dW.

Each function models one loader's key rules and scale rule, reproduced from reading its source
(no code copied); they take the file's tensors (and header) and a module tree and return the dW
that tool would add to each module at strength 1. They let an export be checked against every
tool before a user finds out (``studio.formats.export_for``), and keep the interop table honest.

- kohya sd-scripts ``networks/lora.py`` ``create_network_from_weights`` + ``load_state_dict``:
  ``lora_name = key.split(".")[0]``; dim from ``lora_down``; alpha missing -> dim, 0 -> dim
  (LoRAModule); modules in Transformer2DModel / ResnetBlock2D / Downsample2D / Upsample2D and
  CLIPAttention / CLIPMLP, named by kohya's own UNet (SGM names for SDXL, diffusers names for SD1/2);
  a factor whose shape differs from the module's (2-D factors on a conv) refuses the file.
- ComfyUI ``comfy/lora.py`` ``model_lora_keys_unet`` / ``model_lora_keys_clip`` / ``load_lora`` and
  ``weight_adapter/lora.py``: keys ``lora_unet_<sgm>``, ``diffusion_model.<sgm>``,
  ``lora_unet_<diffusers>``, ``[unet.]<diffusers with .to_ -> .processor.to_, to_out.0 -> to_out>``,
  CLIP ``lora_te[1|2]_text_model_encoder_layers_*`` and ``text_encoder[_2].text_model...`` for the
  six projections; parts ``.lora_up/.lora_down``, ``_lora.up``, ``.lora_B/.lora_A``, ``.lora.up``,
  ``.diff``; scale alpha / rank when ``.alpha`` is there, else 1 (alpha 0 -> 0).
- A1111 ``extensions-builtin/Lora/networks.py`` (1.10) ``convert_diffusers_name_to_compvis`` and
  fallbacks, ``network.py`` ``calc_scale``: stem = key before the first ".", mapped to the LDM
  module names (``diffusion_model_*``, ``transformer_text_model_*``, SDXL ``0_`` / ``1_`` embedders,
  OpenCLIP ``resblocks`` with q/k/v in one ``attn`` in_proj); scale alpha / dim when alpha is there,
  else 1; ``diff`` applied as is.
- diffusers: its own ``lora_state_dict`` + ``load_lora_into_unet`` / ``load_lora_into_text_encoder``
  run on a weightless (meta) UNet and text encoders of the architecture: the LoRA tensors and each
  peft layer's ``scaling`` are read back from the injected layers.

FLUX.1 trees are read by `studio.formats.flux_consumers` (BFL's fused modules; A1111 has no FLUX
loader); `read_as` sends them there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from studio.bases import ModuleTree
from studio.formats.sgm import sgm_path

TOOLS = ("kohya", "comfyui", "a1111", "diffusers")
TOOL_LABELS = {"kohya": "kohya sd-scripts", "comfyui": "ComfyUI", "a1111": "A1111", "diffusers": "diffusers"}
CLIP_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
KOHYA_UNET_BLOCKS = (".attentions.", ".resnets.", ".downsamplers.", ".upsamplers.")
LYCORIS_MARKERS = ("hada_w1_a", "lokr_w1", "lokr_w1_a")


@dataclass
class Reading:
    """What one tool makes of a file: dW per module it applies, keys it ignores, or a refusal."""

    tool: str
    deltas: dict[str, tuple] = field(default_factory=dict)  # module -> Delta
    ignored: list[str] = field(default_factory=list)
    refused: str | None = None
    native: list[str] = field(default_factory=list)  # modules the tool applies with its own LyCORIS math (not modelled)
    unsupported: bool = False  # the tool has no loader for this architecture at all (``refused`` says so)


def _clip_path(path: str) -> str:
    """A text-encoder module path with CLIP's ``text_model.`` level (as every file writes it)."""
    return path if path.startswith("text_model.") else f"text_model.{path}"


def _is_sdxl(tree: ModuleTree) -> bool:
    return "text_encoder_2" in tree.components


Delta = tuple[Tensor, "Tensor | None"]  # dW = left @ right (2-D, float64), or (dW, None) when dense


def _lora_delta(up: Tensor, down: Tensor, scale: float) -> Delta:
    """A LoRA layer's dW kept factored (the tables compare hundreds of SDXL layers on a CPU)."""
    return up.double().flatten(1) * scale, down.double().flatten(1)


def _gram_inner(a: Delta, b: Delta) -> float:
    """<dW_a, dW_b> (Frobenius) without forming either dW when both are factored."""
    (la, ra), (lb, rb) = a, b
    if ra is None or rb is None:
        dense_a = la if ra is None else la @ ra
        dense_b = lb if rb is None else lb @ rb
        return float((dense_a.reshape(dense_b.shape) * dense_b).sum())
    return float(torch.trace((la.T @ lb) @ (rb @ ra.T)))


def relative_error(observed: Delta, expected: Delta) -> float:
    """||dW_observed - dW_expected|| / ||dW_expected|| from inner products (float64)."""
    ee, oo, oe = _gram_inner(expected, expected), _gram_inner(observed, observed), _gram_inner(observed, expected)
    if ee <= 0:
        return oo ** 0.5
    return max(ee + oo - 2 * oe, 0.0) ** 0.5 / ee ** 0.5


# -- kohya ---------------------------------------------------------------------------------------

def kohya_network_names(tree: ModuleTree) -> dict[str, str]:
    """lora_name -> module for every module kohya's LoRA network creates (conv layers included)."""
    names, sdxl = {}, _is_sdxl(tree)
    for module in tree.modules:
        component, _, path = module.partition(".")
        if component == "unet":
            if not any(block in f".{path}" for block in KOHYA_UNET_BLOCKS):
                continue
            name = sgm_path(path, tree.unet_config) if sdxl else path
            if name is not None:
                names[f"lora_unet_{name.replace('.', '_')}"] = module
        elif ".self_attn." in f".{path}" or ".mlp." in f".{path}":
            prefix = {"text_encoder": "lora_te1" if sdxl else "lora_te", "text_encoder_2": "lora_te2"}[component]
            names[f"{prefix}_{_clip_path(path).replace('.', '_')}"] = module
    return names


def kohya_dims_alphas(tensors: dict[str, Tensor]) -> tuple[dict[str, int], dict[str, float]]:
    """``create_network_from_weights``' first pass: lora_name = key before the first "."; dim from lora_down."""
    dims, alphas = {}, {}
    for key, value in tensors.items():
        if "." not in key:
            continue
        lora_name = key.split(".")[0]
        if "alpha" in key:
            alphas[lora_name] = float(value.double())
        elif "lora_down" in key:
            dims[lora_name] = int(value.shape[0])
    return dims, alphas


def kohya_reads(tensors: dict[str, Tensor], tree: ModuleTree) -> Reading:
    """kohya's ``create_network_from_weights`` and ``load_state_dict(strict=False)``."""
    reading = Reading("kohya")
    dims, alphas = kohya_dims_alphas(tensors)
    names = kohya_network_names(tree)
    for lora_name, module in names.items():
        if lora_name not in dims:
            continue
        down, up = tensors[f"{lora_name}.lora_down.weight"], tensors.get(f"{lora_name}.lora_up.weight")
        shape, dim = tree.modules[module].weight_shape, dims[lora_name]
        want_down = (dim, *shape[1:]) if len(shape) == 4 else (dim, shape[1])
        want_up = (shape[0], dim, 1, 1) if len(shape) == 4 else (shape[0], dim)
        if tuple(down.shape) != want_down or (up is not None and tuple(up.shape) != want_up):
            reading.refused = (f"size mismatch for {lora_name}: file down {tuple(down.shape)} / up "
                               f"{tuple(up.shape) if up is not None else None}, module needs {want_down} / {want_up}")
            reading.deltas.clear()
            return reading
        if up is not None:
            alpha = alphas.get(lora_name, dim) or dim
            reading.deltas[module] = _lora_delta(up, down, alpha / dim)
    reading.ignored = [k for k in tensors if k.split(".")[0] not in names or k.split(".")[0] not in dims]
    return reading


# -- ComfyUI -------------------------------------------------------------------------------------

def comfyui_key_map(tree: ModuleTree) -> dict[str, str]:
    """ComfyUI's lora key -> module map for SD1.x / SDXL (``model_lora_keys_unet`` / ``_clip``)."""
    key_map, sdxl = {}, _is_sdxl(tree)
    for module in tree.modules:
        component, _, path = module.partition(".")
        if component == "unet":
            sgm = sgm_path(path, tree.unet_config)
            if sgm is not None:
                key_map[f"lora_unet_{sgm.replace('.', '_')}"] = module
                key_map[f"diffusion_model.{sgm}"] = module
            key_map[f"lora_unet_{path.replace('.', '_')}"] = module
            key_map[f"lycoris_{path.replace('.', '_')}"] = module
            processor = path.replace(".to_", ".processor.to_")
            processor = processor[:-2] if processor.endswith(".to_out.0") else processor
            key_map[processor] = key_map[f"unet.{processor}"] = module
            continue
        match = re.match(r"^(?:text_model\.)?encoder\.layers\.(\d+)\.(.+)$", path)
        if not match or match.group(2) not in CLIP_PROJECTIONS or int(match.group(1)) >= 32:
            continue
        underscored = f"text_model_encoder_layers_{match.group(1)}_{match.group(2).replace('.', '_')}"
        dotted = f"text_model.encoder.layers.{match.group(1)}.{match.group(2)}"
        if component == "text_encoder":
            key_map[f"lora_te_{underscored}"] = key_map[f"lora_te1_{underscored}"] = module
            key_map[f"text_encoder.{dotted}"] = module
        elif sdxl:
            key_map[f"lora_te2_{underscored}"] = module
            key_map[f"text_encoder_2.{dotted}"] = module
    if sdxl and "text_encoder_2.text_projection" in tree.modules:
        key_map["lora_te2_text_projection"] = "text_encoder_2.text_projection"
    return key_map


COMFY_LORA_PARTS = (("{}.lora_up.weight", "{}.lora_down.weight"), ("{}_lora.up.weight", "{}_lora.down.weight"),
                    ("{}.lora_B.weight", "{}.lora_A.weight"), ("{}.lora.up.weight", "{}.lora.down.weight"),
                    ("{}.lora_linear_layer.up.weight", "{}.lora_linear_layer.down.weight"))


def comfy_patch(x: str, tensors: dict[str, Tensor], loaded: set[str]) -> "Delta | str | None":
    """ComfyUI's ``load_lora`` for one key-map entry ``x``: its dW, ``"native"`` (LyCORIS), or None.

    LoRA parts in ComfyUI's order of spellings, scale alpha / rank (1 without ``.alpha``); a
    ``.diff`` replaces the LoRA patch; LoHa / LoKr are applied by ComfyUI's own code (not modelled).
    """
    alpha = float(tensors[f"{x}.alpha"].double()) if f"{x}.alpha" in tensors else None
    delta = None
    for up_name, down_name in COMFY_LORA_PARTS:
        up_key, down_key = up_name.format(x), down_name.format(x)
        if up_key in tensors:
            down = tensors[down_key]
            delta = _lora_delta(tensors[up_key], down, alpha / down.shape[0] if alpha is not None else 1.0)
            loaded.update({up_key, down_key, f"{x}.alpha"})
            break
    if f"{x}.diff" in tensors:
        delta = (tensors[f"{x}.diff"].double().flatten(1), None)
        loaded.add(f"{x}.diff")
    if any(f"{x}.{marker}" in tensors for marker in LYCORIS_MARKERS):
        loaded.update(k for k in tensors if k.startswith(f"{x}."))
        return "native"
    return delta


def comfyui_reads(tensors: dict[str, Tensor], tree: ModuleTree) -> Reading:
    """ComfyUI's ``load_lora`` over its key map; LoRA scale alpha / rank, or 1 without alpha."""
    reading, loaded = Reading("comfyui"), set()
    for x, module in comfyui_key_map(tree).items():
        delta = comfy_patch(x, tensors, loaded)
        if delta == "native":
            reading.native.append(module)
        elif delta is not None:
            reading.deltas[module] = delta
    reading.ignored = [k for k in tensors if k not in loaded]
    return reading


# -- A1111 ---------------------------------------------------------------------------------------

def a1111_layer_names(tree: ModuleTree) -> dict[str, str]:
    """A1111's ``network_layer_mapping`` names of the LDM model, -> module (q/k/v of OpenCLIP: ``_attn_q_proj``)."""
    names, sdxl = {}, _is_sdxl(tree)
    for module in tree.modules:
        component, _, path = module.partition(".")
        if component == "unet":
            sgm = sgm_path(path, tree.unet_config)
            if sgm is not None:
                names[f"diffusion_model_{sgm.replace('.', '_')}"] = module
        elif component == "text_encoder":
            names[f"{'0_' if sdxl else ''}transformer_{_clip_path(path).replace('.', '_')}"] = module
        else:
            match = re.match(r"^(?:text_model\.)?encoder\.layers\.(\d+)\.(.+)$", path)
            openclip = {"self_attn.q_proj": "attn_q_proj", "self_attn.k_proj": "attn_k_proj", "self_attn.v_proj": "attn_v_proj",
                        "self_attn.out_proj": "attn_out_proj", "mlp.fc1": "mlp_c_fc", "mlp.fc2": "mlp_c_proj"}
            if match and match.group(2) in openclip:
                names[f"1_model_transformer_resblocks_{match.group(1)}_{openclip[match.group(2)]}"] = module
    return names


def a1111_compvis_name(stem: str) -> str:
    """``convert_diffusers_name_to_compvis`` (SD1 / SDXL branches), as A1111 1.10 writes it."""
    resnet = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
              "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}
    rules = [
        (r"lora_unet_conv_in(.*)", lambda m: f"diffusion_model_input_blocks_0_0{m[0]}"),
        (r"lora_unet_conv_out(.*)", lambda m: f"diffusion_model_out_2{m[0]}"),
        (r"lora_unet_time_embedding_linear_(\d+)(.*)", lambda m: f"diffusion_model_time_embed_{int(m[0]) * 2 - 2}{m[1]}"),
        (r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", lambda m: f"diffusion_model_input_blocks_{1 + int(m[0]) * 3 + int(m[2])}_{1 if m[1] == 'attentions' else 0}_{(resnet if m[1] == 'resnets' else {}).get(m[3], m[3])}"),
        (r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", lambda m: f"diffusion_model_middle_block_{1 if m[0] == 'attentions' else int(m[1]) * 2}_{(resnet if m[0] == 'resnets' else {}).get(m[2], m[2])}"),
        (r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", lambda m: f"diffusion_model_output_blocks_{int(m[0]) * 3 + int(m[2])}_{1 if m[1] == 'attentions' else 0}_{(resnet if m[1] == 'resnets' else {}).get(m[3], m[3])}"),
        (r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", lambda m: f"diffusion_model_input_blocks_{3 + int(m[0]) * 3}_0_op"),
        (r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv", lambda m: f"diffusion_model_output_blocks_{2 + int(m[0]) * 3}_{2 if int(m[0]) > 0 else 1}_conv"),
        (r"lora_te_text_model_encoder_layers_(\d+)_(.+)", lambda m: f"transformer_text_model_encoder_layers_{m[0]}_{m[1]}"),
        (r"lora_te2_text_model_encoder_layers_(\d+)_(.+)", lambda m: f"1_model_transformer_resblocks_{m[0]}_" + m[1].replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj").replace("self_attn", "attn")),
    ]
    for pattern, build in rules:
        match = re.match(pattern, stem)
        if match:
            return build(match.groups())
    return stem


def _a1111_module(stem: str, names: dict[str, str]) -> str | None:
    """The module A1111 puts a stem on, with its fallbacks (SDXL compvis keys, ``lora_te1_``)."""
    key = a1111_compvis_name(stem)
    if key in names:
        return names[key]
    if "lora_unet" in stem:
        return names.get(stem.replace("lora_unet", "diffusion_model"))
    if "lora_te1_text_model" in stem:
        return names.get(stem.replace("lora_te1_text_model", "0_transformer_text_model")) or names.get(
            stem.replace("lora_te1_text_model", "transformer_text_model"))
    return None


def _a1111_qkv_complete(module_of: dict[str, str], groups: dict[str, dict]) -> set[str]:
    """OpenCLIP q/k/v live in one in_proj: A1111 applies them only when q, k, v and out are all there."""
    keep = set()
    for stem in groups:
        match = re.match(r"^(1_model_transformer_resblocks_\d+_attn)_([qkv]_proj)$", a1111_compvis_name(stem))
        if not match:
            keep.add(stem)
            continue
        wanted = {f"{match.group(1)}_{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")}
        if wanted <= {a1111_compvis_name(s) for s in groups}:
            keep.add(stem)
    return keep


def a1111_reads(tensors: dict[str, Tensor], tree: ModuleTree) -> Reading:
    """A1111's ``load_network``: group by stem, map the stem, then the lora or full module type."""
    reading, names = Reading("a1111"), a1111_layer_names(tree)
    groups: dict[str, dict[str, Tensor]] = {}
    module_of: dict[str, str] = {}
    for key, value in tensors.items():
        stem, _, part = key.partition(".")
        module = _a1111_module(stem, names)
        if module is None:
            reading.ignored.append(key)
            continue
        module_of[stem] = module
        groups.setdefault(stem, {})[part] = value
    for stem in _a1111_qkv_complete(module_of, groups):
        w = groups[stem]
        if "lora_up.weight" in w and "lora_down.weight" in w:
            dim = int(w["lora_down.weight"].shape[0])
            scale = float(w["alpha"].double()) / dim if "alpha" in w else 1.0
            reading.deltas[module_of[stem]] = _lora_delta(w["lora_up.weight"], w["lora_down.weight"], scale)
        elif "diff" in w:
            reading.deltas[module_of[stem]] = (w["diff"].double().flatten(1), None)
        elif any(marker in w for marker in LYCORIS_MARKERS):
            reading.native.append(module_of[stem])
    return reading


# -- diffusers -----------------------------------------------------------------------------------

def _meta_components(tree: ModuleTree) -> dict[str, torch.nn.Module]:
    """Weightless UNet and text encoders of the tree's architecture (sd15 / sd2 / sdxl)."""
    from studio.bases.meta import arch_config, denoiser_on_meta, text_encoder_on_meta

    if tree.arch not in ("sd15", "sd2", "sdxl"):
        raise ValueError(f"the diffusers reading is modelled on sd15 / sd2 / sdxl trees, not {tree.arch!r}")
    config = arch_config(tree.arch)
    components = {"unet": denoiser_on_meta(config["unet"])}
    for name in ("text_encoder", "text_encoder_2"):
        if name in config:
            components[name] = text_encoder_on_meta(config[name])
    for model in components.values():
        _hollow(model)
    return components


def _hollow(model: torch.nn.Module) -> None:
    """Give every meta parameter / buffer a CPU tensor of its shape backed by one element.

    peft moves injected LoRA weights to the device of the base weight; on meta they would lose
    their values. A broadcast scalar has the shape and device without the memory.
    """
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            hollow = torch.zeros((), dtype=param.dtype).expand(param.shape)
            setattr(module, name, torch.nn.Parameter(hollow, requires_grad=False))
        for name, buffer in list(module.named_buffers(recurse=False)):
            module._buffers[name] = torch.zeros((), dtype=buffer.dtype).expand(buffer.shape)


def _peft_deltas(component: str, model: torch.nn.Module, adapter: str, reading: "Reading") -> None:
    """Each injected peft layer's dW = scaling * B @ A; a layer whose weights stayed meta was not loaded."""
    for name, module in model.named_modules():
        lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if lora_a is None or adapter not in lora_a:
            continue
        down, up = lora_a[adapter].weight.detach(), lora_b[adapter].weight.detach()
        if down.is_meta or up.is_meta:
            reading.ignored.append(f"{component}.{name} (injected, weights not in the file)")
            continue
        reading.deltas[f"{component}.{name}"] = _lora_delta(up, down, float(module.scaling[adapter]))


def diffusers_reads(path: str | Path, tree: ModuleTree) -> Reading:
    """diffusers' own loader on meta modules: ``lora_state_dict`` then ``load_lora_into_*``."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    reading = Reading("diffusers")
    components = _meta_components(tree)
    mixin = StableDiffusionXLPipeline if "text_encoder_2" in components else StableDiffusionPipeline
    try:
        state_dict, alphas, metadata = mixin.lora_state_dict(str(path), unet_config=components["unet"].config, return_lora_metadata=True)
        if not all("lora" in key for key in state_dict):  # load_lora_weights' own check
            raise ValueError("Invalid LoRA checkpoint.")
        mixin.load_lora_into_unet(state_dict, alphas, components["unet"], adapter_name="x", metadata=metadata)
        for name in ("text_encoder", "text_encoder_2"):
            if name in components:
                mixin.load_lora_into_text_encoder(state_dict, alphas, components[name], prefix=name, adapter_name="x",
                                                  metadata=metadata)
    except (ValueError, KeyError, RuntimeError, TypeError) as error:
        reading.refused = f"{type(error).__name__}: {str(error)[:300]}"
        return reading
    for name, model in components.items():
        _peft_deltas(name, model, "x", reading)
    return reading


def read_as(tool: str, path: str | Path, tree: ModuleTree) -> Reading:
    """What ``tool`` (kohya, comfyui, a1111, diffusers) applies from the file at ``path``.

    FLUX.1 trees go to `studio.formats.flux_consumers` (fused BFL modules, no A1111 loader).
    """
    from studio.formats.safe import safe_load

    if tool not in TOOLS:
        raise ValueError(f"tool must be one of {', '.join(TOOLS)}, not {tool!r}")
    if tree.family == "flux1":
        from studio.formats import flux_consumers

        return flux_consumers.read_as(tool, path, tree)
    if tool == "diffusers":
        return diffusers_reads(path, tree)
    tensors, _ = safe_load(path)
    readers = {"kohya": kohya_reads, "comfyui": comfyui_reads, "a1111": a1111_reads}
    return readers[tool](tensors, tree)


@dataclass
class Fidelity:
    """How exactly a tool applies an adapter: layers applied of expected, worst relative dW error."""

    tool: str
    applied: int
    expected: int
    max_error: float  # over the layers applied (a layer not applied is counted in ``applied``)
    refused: str | None = None
    wrong: list[str] = field(default_factory=list)  # modules given a non-zero dW that the adapter does not hold
    native: int = 0  # layers applied with the tool's own LyCORIS math (not modelled here)
    unsupported: bool = False  # the tool has no loader for this architecture

    def summary(self) -> str:
        if self.unsupported:
            return f"{TOOL_LABELS[self.tool]}: {self.refused}"
        if self.refused:
            return f"{TOOL_LABELS[self.tool]} refuses the file ({self.refused})"
        if self.native:
            return f"{TOOL_LABELS[self.tool]} applies {self.native} of {self.expected} layers with its own LyCORIS code (not modelled)"
        return f"{TOOL_LABELS[self.tool]} applies {self.applied} of {self.expected} layers, max relative dW error {self.max_error:.1e}"

    @property
    def exact(self) -> bool:
        return self.refused is None and self.applied == self.expected and not self.wrong and self.max_error <= 1e-5


def adapter_deltas(adapter) -> dict[str, Delta]:
    """The adapter's own dW per layer, factored: what every tool should apply."""
    deltas = {}
    for module, layer in adapter.lora_layers.items():
        down, up = layer.factors()
        deltas[module] = (up.double(), down.double())
    return deltas


def _is_zero(delta: Delta) -> bool:
    """A dW of zeros: an injected layer with nothing in it (diffusers' split of a half-filled fused LoRA)."""
    left, right = delta
    return not bool(left.any()) or (right is not None and not bool(right.any()))


def fidelity(reading: Reading, expected: dict[str, Delta]) -> Fidelity:
    """Compare a tool's reading with the adapter's own dW per module (``adapter_deltas``)."""
    if reading.refused is not None:
        return Fidelity(reading.tool, 0, len(expected), 0.0, reading.refused, unsupported=reading.unsupported)
    worst = 0.0
    applied = [m for m in expected if m in reading.deltas]
    for module in applied:
        worst = max(worst, relative_error(reading.deltas[module], expected[module]))
    wrong = sorted(m for m in set(reading.deltas) - set(expected) if not _is_zero(reading.deltas[m]))
    native = len(set(reading.native) & set(expected))
    return Fidelity(reading.tool, len(applied), len(expected), worst, None, wrong, native)
