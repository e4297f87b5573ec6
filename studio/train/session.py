"""Everything a run needs before its first step: pipeline, adapter, encoded data, optimizer.

Images are VAE-encoded once and captions text-encoded once (the base is frozen), so a step is one
denoiser forward and backward. The losses are pure functions of (seed, step): noise and timesteps
come from a generator seeded per micro-step, which is what makes resume exact.

Every base trains through the same step (``studio.bases.base_of(pipe)`` says how):
- SD1.x / SD2.x / SDXL (UNet): DDPM noising at integer timesteps, epsilon or v target from the
  scheduler's prediction_type, timestep loss weighting (``timestep_weights``);
- FLUX.1 / SD3 (transformer): flow matching with the pipeline's own FlowMatchEulerDiscreteScheduler
  tables (its ``timesteps`` / ``sigmas`` at 1000 training steps, shift included): x_t = (1 - sigma)
  x0 + sigma noise, target noise - x0; timesteps drawn uniformly over the table or by the SD3
  paper's logit-normal (``timestep_sampling``); the loss is the plain mean (``loss_weighting``
  none / sampler; min_snr and debiased are defined through the DDPM SNR and refused). FLUX
  latents are packed into 2x2 tokens and FLUX.1-dev gets ``guidance`` as its embedding.
An adapter's ``components`` default to the base's denoiser (``unet`` or ``transformer``); text
encoders train where the family's ``components`` name them (SD's CLIP, SDXL's two, FLUX's CLIP).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from studio.adapters import registry
from studio.bases import ModuleTree, load_pipeline, module_tree, pipeline_tree
from studio.bases.conditioning import native_resolution, noisy_and_target
from studio.bases.family import Base, base_of
from studio.errors import BaseNotFoundError, ConfigError
from studio.train import checkpoint
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
# torch 2.11's cuDNN attention fails in backward with "an illegal memory access" on FLUX.1 at 1024 px on an
# H200 (BENCHMARKS.md, "FLUX.1 and SDXL training"); flash, memory-efficient and math attention train the same model
# cleanly, so training on CUDA leaves cuDNN out (generation keeps torch's own choice).
TRAINING_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class Encoded:
    """Cached latents, captions and (when the text encoders stay frozen) conditioning of pairs."""

    latents: Tensor
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
    base: Base | None = None
    notes: list[str] = field(default_factory=list)
    empty: conditioning_mod.Conditioning | None = None  # the empty caption's cached conditioning (caption dropout)

    @property
    def trains_text_encoder(self) -> bool:
        """Whether any adapter layer sits in a text encoder (then embeddings are live, not cached)."""
        return trains_text(self.adapter, self.base)


def trains_text(adapter: nn.Module, base: Base) -> bool:
    """Whether any of the adapter's layers is outside the base's denoiser."""
    return any(not layer.startswith(base.denoiser + ".") for layer in adapter.layers())


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
def _cached_conditioning(conditioner: Any, captions: list[str], chunk: int = 64) -> conditioning_mod.Conditioning:
    parts = [conditioning_mod.detached(conditioner.embed(captions[i:i + chunk])) for i in range(0, len(captions), chunk)]
    return conditioning_mod.concat(parts)


def encode(pipe: Any, conditioner: Any, pairs: list[data_mod.Pair], resolution: int, dtype: torch.dtype, device: Any,
           cache_conditioning: bool = True) -> Encoded:
    """Latents, captions and (``cache_conditioning``) the frozen text encoders' conditioning of ``pairs``."""
    if not pairs:
        return Encoded(torch.empty(0), None, [], [])
    latents = _encode_images(pipe, pairs, resolution, dtype, device)
    captions = [p.caption for p in pairs]
    cached = _cached_conditioning(conditioner, captions) if cache_conditioning else None
    return Encoded(latents, cached, [p.repeats for p in pairs], captions)


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


def components(pipe: Any) -> dict[str, nn.Module]:
    """The pipeline's modules an adapter may target, by component name (the base's ``adapter_components``)."""
    return {name: getattr(pipe, name) for name in base_of(pipe).adapter_components if isinstance(getattr(pipe, name, None), nn.Module)}


def _load(config: TrainConfig, device: Any, weight_dtype: torch.dtype) -> Any:
    """The frozen base in the weight dtype (loaded in it: a 12 B FLUX transformer is never held in fp32)."""
    pipe = load_pipeline(config.base, weight_dtype, device)
    conditioning_mod.conditioner_for(pipe)  # refuses bases the loop cannot condition, before any work
    freeze(pipe.vae, *components(pipe).values())
    pipe.to(device, weight_dtype)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    return pipe


def adapter_knobs(config: TrainConfig, base: Base) -> dict[str, Any]:
    """The ``[adapter]`` table with ``components`` defaulting to the base's denoiser (families that have it).

    A component the base does not have (``unet`` on FLUX, say) is refused, naming the ones it has."""
    from dataclasses import fields

    knobs = dict(config.adapter)
    if "components" not in {f.name for f in fields(registry.family(config.family).config_class)}:
        return knobs
    knobs.setdefault("components", (base.denoiser,))
    wanted = [knobs["components"]] if isinstance(knobs["components"], str) else list(knobs["components"])
    unknown = [name for name in wanted if name not in base.adapter_components]
    if unknown:
        raise ConfigError(f"[adapter] components {unknown}: {base.label} has no such component to adapt; "
                          f"its components are {', '.join(base.adapter_components)} (the denoiser is {base.denoiser!r})")
    return knobs


def check_objective(config: TrainConfig, base: Base, scheduler: Any) -> None:
    """Refuse loss options that are not defined for the base's training target (see the module docstring)."""
    if base.target == "flow":
        if config.loss_weighting not in FLOW_WEIGHTINGS:
            raise ConfigError(f"loss_weighting = {config.loss_weighting!r}: {base.label} trains by flow matching, where the "
                              "SNR weightings (min_snr, debiased) are not defined; use none or sampler (both the plain mean)")
        return
    if config.timestep_sampling != "uniform":
        raise ConfigError(f"timestep_sampling = {config.timestep_sampling!r} is for flow-matching bases (FLUX.1, SD3); "
                          f"{base.label} trains on DDPM timesteps: use uniform")
    kind = scheduler.config.prediction_type
    if kind not in ("epsilon", "v_prediction"):
        raise ConfigError(f"scheduler prediction_type {kind!r} is not supported (epsilon or v_prediction)")


def training_scheduler(pipe: Any, base: Base) -> Any:
    """The noise schedule training samples from: the pipeline's own flow-matching scheduler (fresh,
    its 1000-step tables untouched by sampling), or DDPM built from the pipeline's scheduler config."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    if base.target == "flow":
        return FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    return DDPMScheduler.from_config(pipe.scheduler.config)


def _resolution(config: TrainConfig, pipe: Any, base: Base) -> int:
    resolution = config.resolution or native_resolution(pipe)
    step = int(pipe.vae_scale_factor) * (2 if base.packed_latents else 1)
    if resolution % step:
        raise ConfigError(f"resolution = {resolution}: {base.label} with this VAE needs a multiple of {step}")
    return resolution


def start(config: TrainConfig, scan: data_mod.Scan) -> Session:
    """Build the run: load and freeze the base, build the adapter, encode the data, prepare with accelerate."""
    from accelerate import Accelerator

    mixed = precision(config)
    accelerator = Accelerator(mixed_precision=mixed, gradient_accumulation_steps=config.grad_accumulation, cpu=not torch.cuda.is_available())
    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed, torch.float32)
    leftovers = checkpoint.clean_leftovers(Path(config.output_dir)) if accelerator.is_main_process else []
    pipe = _load(config, accelerator.device, weight_dtype)
    base = base_of(pipe)
    noise_scheduler = training_scheduler(pipe, base)
    check_objective(config, base, noise_scheduler)
    tree = _tree(config.base, pipe)
    family_config = registry.make_config(config.family, adapter_knobs(config, base))
    torch.manual_seed(config.seed)
    adapter = registry.build_adapter(config.family, family_config, tree).to(accelerator.device)
    resolution = _resolution(config, pipe, base)
    conditioner = conditioning_mod.conditioner_for(pipe)
    live_text = trains_text(adapter, base)
    if config.gradient_checkpointing:
        getattr(pipe, base.denoiser).enable_gradient_checkpointing()
    train_pairs, val_pairs = data_mod.split(scan.pairs, config.validation_split, config.seed)
    train_set = encode(pipe, conditioner, train_pairs, resolution, weight_dtype, accelerator.device, not live_text)
    val_set = encode(pipe, conditioner, val_pairs or train_pairs[:VALIDATION_ITEMS], resolution, weight_dtype, accelerator.device, not live_text)
    attached = Attachment(components(pipe), adapter)
    optimizer = torch.optim.AdamW(trainable_parameters(adapter), lr=config.learning_rate, weight_decay=config.weight_decay)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    model, optimizer = accelerator.prepare(Trainee(pipe, adapter, config.guidance), optimizer)
    notes = [f"removed {len(leftovers)} half-written file(s) left by an interrupted run, e.g. {leftovers[0].name}"] if leftovers else []
    return Session(config, accelerator, pipe, tree, family_config, adapter, attached, model, optimizer, lr_schedule,
                   noise_scheduler, train_set, val_set, scan, resolution, weight_dtype, conditioner, base, notes)


FLOW_WEIGHTINGS = ("none", "sampler")


def sample_timesteps(session: Session, count: int, generator: torch.Generator) -> Tensor:
    """Training timesteps of one micro-batch: DDPM integers, or entries of the flow scheduler's table."""
    scheduler = session.noise_scheduler
    total = scheduler.config.num_train_timesteps
    if session.base.target != "flow":
        return torch.randint(0, total, (count,), generator=generator)
    if session.config.timestep_sampling == "logit_normal":
        index = (torch.sigmoid(torch.randn(count, generator=generator)) * total).long().clamp(max=total - 1)
    else:
        index = torch.randint(0, total, (count,), generator=generator)
    return scheduler.timesteps[index]


def validation_timesteps(session: Session, count: int, k: int) -> Tensor:
    """The k-th of ``VALIDATION_TIMESTEPS`` evenly spread timesteps, for ``count`` items."""
    scheduler = session.noise_scheduler
    total = scheduler.config.num_train_timesteps
    index = int(total * (k + 0.5) / VALIDATION_TIMESTEPS)
    if session.base.target == "flow":
        return scheduler.timesteps[index].expand(count).clone()
    return torch.full((count,), index, dtype=torch.long)


def timestep_weights(scheduler: Any, timesteps: Tensor, kind: str, gamma: float = 5.0, cap: float = 0.0) -> Tensor:
    """Per-sample loss weights of a noise-prediction loss (config ``loss_weighting``).

    With SNR = a / (1 - a) (a = alphas_cumprod[t]): an error e in the predicted noise is an error
    e / sqrt(SNR) in the clean image the sampler estimates from it, so at high noise (SNR -> 0)
    a tiny error in the noise becomes noise left in the image. ``sampler`` weighs each step's
    error at least as much as that amplification (never below 1); ``debiased`` is 1/sqrt(SNR)
    (kohya's debiased estimation); ``min_snr`` is min(SNR, gamma)/SNR (Hang et al. 2023); ``none``
    is the plain mean. For v-prediction (SD2.x 768) the clean image is sqrt(a) x_t - sqrt(1 - a) v,
    so an error in v is never amplified: ``sampler`` is the plain mean there, and ``min_snr`` /
    ``debiased`` take their v forms, min(SNR, gamma)/(SNR + 1) and 1/(SNR + 1), as kohya's do.
    Flow-matching targets have no SNR table: see ``loss_weights``. ``cap`` > 0 bounds every weight
    from above (config ``max_loss_weight``)."""
    weights = _timestep_weights(scheduler, timesteps, kind, gamma)
    return weights.clamp(max=cap) if cap > 0 else weights


def _timestep_weights(scheduler: Any, timesteps: Tensor, kind: str, gamma: float) -> Tensor:
    """``timestep_weights`` before its cap."""
    ones = torch.ones(timesteps.shape, dtype=torch.float32, device=timesteps.device)
    if kind == "none":
        return ones
    alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = (alphas / (1 - alphas)).clamp(max=SNR_CAP)
    velocity = scheduler.config.prediction_type == "v_prediction"
    if kind == "min_snr":
        return snr.clamp(max=gamma) / (snr + 1 if velocity else snr)
    if kind == "debiased":
        return 1 / (snr + 1) if velocity else snr.rsqrt()
    if kind == "sampler":
        return ones if velocity else snr.rsqrt().clamp(min=1.0)
    raise ConfigError(f"loss_weighting {kind!r} is not known (none, min_snr, debiased, sampler)")


def loss_weights(session: Session, timesteps: Tensor, kind: str) -> Tensor:
    """Per-sample loss weights: ``timestep_weights`` on DDPM bases; on flow-matching bases "none" and
    "sampler" are both the plain mean (the flow Euler sampler adds a velocity error times its step
    in sigma, with no amplification; other weightings are refused by ``check_objective``)."""
    if session.base.target == "flow":
        if kind not in FLOW_WEIGHTINGS:
            raise ConfigError(f"loss_weighting {kind!r} is not defined for flow matching (none, sampler)")
        return torch.ones(timesteps.shape, dtype=torch.float32, device=timesteps.device)
    config = session.config
    return timestep_weights(session.noise_scheduler, timesteps, kind, config.min_snr_gamma, config.max_loss_weight)


def conditioning_of(session: Session, data: Encoded, items: Tensor | list[int], dropped: list[bool] | None = None) -> conditioning_mod.Conditioning:
    """The denoiser's conditioning of rows ``items``: cached, or computed now through the trained
    text-encoder layers (with gradients when grad is enabled). Rows marked in ``dropped`` get what
    the pipeline's sampler gives an empty prompt instead (caption dropout)."""
    device = session.accelerator.device
    indices = items.tolist() if isinstance(items, Tensor) else list(items)
    dropped = dropped or [False] * len(indices)
    if data.conditioning is not None:
        picked = conditioning_mod.select(data.conditioning, indices, device, session.weight_dtype)
        return _with_empty(picked, dropped, _empty(session)) if any(dropped) else picked
    with session.accelerator.autocast():
        live = session.conditioner.embed(["" if drop else data.captions[i] for i, drop in zip(indices, dropped)])
    live = conditioning_mod.select(live, slice(None), device, session.weight_dtype)
    return _with_empty(live, dropped, None) if any(dropped) and zeros_for_empty(session.pipe) else live


def zeros_for_empty(pipe: Any) -> bool:
    """Whether the pipeline conditions an empty prompt on zeros rather than its encoding (SDXL's
    ``force_zeros_for_empty_prompt``): then that is what CFG's unconditional branch sees."""
    return bool(getattr(getattr(pipe, "config", None), "force_zeros_for_empty_prompt", False))


def _empty(session: Session) -> conditioning_mod.Conditioning | None:
    """The frozen encoders' conditioning of the empty caption (cached), or None where it is zeros."""
    if zeros_for_empty(session.pipe):
        return None
    if session.empty is None:
        session.empty = _cached_conditioning(session.conditioner, [""])
    return session.empty


def _with_empty(picked: conditioning_mod.Conditioning, dropped: list[bool], empty: conditioning_mod.Conditioning | None) -> conditioning_mod.Conditioning:
    """``picked`` with the dropped rows replaced by ``empty``'s row (None: zeros)."""
    out = {}
    for key, value in picked.items():
        mask = torch.tensor(dropped, device=value.device).view(-1, *[1] * (value.dim() - 1))
        fill = torch.zeros_like(value[:1]) if empty is None else empty[key][:1].to(value.device, value.dtype)
        out[key] = torch.where(mask, fill.expand_as(value), value)
    return out


def caption_dropped(config, micro_step: int, count: int, process: int) -> list[bool]:
    """Which rows of a micro-batch train on the empty caption (``caption_dropout``): a pure function
    of (seed, micro_step, process) on a generator of its own, so the noise and timesteps of a run
    do not change with the setting."""
    if config.caption_dropout <= 0:
        return [False] * count
    generator = torch.Generator().manual_seed(config.seed * 6_151 + micro_step * 92_821 + process + 1)
    return (torch.rand(count, generator=generator) < config.caption_dropout).tolist()


def _mse(session: Session, model: nn.Module, latents: Tensor, conditioning: conditioning_mod.Conditioning, noise: Tensor,
         timesteps: Tensor, weighting: str = "none") -> Tensor:
    """Mean (weighted) squared error of the model's prediction at ``timesteps``."""
    device = session.accelerator.device
    latents, noise, timesteps = latents.to(device), noise.to(device), timesteps.to(device)
    noisy, target = noisy_and_target(session.base, session.noise_scheduler, latents, noise, timesteps)
    with session.accelerator.autocast():
        prediction = model(noisy.to(session.weight_dtype), timesteps, conditioning)
    errors = (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    return (errors * loss_weights(session, timesteps, weighting)).mean()


def step_loss(session: Session, micro_step: int) -> Tensor:
    """The training loss of one micro-batch: a pure function of (seed, micro_step, process)."""
    accelerator, config = session.accelerator, session.config
    items = data_mod.batch_indices(session.train.weights, micro_step, config.batch_size,
                                   accelerator.process_index, accelerator.num_processes, config.seed)
    generator = torch.Generator().manual_seed(config.seed * 7_919 + micro_step * 104_729 + accelerator.process_index)
    latents = session.train.latents[items]
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = sample_timesteps(session, len(items), generator)
    dropped = caption_dropped(config, micro_step, len(items), accelerator.process_index)
    conditioning = conditioning_of(session, session.train, items, dropped)
    return _mse(session, session.model, latents, conditioning, noise, timesteps, config.loss_weighting)


@contextlib.contextmanager
def training_attention(device: torch.device):
    """Forward and backward of a training step inside: on CUDA, attention without the cuDNN backend
    (the flags are process-wide, so gradient checkpointing's recomputation in backward sees them too)."""
    if torch.device(device).type != "cuda":
        yield
        return
    with sdpa_kernel(TRAINING_ATTENTION):
        yield


@torch.no_grad()
def validation_loss(session: Session) -> float:
    """MSE on the held-out pairs at fixed noise and evenly spread timesteps (comparable across steps)."""
    val, count = session.validation, len(session.validation.latents)
    model = session.accelerator.unwrap_model(session.model)
    conditioning = conditioning_of(session, val, list(range(count)))

    def loss(rows: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:  # all rows at once: the conditioning as computed
        return _mse(session, model, val.latents[rows], conditioning, noise, timesteps)

    grids = [validation_timesteps(session, count, k) for k in range(VALIDATION_TIMESTEPS)]
    with training_attention(session.accelerator.device):
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
