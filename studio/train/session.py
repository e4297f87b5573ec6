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
from studio.train import conditioning as conditioning_mod
from studio.train import data as data_mod
from studio.train import validation as validation_mod
from studio.engine.patch import Attachment
from studio.train.apply import Trainee, freeze, trainable_parameters
from studio.train.config import TrainConfig

VALIDATION_TIMESTEPS = 8  # evenly spread over the whole range: the high-noise end is where samples break
VALIDATION_ITEMS = 8
SNR_CAP = 1000.0  # as kohya's debiased estimation: the weights of the last few low-noise steps stay bounded
COSINE_FLOOR = 0.05  # cosine schedules end at 5% of the peak learning rate


@dataclass
class Encoded:
    """Cached latents, token ids and (when the text encoders stay frozen) conditioning of pairs."""

    latents: Tensor
    tokens: conditioning_mod.Tokens
    conditioning: conditioning_mod.Conditioning | None
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
    attached: Attachment
    model: nn.Module
    optimizer: Any
    lr_schedule: Any
    noise_scheduler: Any
    train: Encoded
    validation: Encoded
    scan: data_mod.Scan
    resolution: int
    weight_dtype: torch.dtype
    conditioner: Any = None
    notes: list[str] = field(default_factory=list)

    @property
    def trains_text_encoder(self) -> bool:
        """Whether any adapter layer sits in a text encoder (then embeddings are live, not cached)."""
        return any(not layer.startswith("unet.") for layer in self.adapter.layers())


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


@torch.no_grad()
def _cached_conditioning(conditioner: Any, tokens: conditioning_mod.Tokens, resolution: int, chunk: int = 64) -> conditioning_mod.Conditioning:
    count = next(iter(tokens.values())).shape[0]
    parts = [conditioner.embed({k: v[i:i + chunk] for k, v in tokens.items()}, resolution) for i in range(0, count, chunk)]
    return conditioning_mod.detached(conditioning_mod.concat(parts))


def encode(pipe: Any, conditioner: Any, pairs: list[data_mod.Pair], resolution: int, dtype: torch.dtype, device: Any,
           cache_conditioning: bool = True) -> Encoded:
    """Latents, token ids and (``cache_conditioning``) the frozen text encoders' conditioning of ``pairs``."""
    if not pairs:
        return Encoded(torch.empty(0), {}, None, [], [])
    latents = _encode_images(pipe, pairs, resolution, dtype, device)
    captions = [p.caption for p in pairs]
    tokens = conditioner.tokens(captions)
    cached = _cached_conditioning(conditioner, tokens, resolution) if cache_conditioning else None
    return Encoded(latents, tokens, cached, [p.repeats for p in pairs], captions)


def lr_factor(step: int, steps: int, warmup: int, schedule: str = "cosine") -> float:
    """The learning rate of ``step`` as a share of the peak: linear warmup, then constant or
    cosine down to ``COSINE_FLOOR`` of the peak (also the world's VAE, base and zoo schedule)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "cosine":
        progress = (step - warmup) / max(1, steps - warmup)
        return COSINE_FLOOR + (1 - COSINE_FLOOR) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


def lr_lambda(config: TrainConfig):
    """``lr_factor`` of a run's config, for ``torch.optim.lr_scheduler.LambdaLR``."""
    return lambda step: lr_factor(step, config.steps, config.lr_warmup_steps, config.lr_schedule)


TRAINABLE_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def components(pipe: Any) -> dict[str, nn.Module]:
    """The pipeline's modules an adapter may target, by component name."""
    return {name: getattr(pipe, name) for name in TRAINABLE_COMPONENTS if getattr(pipe, name, None) is not None}


def _load(config: TrainConfig, device: Any, weight_dtype: torch.dtype) -> Any:
    pipe = load_pipeline(config.base, torch.float32, device)
    conditioning_mod.conditioner_for(pipe)  # refuses bases the loop cannot condition, before any work
    freeze(pipe.vae, *components(pipe).values())
    pipe.to(device, weight_dtype)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
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
    conditioner = conditioning_mod.conditioner_for(pipe)
    live_text = any(not layer.startswith("unet.") for layer in adapter.layers())
    train_pairs, val_pairs = data_mod.split(scan.pairs, config.validation_split, config.seed)
    train_set = encode(pipe, conditioner, train_pairs, resolution, weight_dtype, accelerator.device, not live_text)
    val_set = encode(pipe, conditioner, val_pairs or train_pairs[:VALIDATION_ITEMS], resolution, weight_dtype, accelerator.device, not live_text)
    attached = Attachment(components(pipe), adapter)
    optimizer = torch.optim.AdamW(trainable_parameters(adapter), lr=config.learning_rate, weight_decay=config.weight_decay)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    model, optimizer = accelerator.prepare(Trainee(pipe.unet, adapter), optimizer)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    return Session(config, accelerator, pipe, tree, family_config, adapter, attached, model, optimizer, lr_schedule,
                   noise_scheduler, train_set, val_set, scan, resolution, weight_dtype, conditioner)


def _target(session: Session, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    kind = session.noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return session.noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ConfigError(f"scheduler prediction_type {kind!r} is not supported (epsilon or v_prediction)")


def timestep_weights(scheduler: Any, timesteps: Tensor, kind: str, gamma: float = 5.0) -> Tensor:
    """Per-sample loss weights of a noise-prediction loss (config ``loss_weighting``).

    With SNR = a / (1 - a) (a = alphas_cumprod[t]): an error e in the predicted noise is an error
    e / sqrt(SNR) in the clean image the sampler estimates from it, so at high noise (SNR -> 0)
    a tiny error in the noise becomes noise left in the image. ``sampler`` weighs each step's
    error at least as much as that amplification (never below 1); ``debiased`` is 1/sqrt(SNR)
    (kohya's debiased estimation); ``min_snr`` is min(SNR, gamma)/SNR (Hang et al. 2023); ``none``
    is the plain mean."""
    if kind == "none":
        return torch.ones(timesteps.shape, dtype=torch.float32, device=timesteps.device)
    alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = (alphas / (1 - alphas)).clamp(max=SNR_CAP)
    if kind == "min_snr":
        return snr.clamp(max=gamma) / snr
    if kind == "debiased":
        return snr.rsqrt()
    if kind == "sampler":
        return snr.rsqrt().clamp(min=1.0)
    raise ConfigError(f"loss_weighting {kind!r} is not known (none, min_snr, debiased, sampler)")


def conditioning_of(session: Session, data: Encoded, items: Tensor | list[int]) -> conditioning_mod.Conditioning:
    """The denoiser's conditioning of rows ``items``: cached, or computed now through the trained
    text-encoder layers (with gradients)."""
    device = session.accelerator.device
    if data.conditioning is not None:
        return conditioning_mod.select(data.conditioning, items, device, session.weight_dtype)
    tokens = {key: value[items] for key, value in data.tokens.items()}
    with session.accelerator.autocast():
        live = session.conditioner.embed(tokens, session.resolution)
    return conditioning_mod.select(live, slice(None), device, session.weight_dtype)


def _mse(session: Session, model: nn.Module, latents: Tensor, conditioning: conditioning_mod.Conditioning, noise: Tensor,
         timesteps: Tensor, weighting: str = "none") -> Tensor:
    """Mean (weighted) squared error of the model's prediction at ``timesteps``."""
    device = session.accelerator.device
    latents, noise, timesteps = latents.to(device), noise.to(device), timesteps.to(device)
    noisy = session.noise_scheduler.add_noise(latents, noise, timesteps)
    with session.accelerator.autocast():
        prediction = model(noisy.to(session.weight_dtype), timesteps, conditioning)
    errors = (prediction.float() - _target(session, latents, noise, timesteps).float()).pow(2).flatten(1).mean(dim=1)
    weights = timestep_weights(session.noise_scheduler, timesteps, weighting, session.config.min_snr_gamma)
    return (errors * weights).mean()


def step_loss(session: Session, micro_step: int) -> Tensor:
    """The training loss of one micro-batch: a pure function of (seed, micro_step, process)."""
    accelerator, config = session.accelerator, session.config
    items = data_mod.batch_indices(session.train.weights, micro_step, config.batch_size,
                                   accelerator.process_index, accelerator.num_processes, config.seed)
    generator = torch.Generator().manual_seed(config.seed * 7_919 + micro_step * 104_729 + accelerator.process_index)
    latents = session.train.latents[items]
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, session.noise_scheduler.config.num_train_timesteps, (len(items),), generator=generator)
    conditioning = conditioning_of(session, session.train, items)
    return _mse(session, session.model, latents, conditioning, noise, timesteps, config.loss_weighting)


@torch.no_grad()
def validation_loss(session: Session) -> float:
    """MSE on the held-out pairs at fixed noise and evenly spread timesteps (comparable across steps)."""
    val, count = session.validation, len(session.validation.latents)
    model = session.accelerator.unwrap_model(session.model)
    conditioning = conditioning_of(session, val, list(range(count)))

    def loss(rows: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:  # all rows at once: the conditioning as computed
        return _mse(session, model, val.latents[rows], conditioning, noise, timesteps)

    grids = validation_mod.level_grids(count, session.noise_scheduler.config.num_train_timesteps, VALIDATION_TIMESTEPS)
    value = validation_mod.fixed_draws_loss(loss, count, val.latents.shape[1:], grids, session.config.seed + 12_345)
    session.attached.clear()
    return value


@torch.no_grad()
def sample_images(session: Session, prompts: list[str], adapter: bool = True) -> list[tuple[str, int, Any]]:
    """Images at the config's fixed seeds for each prompt, with the adapter applied (or, for the
    baseline next to them, without it)."""
    config, pipe = session.config, session.pipe
    out = []
    session.attached.enabled = adapter
    try:
        for prompt in prompts:
            for seed in config.sample_seeds:
                generator = torch.Generator(device="cpu").manual_seed(seed)
                image = pipe(prompt, num_inference_steps=config.sample_steps, guidance_scale=config.sample_guidance,
                             height=session.resolution, width=session.resolution, generator=generator).images[0]
                out.append((prompt, seed, image))
    finally:
        session.attached.enabled = True
        session.attached.clear()
    return out


def family_knobs(session: Session) -> dict[str, Any]:
    """The family config with its defaults filled in, JSON-able."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(session.family_config).items()}
