"""What a generate request will cost (memory, compute, time) before anything is allocated.

The verb layer refuses requests early with this (its caps are its own). The engine's denoiser
(a UNet, or a FLUX.1 / SD3 transformer with its packed / patched tokens and text tokens) and VAE
decoder are run once each at three small latent sizes on the meta device (no memory, no
weights touched) under ``torch.utils.flop_counter.FlopCounterMode`` and a probe that follows the
bytes of tensors alive; per latent pixel count P, FLOPs and peak bytes are then fitted exactly
as ``a + b P + c P^2`` (convolutions and projections grow with P, self-attention with P^2) and
evaluated at the request's size. The P^2 bytes are the attention scores the meta run
materialises; fused attention kernels (SDPA's flash / memory-efficient paths on CUDA, its
flash kernel on CPU) never hold them, so they are reported apart (``attention_bytes``) and left
out of ``peak_bytes`` unless ``fused_attention=False``. Seconds are FLOPs over a throughput the
engine measured on its own generations since its first estimate, else a stated default.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

PROBE_SIDES = (8, 16, 24)  # latent sides of the meta runs (multiples of 8 fit every SD UNet)
DEFAULT_FLOPS_PER_SECOND = {"cuda": 150e12, "cpu": 0.2e12}  # stated guesses until a run is observed


class _LiveBytes(TorchDispatchMode):
    """Peak bytes of tensors created inside the mode and alive at once (views share their base's)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = self._next = 0
        self._storage_of: dict[int, int] = {}  # id(tensor) -> storage number
        self._storages: dict[int, list[int]] = {}  # storage number -> [tensors alive, bytes]

    def _drop(self, tensor_id: int, storage: int) -> None:
        self._storage_of.pop(tensor_id, None)
        entry = self._storages[storage]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self._storages[storage]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        aliases = any(r.alias_info is not None for r in func._schema.returns)
        source = None
        if aliases:
            first = next((a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)), None)
            source = self._storage_of.get(id(first)) if first is not None else None
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and id(tensor) not in self._storage_of and (source is not None or not aliases):
                self._track(tensor, source)
        return out

    def _track(self, tensor: torch.Tensor, storage: int | None) -> None:
        if storage is None:
            self._next += 1
            storage = self._next
            self._storages[storage] = [0, tensor.untyped_storage().nbytes()]
            self.live += self._storages[storage][1]
            self.peak = max(self.peak, self.live)
        self._storages[storage][0] += 1
        self._storage_of[id(tensor)] = storage
        weakref.finalize(tensor, self._drop, id(tensor), storage)


@dataclass(frozen=True)
class Quadratic:
    """``a + b P + c P^2`` fitted through three points."""

    a: float
    b: float
    c: float

    @classmethod
    def through(cls, xs: list[float], ys: list[float]) -> "Quadratic":
        matrix = torch.tensor([[1.0, x, x * x] for x in xs], dtype=torch.float64)
        a, b, c = torch.linalg.solve(matrix, torch.tensor(ys, dtype=torch.float64)).tolist()
        return cls(a, b, c)

    def at(self, x: float, quadratic: bool = True) -> float:
        return max(0.0, self.a + self.b * x + (self.c * x * x if quadratic else 0.0))


@dataclass(frozen=True)
class CostModel:
    """Per latent pixel count: FLOPs and peak activation bytes of one UNet row and one VAE decode."""

    unet_flops: Quadratic  # the denoiser's (UNet or transformer), per row
    unet_bytes: Quadratic
    vae_flops: Quadratic
    vae_bytes: Quadratic
    weight_bytes: int
    dtype_bytes: int
    latent_scale: int = 8  # image pixels per latent pixel (the VAE's scale factor)
    cfg: bool = True  # whether guidance > 1 runs an unconditional batch too (not on FLUX.1)


def _probe(run: Callable[[int], Any]) -> tuple[Quadratic, Quadratic]:
    pixels, flops, peaks = [], [], []
    for side in PROBE_SIDES:
        with torch.no_grad(), FlopCounterMode(display=False) as counter, _LiveBytes() as live:
            run(side)
        pixels.append(float(side * side))
        flops.append(float(counter.get_total_flops()))
        peaks.append(float(live.peak))
    return Quadratic.through(pixels, flops), Quadratic.through(pixels, peaks)


def _unet_inputs(config: dict, side: int) -> dict:
    inputs = {"sample": torch.empty(1, config["in_channels"], side, side), "timestep": torch.tensor(1),
              "encoder_hidden_states": torch.empty(1, 77, config["cross_attention_dim"])}
    if config.get("addition_embed_type") == "text_time":
        text = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        inputs["added_cond_kwargs"] = {"text_embeds": torch.empty(1, text), "time_ids": torch.empty(1, 6)}
    return inputs


TEXT_TOKENS = {"flux1": 512, "sd3": 333}  # FLUX: T5 at max_sequence_length 512; SD3: 77 CLIP + 256 T5 tokens


def _flux_inputs(config: dict, side: int) -> dict:
    tokens, text = (side // 2) ** 2, TEXT_TOKENS["flux1"]
    return {"hidden_states": torch.empty(1, tokens, config["in_channels"]), "timestep": torch.tensor([1.0]),
            "encoder_hidden_states": torch.empty(1, text, config["joint_attention_dim"]),
            "pooled_projections": torch.empty(1, config["pooled_projection_dim"]),
            "img_ids": torch.empty(tokens, 3), "txt_ids": torch.empty(text, 3),
            "guidance": torch.tensor([3.5]) if config.get("guidance_embeds") else None}


def _sd3_inputs(config: dict, side: int) -> dict:
    return {"hidden_states": torch.empty(1, config["in_channels"], side, side), "timestep": torch.tensor([1.0]),
            "encoder_hidden_states": torch.empty(1, TEXT_TOKENS["sd3"], config["joint_attention_dim"]),
            "pooled_projections": torch.empty(1, config["pooled_projection_dim"])}


INPUTS = {"sd": _unet_inputs, "sdxl": _unet_inputs, "flux1": _flux_inputs, "sd3": _sd3_inputs}
WEIGHTED = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")


def cost_model(pipe: Any, dtype: torch.dtype) -> CostModel:
    """Probe the pipeline's denoiser and VAE decoder on the meta device (float32 there; bytes rescaled)."""
    from diffusers import AutoencoderKL

    from studio.bases.family import base_of

    base = base_of(pipe)
    denoiser = getattr(pipe, base.denoiser)
    denoiser_config, vae_config = dict(denoiser.config), dict(pipe.vae.config)
    with torch.device("meta"):
        model = type(denoiser).from_config(denoiser_config).eval()
        vae = AutoencoderKL.from_config(vae_config).eval()

    def run_denoiser(side: int) -> None:
        with torch.device("meta"):
            model(**INPUTS[base.id](denoiser_config, side))

    def run_vae(side: int) -> None:
        with torch.device("meta"):
            vae.decode(torch.empty(1, vae_config["latent_channels"], side, side))

    unet_flops, unet_bytes = _probe(run_denoiser)
    vae_flops, vae_bytes = _probe(run_vae)
    weights = sum(p.numel() * p.element_size() for name in WEIGHTED
                  if isinstance(getattr(pipe, name, None), torch.nn.Module) for p in getattr(pipe, name).parameters())
    return CostModel(unet_flops, unet_bytes, vae_flops, vae_bytes, int(weights), torch.empty(0, dtype=dtype).element_size(),
                     int(pipe.vae_scale_factor), base.guidance == "cfg")


@dataclass(frozen=True)
class RequestEstimate:
    """What one pipeline call for a request costs (see the module docstring for how it is made)."""

    width: int
    height: int
    images: int
    steps: int
    unet_rows: int  # denoiser rows: images x 2 with classifier-free guidance
    latent_pixels: int
    weight_bytes: int
    activation_bytes: int  # the larger of the UNet's and the VAE decoder's peak, fused attention
    attention_bytes: int  # attention scores a non-fused (math) attention path would hold on top
    peak_bytes: int  # weights + activations (+ attention scores when not fused)
    tflop: float  # steps x denoiser + VAE decode, in 1e12 floating-point operations
    seconds: float
    seconds_from: str  # "measured" (this engine's previous runs) or "default guess"


def estimate_request(model: CostModel, size: tuple[int, int], images: int, steps: int, guidance: float,
                     throughput: tuple[float, bool], fused_attention: bool = True) -> RequestEstimate:
    """Evaluate a cost model at a request's size (pure arithmetic, nothing allocated).

    ``throughput``: (FLOP/s, whether it was measured on this engine rather than guessed).
    """
    (width, height), (flops_per_second, measured) = size, throughput
    latent = (width // model.latent_scale) * (height // model.latent_scale)
    rows = images * (2 if model.cfg and guidance > 1 else 1)
    scale = model.dtype_bytes / 4  # the probe ran in float32
    unet_fused, vae_fused = model.unet_bytes.at(latent, False) * rows, model.vae_bytes.at(latent, False) * images
    unet_full, vae_full = model.unet_bytes.at(latent) * rows, model.vae_bytes.at(latent) * images
    activations = max(unet_fused, vae_fused) * scale
    attention = max(unet_full - unet_fused, vae_full - vae_fused, 0.0) * scale
    flops = steps * rows * model.unet_flops.at(latent) + images * model.vae_flops.at(latent)
    peak = model.weight_bytes + activations + (0.0 if fused_attention else attention)
    return RequestEstimate(
        width, height, images, steps, rows, latent, model.weight_bytes, int(activations), int(attention), int(peak),
        flops / 1e12, flops / flops_per_second, "measured" if measured else "default guess",
    )


def default_throughput(device: torch.device) -> float:
    return DEFAULT_FLOPS_PER_SECOND.get(device.type, DEFAULT_FLOPS_PER_SECOND["cpu"])
