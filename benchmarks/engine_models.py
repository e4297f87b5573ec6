"""Pipelines and adapters for the engine benchmarks, built from configs (random weights, no hub).

``build_pipeline("sd15" | "sdxl", device, dtype)``: the real SD1.5 / SDXL architectures from
``studio/configs`` (UNet and text encoders) plus the standard SD VAE, random weights, built on the
device; the world's word-level tokenizer stands in for CLIP's (token ids only matter for speed).
``quick=True`` shrinks the UNet and VAE for a CPU smoke run. ``build_pipeline("world", ...)``
loads the embedded world. ``random_loras`` makes rank-r LoRAs on to_q / to_k / to_v / to_out.0.
"""

from __future__ import annotations

import json
import time
from typing import Callable

import torch

from studio.adapters.base import AdapterBase
from studio.adapters.lora import LoraAdapter, LoraLayer
from studio.bases import CONFIG_DIR, world_dir

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
SD_VAE = {  # the VAE of SD1.x / SDXL (diffusers AutoencoderKL config)
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "act_fn": "silu", "norm_num_groups": 32,
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
}


def timed(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> float:
    """Median milliseconds of ``fn`` (CUDA events on GPU, perf_counter on CPU)."""
    import statistics

    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            samples.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - began) * 1000)
    return statistics.median(samples)


def unet_config(arch: str, quick: bool) -> dict:
    config = json.loads((CONFIG_DIR / f"{arch}.json").read_text())["unet"]
    if not quick:
        return config
    blocks = len(config["block_out_channels"])
    config.update(block_out_channels=[40, 80, 160, 160][:blocks], layers_per_block=1, cross_attention_dim=64,
                  norm_num_groups=8, sample_size=8)
    if arch == "sdxl":
        config.update(transformer_layers_per_block=[1, 1, 1], addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32)
    return config


def build_unet(config: dict, device: torch.device, dtype: torch.dtype):
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        unet = UNet2DConditionModel.from_config(config)
    return unet.to(dtype=dtype).eval().requires_grad_(False)


def _text_encoder(config: dict, device: torch.device, dtype: torch.dtype, quick: bool, width: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = dict(config)
    cls = CLIPTextModelWithProjection if config.pop("_class") == "CLIPTextModelWithProjection" else CLIPTextModel
    if quick:
        config.update(hidden_size=width or 32, intermediate_size=2 * (width or 32), num_hidden_layers=1, num_attention_heads=2,
                      projection_dim=width or 32)
    with torch.device(device):
        model = cls(CLIPTextConfig(**config))
    return model.to(dtype).eval().requires_grad_(False)


def _tokenizer():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(world_dir() / "tokenizer"))
    tokenizer.model_max_length = 77
    return tokenizer


def build_pipeline(arch: str, device: torch.device, dtype: torch.dtype, quick: bool = False):
    """A full diffusers pipeline of ``arch`` with random weights on ``device`` (see the module docstring)."""
    if arch == "world":
        from studio.bases import load_pipeline

        return load_pipeline("world", dtype=dtype, device=device)
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    config = json.loads((CONFIG_DIR / f"{arch}.json").read_text())
    unet = build_unet(unet_config(arch, quick), device, dtype)
    vae_config = dict(SD_VAE, block_out_channels=[32, 32], down_block_types=["DownEncoderBlock2D"] * 2,
                      up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1, norm_num_groups=8) if quick else dict(SD_VAE)
    if arch == "sdxl":
        vae_config.update(scaling_factor=0.13025, force_upcast=True)
    with torch.device(device):
        vae = AutoencoderKL.from_config(vae_config)
    vae = vae.to(dtype).eval().requires_grad_(False)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    cross = unet.config.cross_attention_dim
    if arch == "sdxl":
        first = _text_encoder(config["text_encoder"], device, dtype, quick, 32)
        second = _text_encoder(config["text_encoder_2"], device, dtype, quick, 32)
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=first, text_encoder_2=second, tokenizer=_tokenizer(),
                                         tokenizer_2=_tokenizer(), unet=unet, scheduler=scheduler)
    else:
        text = _text_encoder(config["text_encoder"], device, dtype, quick, cross)
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=_tokenizer(), unet=unet, scheduler=scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def target_layers(unet) -> list[str]:
    return [name for name, _ in unet.named_modules() if name.endswith(TARGETS) and ".attn" in name]


def random_loras(unet, count: int, rank: int, seed: int = 1, targets: list[str] | None = None, component: str = "unet",
                 stem: str = "lora") -> list[LoraAdapter]:
    """``count`` rank-r LoRAs (alpha = rank) on ``targets`` of the model (default: every attention
    projection of the UNet), named ``STEM0, STEM1, ...`` with layers ``COMPONENT.MODULE``."""
    modules = dict(unet.named_modules())
    generator = torch.Generator("cpu").manual_seed(seed)
    adapters = []
    for index in range(count):
        layers = {}
        for name in targets if targets is not None else target_layers(unet):
            out_features, in_features = modules[name].weight.shape
            down = torch.randn(rank, in_features, generator=generator) / in_features ** 0.5
            up = torch.randn(out_features, rank, generator=generator) * 0.01
            layers[f"{component}.{name}"] = LoraLayer(down, up, float(rank))
        adapters.append(LoraAdapter(f"{stem}{index}", layers))
    return adapters


def merge_floor(model, loras: list[LoraAdapter], timer: Callable[[Callable[[], object]], float]) -> tuple[float, list[torch.Tensor]]:
    """The plain-torch merge floor every switch row is measured against: ``W += dW`` per layer
    with dense dW precomputed on the device, alternating two adapters; the weights are restored
    afterwards. Returns the timed ms and the targeted weights (in the adapters' layer order)."""
    modules = dict(model.named_modules())
    prefixed = loras[0].layers()
    weights = [modules[layer.partition(".")[2]].weight.detach() for layer in prefixed]
    dense = [[lora.delta(layer).to(w.device, w.dtype).view_as(w) for layer, w in zip(prefixed, weights)] for lora in loras[:2]]
    state = {"i": 0}

    def merge():
        state["i"] ^= 1
        for w, dw in zip(weights, dense[state["i"]]):
            w.add_(dw)

    pristine = [w.clone() for w in weights]
    with torch.no_grad():
        floor = timer(merge)
        for w, p in zip(weights, pristine):
            w.copy_(p)
    return floor, weights


class SharedMember(AdapterBase):
    """A member of a shared-basis collection (declares factors and a shared basis)."""

    has_factors = True
    has_shared_basis = True

    def __init__(self, name: str, bases: dict, cores: dict):
        self.name, self.bases, self.cores = name, bases, cores

    def layers(self) -> list[str]:
        return list(self.cores)

    def basis(self, layer: str):
        return self.bases[layer]

    def core(self, layer: str):
        return self.cores[layer]

    def factors(self, layer: str):
        down_basis, up_basis = self.bases[layer]
        return self.cores[layer] @ down_basis, up_basis

    def delta(self, layer: str):
        down, up = self.factors(layer)
        return up @ down


def shared_collection(loras: list[LoraAdapter], k: int) -> list[SharedMember]:
    generator = torch.Generator("cpu").manual_seed(2)
    bases = {}
    for layer, lora_layer in loras[0].lora_layers.items():
        out_features, in_features = lora_layer.out_features, lora_layer.in_features
        bases[layer] = (torch.linalg.qr(torch.randn(in_features, k, generator=generator))[0].T.contiguous(),
                        torch.linalg.qr(torch.randn(out_features, k, generator=generator))[0].contiguous())
    return [SharedMember(f"m{i}", bases, {layer: torch.randn(k, k, generator=generator) * 0.01 for layer in bases}) for i in range(len(loras))]


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
