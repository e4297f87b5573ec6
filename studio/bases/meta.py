"""Build module trees from the models themselves, on the meta device (no weights allocated).

This is the only place trees are derived from; `studio.bases.trees` only stores and reads them.
Imports torch, diffusers and transformers, so it runs when a tree is (re)generated or a new
pipeline folder is seen, never when a stored tree is read.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from studio.bases.trees import ModuleInfo, ModuleTree

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
DENOISERS = ("unet", "transformer")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


def tree_from_components(components: dict[str, nn.Module], arch: str, unet_config: dict | None = None) -> ModuleTree:
    """Collect every Linear / Conv2d of the given components (a live or meta pipeline)."""
    modules: dict[str, ModuleInfo] = {}
    for component_name, component in components.items():
        for module_name, module in component.named_modules():
            if isinstance(module, nn.Linear):
                kind = "linear"
            elif isinstance(module, nn.Conv2d):
                kind = "conv"
            else:
                continue
            modules[f"{component_name}.{module_name}"] = ModuleInfo(kind, tuple(module.weight.shape))
    return ModuleTree(arch, modules, dict(unet_config or {}))


def arch_config(arch: str) -> dict:
    """The bundled config of a real architecture (``studio/configs/<arch>.json``)."""
    return json.loads((CONFIG_DIR / f"{arch}.json").read_text())


def denoiser_on_meta(config: dict) -> nn.Module:
    """A UNet2DConditionModel, FluxTransformer2DModel or SD3Transformer2DModel from its config."""
    import diffusers

    cls = getattr(diffusers, config.get("_class_name", "UNet2DConditionModel"))
    with torch.device("meta"):
        return cls.from_config(config)


def text_encoder_on_meta(config: dict) -> nn.Module:
    """A CLIP or T5 text encoder from a bundled config (``_class`` names the transformers class)."""
    import transformers

    config = dict(config)
    name = config.pop("_class")
    config_class = transformers.T5Config if name.startswith("T5") else transformers.CLIPTextConfig
    with torch.device("meta"):
        return getattr(transformers, name)(config_class(**config))


def build_architecture_tree(arch: str) -> ModuleTree:
    """The tree of a real architecture, from its bundled config."""
    config = arch_config(arch)
    denoiser = next(name for name in DENOISERS if name in config)
    components: dict[str, nn.Module] = {denoiser: denoiser_on_meta(config[denoiser])}
    for name in TEXT_ENCODERS:
        if name in config:
            components[name] = text_encoder_on_meta(config[name])
    return tree_from_components(components, arch, config[denoiser])


def _folder_component(root: Path, name: str, library: str, class_name: str) -> tuple[nn.Module, dict]:
    if library == "diffusers":
        import diffusers

        cls = getattr(diffusers, class_name)
        config = dict(cls.load_config(root / name))
        with torch.device("meta"):
            return cls.from_config(config), config
    import transformers

    config = transformers.AutoConfig.from_pretrained(root / name, local_files_only=True)
    with torch.device("meta"):
        return getattr(transformers, class_name)(config), {}


def build_folder_tree(root: Path, arch_of) -> ModuleTree:
    """The tree of a diffusers pipeline folder; ``arch_of(denoiser_config)`` names its architecture."""
    index = json.loads((root / "model_index.json").read_text())
    components: dict[str, nn.Module] = {}
    denoiser_config: dict = {}
    for name in DENOISERS + TEXT_ENCODERS:
        entry = index.get(name)
        if not entry or entry[0] is None:
            continue
        components[name], config = _folder_component(root, name, entry[0], entry[1])
        if name in DENOISERS:
            denoiser_config = {**config, "_class_name": entry[1]}
    return tree_from_components(components, arch_of(root, denoiser_config), denoiser_config)
