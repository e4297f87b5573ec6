"""Everything a run needs before its first step: pipeline, adapter, encoded data, optimizer.

Images are VAE-encoded once and captions text-encoded once (the base is frozen), so a step is one
UNet forward and backward. The losses are pure functions of (seed, step): noise and timesteps
come from a generator seeded per micro-step, which is what makes resume exact.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from studio.adapters import registry
from studio.bases import ModuleTree, load_pipeline, module_tree, pipeline_tree
from studio.errors import BaseNotFoundError, ConfigError
from studio.train import data as data_mod
from studio.train.apply import Attached, Trainee, freeze, trainable_parameters
from studio.train.config import TrainConfig

VALIDATION_TIMESTEPS = 4
VALIDATION_ITEMS = 8


@dataclass
class Encoded:
    """Cached latents and text embeddings of a set of pairs."""

    latents: Tensor
    embeddings: Tensor
    weights: list[int]
    captions: list[str]


@dataclass
class Session:
    """The live objects of a run."""

    config: TrainConfig
    accelerator: Any
    pipe: Any
    tree: ModuleTree
    family_config: Any
    adapter: nn.Module
    attached: Attached
    model: nn.Module
    optimizer: Any
    lr_schedule: Any
    noise_scheduler: Any
    train: Encoded
    validation: Encoded
    scan: data_mod.Scan
    resolution: int
    weight_dtype: torch.dtype
    notes: list[str] = field(default_factory=list)


def precision(config: TrainConfig) -> str:
    """accelerate's mixed_precision: fp32 ('no') on CPU; 'auto' is bf16 where supported, else fp16."""
    if not torch.cuda.is_available():
        return "no"
    if config.mixed_precision == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return config.mixed_precision


def _tree(base: str, pipe: Any) -> ModuleTree:
    try:
        tree = module_tree(base)
    except BaseNotFoundError:
        return pipeline_tree(pipe)
    live = pipeline_tree(pipe, tree.arch)
    return live if set(live.modules) != set(tree.modules) else tree


def _encode_images(pipe: Any, pairs: list[data_mod.Pair], resolution: int, dtype: torch.dtype, device: Any) -> Tensor:
    vae = pipe.vae
    scale = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    chunks = []
    for start in range(0, len(pairs), 8):
        images = torch.stack([data_mod.image_tensor(p.image, resolution) for p in pairs[start:start + 8]])
        with torch.no_grad():
            mean = vae.encode(images.to(device, dtype)).latent_dist.mean
        chunks.append(((mean.float() - shift) * scale))
    return torch.cat(chunks)


def encode_prompts(pipe: Any, prompts: list[str], device: Any) -> Tensor:
    """Text-encoder hidden states of each prompt (padded to the tokenizer's max length)."""
    tokens = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return pipe.text_encoder(tokens.input_ids.to(device))[0].float()


def encode(pipe: Any, pairs: list[data_mod.Pair], resolution: int, dtype: torch.dtype, device: Any) -> Encoded:
    """Latents and embeddings of ``pairs`` (empty tensors for no pairs)."""
    if not pairs:
        return Encoded(torch.empty(0), torch.empty(0), [], [])
    latents = _encode_images(pipe, pairs, resolution, dtype, device)
    captions = [p.caption for p in pairs]
    return Encoded(latents, encode_prompts(pipe, captions, device), [p.repeats for p in pairs], captions)


def lr_lambda(config: TrainConfig):
    """Linear warmup, then constant or cosine to zero."""
    def factor(step: int) -> float:
        if step < config.lr_warmup_steps:
            return (step + 1) / (config.lr_warmup_steps + 1)
        if config.lr_schedule == "cosine":
            progress = (step - config.lr_warmup_steps) / max(1, config.steps - config.lr_warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0
    return factor


def _load(config: TrainConfig, device: Any, weight_dtype: torch.dtype) -> Any:
    pipe = load_pipeline(config.base, torch.float32, device)
    if getattr(pipe, "text_encoder_2", None) is not None:
        raise ConfigError(f"base {config.base!r}: SDXL training is not supported yet (SD1.x/SD2.x-style bases only)")
    freeze(pipe.unet, pipe.vae, pipe.text_encoder)
    pipe.to(device, weight_dtype)
    return pipe


def start(config: TrainConfig, scan: data_mod.Scan) -> Session:
    """Build the run: load and freeze the base, build the adapter, encode the data, prepare with accelerate."""
    from accelerate import Accelerator
    from diffusers import DDPMScheduler

    mixed = precision(config)
    accelerator = Accelerator(mixed_precision=mixed, gradient_accumulation_steps=config.grad_accumulation, cpu=not torch.cuda.is_available())
    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed, torch.float32)
    pipe = _load(config, accelerator.device, weight_dtype)
    tree = _tree(config.base, pipe)
    family_config = registry.make_config(config.family, config.adapter)
    torch.manual_seed(config.seed)
    adapter = registry.build_adapter(config.family, family_config, tree).to(accelerator.device)
    resolution = config.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    train_pairs, val_pairs = data_mod.split(scan.pairs, config.validation_split, config.seed)
    train_set = encode(pipe, train_pairs, resolution, weight_dtype, accelerator.device)
    val_set = encode(pipe, val_pairs or train_pairs[:VALIDATION_ITEMS], resolution, weight_dtype, accelerator.device)
    attached = Attached(pipe.unet, adapter)
    optimizer = torch.optim.AdamW(trainable_parameters(adapter), lr=config.learning_rate, weight_decay=config.weight_decay)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    model, optimizer = accelerator.prepare(Trainee(pipe.unet, adapter), optimizer)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    return Session(config, accelerator, pipe, tree, family_config, adapter, attached, model, optimizer, lr_schedule,
                   noise_scheduler, train_set, val_set, scan, resolution, weight_dtype)


def _target(session: Session, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    kind = session.noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return session.noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ConfigError(f"scheduler prediction_type {kind!r} is not supported (epsilon or v_prediction)")


def _mse(session: Session, model: nn.Module, latents: Tensor, embeddings: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    device = session.accelerator.device
    latents, noise, timesteps = latents.to(device), noise.to(device), timesteps.to(device)
    noisy = session.noise_scheduler.add_noise(latents, noise, timesteps)
    with session.accelerator.autocast():
        prediction = model(noisy.to(session.weight_dtype), timesteps, embeddings.to(device, session.weight_dtype))
    return F.mse_loss(prediction.float(), _target(session, latents, noise, timesteps).float())


def step_loss(session: Session, micro_step: int) -> Tensor:
    """The training loss of one micro-batch: a pure function of (seed, micro_step, process)."""
    accelerator, config = session.accelerator, session.config
    items = data_mod.batch_indices(session.train.weights, micro_step, config.batch_size,
                                   accelerator.process_index, accelerator.num_processes, config.seed)
    generator = torch.Generator().manual_seed(config.seed * 7_919 + micro_step * 104_729 + accelerator.process_index)
    latents = session.train.latents[items]
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, session.noise_scheduler.config.num_train_timesteps, (len(items),), generator=generator)
    return _mse(session, session.model, latents, session.train.embeddings[items], noise, timesteps)


@torch.no_grad()
def validation_loss(session: Session) -> float:
    """MSE on the held-out pairs at fixed noise and evenly spread timesteps (comparable across steps)."""
    val = session.validation
    total = session.noise_scheduler.config.num_train_timesteps
    generator = torch.Generator().manual_seed(session.config.seed + 12_345)
    model = session.accelerator.unwrap_model(session.model)
    losses = []
    for k in range(VALIDATION_TIMESTEPS):
        timesteps = torch.full((len(val.latents),), int(total * (k + 0.5) / VALIDATION_TIMESTEPS), dtype=torch.long)
        noise = torch.randn(val.latents.shape, generator=generator)
        losses.append(float(_mse(session, model, val.latents, val.embeddings, noise, timesteps)))
    session.attached.clear()
    return sum(losses) / len(losses)


@torch.no_grad()
def sample_images(session: Session, prompts: list[str]) -> list[tuple[str, int, Any]]:
    """Images at the config's fixed seeds for each prompt, with the adapter applied."""
    config, pipe = session.config, session.pipe
    out = []
    for prompt in prompts:
        for seed in config.sample_seeds:
            generator = torch.Generator(device="cpu").manual_seed(seed)
            image = pipe(prompt, num_inference_steps=config.sample_steps, guidance_scale=config.sample_guidance,
                         height=session.resolution, width=session.resolution, generator=generator).images[0]
            out.append((prompt, seed, image))
    session.attached.clear()
    return out


def family_knobs(session: Session) -> dict[str, Any]:
    """The family config with its defaults filled in, JSON-able."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(session.family_config).items()}
