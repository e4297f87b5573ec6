"""Training loops of the world's build: VAE, base (text encoder + UNet), zoo LoRAs.

Each loop is a generator that yields ``Progress`` events and returns its trained module
(``result = yield from loop(...)``). Data stays on the device as tensors; bf16 autocast on GPU,
fp32 on CPU; every random draw comes from a generator seeded per step (so a resumed run draws
what an uncut one would).

What the studio's trainer (``studio/train``) already has is reused, not repeated: the learning
rate schedule (``session.lr_factor``: linear warm-up over the first 5% of the steps, cosine to 5%
of the peak), the timestep loss weighting (``session.timestep_weights``), checkpoints
(``studio.train.checkpoint``: safetensors + JSON, atomic, no pickle) and the validation loss at
fixed draws (``studio.train.validation``). The VAE and base loops stay the world's own: they train
whole models from scratch, not adapters. The zoo trains several LoRAs at once, one per sample
(``multilora.py``); its loss is the sum of the styles' own mean losses, so each style's gradient
is exactly the gradient it would get trained alone.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Generator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from studio.events import Event, Progress
from studio.train import checkpoint
from studio.train.session import lr_factor, timestep_weights
from studio.train.validation import fixed_draws_loss, staggered_grids
from studio.world.multilora import MultiLora

Loop = Generator[Event, None, object]

WARMUP_DIVISOR = 20  # the learning rate warms up over the first 1/20 of the steps (at least one)
REPORTS_PER_RUN = 50  # Progress events per loop
SEED_STRIDE = 100_003  # per-step generators are seeded seed * SEED_STRIDE + step
VALIDATION_SEED = 1234  # the noise of the world's validation loss (the shipped report's numbers)
KEEP_CHECKPOINTS = 1  # a build resumes from its last checkpoint only


@dataclass(frozen=True)
class Plan:
    """How long and how fast a loop trains, and where it checkpoints.

    ``batch``: images per step (the zoo: per style). ``checkpoint``: the folder of
    ``studio.train.checkpoint`` checkpoints (None: none); one is written every
    ``checkpoint_every`` steps (0: never) and a loop started on that folder resumes from it.
    """

    steps: int
    batch: int
    lr: float
    seed: int
    checkpoint: Path | None = None
    checkpoint_every: int = 0


@dataclass(frozen=True)
class Weighting:
    """The timestep weighting of the zoo's loss (``studio.train.session.timestep_weights``)."""

    kind: str = "none"
    gamma: float = 5.0


@dataclass
class ZooData:
    """The zoo's training set: latents and text states of its images, and each style's rows."""

    latents: Tensor
    states: Tensor
    pools: list[Tensor]  # pools[s]: indices (into latents / states) of style s's images


def autocast(device: torch.device):
    """bf16 autocast on CUDA; plain fp32 elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def cosine_schedule(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The studio trainer's cosine schedule (``lr_factor``) with a warm-up of 1/20 of the steps."""
    warmup = max(1, steps // WARMUP_DIVISOR)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, steps, warmup, "cosine"))


def to_unit(images: Tensor) -> Tensor:
    """uint8 (N, 3, H, W) -> float in [-1, 1]."""
    return images.float() / 127.5 - 1.0


def _every(step: int, total: int, parts: int = REPORTS_PER_RUN) -> bool:
    return step == total - 1 or step % max(1, total // parts) == 0


def _resume(plan: Plan, model: nn.Module, optimizer: Any, schedule: Any) -> int:
    """The step to start at: that of the plan's last checkpoint (model, optimizer, schedule restored), else 0."""
    path = checkpoint.latest(plan.checkpoint) if plan.checkpoint is not None else None
    if path is None:
        return 0
    return int(checkpoint.load(path, model, optimizer, schedule)["step"])


def _checkpoint_due(plan: Plan, done: int) -> bool:
    """True after ``done`` steps when a checkpoint is due (never after the last step: the result is saved)."""
    return plan.checkpoint is not None and plan.checkpoint_every > 0 and done % plan.checkpoint_every == 0 and done < plan.steps


def train_vae(vae: nn.Module, images: Tensor, plan: Plan, kl_weight: float = 1e-6) -> Loop:
    """Reconstruction (MSE) + a small KL term; images are uint8 on the training device."""
    device = images.device
    gen = torch.Generator(device=device).manual_seed(plan.seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=plan.lr, weight_decay=0.0)
    schedule = cosine_schedule(opt, plan.steps)
    vae.train()
    start = time.time()
    for step in range(plan.steps):
        x = to_unit(images[torch.randint(0, len(images), (plan.batch,), generator=gen, device=device)])
        with autocast(device):
            posterior = vae.encode(x).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen, device=device)
            recon = vae.decode(z).sample
        loss = F.mse_loss(recon.float(), x) + kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        if _every(step, plan.steps):
            yield Progress(step + 1, plan.steps, float(loss.detach()), stage="vae", metrics={"seconds": time.time() - start})
    vae.eval()
    return vae


@torch.no_grad()
def encode_latents(vae: nn.Module, images: Tensor, batch: int = 1024) -> Tensor:
    """Posterior means of all images (unscaled), in float32."""
    out = []
    for start in range(0, len(images), batch):
        with autocast(images.device):
            out.append(vae.encode(to_unit(images[start:start + batch])).latent_dist.mean.float())
    return torch.cat(out)


def noisy(latents: Tensor, timesteps: Tensor, noise: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """The forward process: sqrt(a_t) x + sqrt(1 - a_t) noise."""
    a = alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    return a.sqrt() * latents + (1 - a).sqrt() * noise


def draw_noise(latents: Tensor, gen: torch.Generator, total_timesteps: int) -> tuple[Tensor, Tensor]:
    """(noise like ``latents``, one timestep per sample) drawn from ``gen``, in that order."""
    noise = torch.randn(latents.shape, generator=gen, device=latents.device)
    timesteps = torch.randint(0, total_timesteps, (len(latents),), generator=gen, device=latents.device)
    return noise, timesteps


def denoise_errors(unet: nn.Module, latents: Tensor, states: Tensor, noise: Tensor, timesteps: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """Per-sample mean squared error of the UNet's predicted noise (epsilon prediction)."""
    with autocast(latents.device):
        pred = unet(noisy(latents, timesteps, noise, alphas_cumprod), timesteps, states).sample
    return (pred.to(noise.dtype) - noise).pow(2).flatten(1).mean(dim=1)  # fp32 (the noise's dtype) under bf16 autocast


def train_base(unet: nn.Module, text_encoder: nn.Module, latents: Tensor, ids: Tensor, empty_ids: Tensor,
               empty_prob: float, plan: Plan, scheduler: Any) -> Loop:
    """Epsilon-prediction training of UNet and text encoder together, from scratch.

    ``empty_prob`` of the captions are replaced by ``empty_ids`` (the unconditional branch of
    classifier-free guidance). Checkpoints hold both models and AdamW's state.
    """
    device = latents.device
    models = nn.ModuleDict({"unet": unet, "text_encoder": text_encoder})
    params = list(models.parameters())
    opt = torch.optim.AdamW(params, lr=plan.lr, weight_decay=0.01)
    schedule = cosine_schedule(opt, plan.steps)
    alphas = scheduler.alphas_cumprod.to(device)
    first = _resume(plan, models, opt, schedule)
    if first:
        yield Progress(first, plan.steps, None, stage="base", metrics={"resumed_from": float(first)})
    models.train()
    start = time.time()
    for step in range(first, plan.steps):
        gen = torch.Generator(device=device).manual_seed(plan.seed * SEED_STRIDE + step)
        pick = torch.randint(0, len(latents), (plan.batch,), generator=gen, device=device)
        drop = torch.rand(plan.batch, generator=gen, device=device) < empty_prob
        tokens = torch.where(drop[:, None], empty_ids.view(1, -1).long(), ids[pick].long())
        noise, timesteps = draw_noise(latents[pick], gen, len(alphas))
        with autocast(device):
            states = text_encoder(tokens)[0]
        loss = denoise_errors(unet, latents[pick], states, noise, timesteps, alphas).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        schedule.step()
        if _every(step, plan.steps):
            yield Progress(step + 1, plan.steps, float(loss.detach()), stage="base", metrics={"seconds": time.time() - start})
        if _checkpoint_due(plan, step + 1):
            checkpoint.save(plan.checkpoint, step + 1, models, opt, schedule, {}, KEEP_CHECKPOINTS)
    models.eval()
    return unet, text_encoder


def zoo_batch(data: ZooData, per_style: int, gen: torch.Generator, total_timesteps: int) -> tuple[Tensor, Tensor, Tensor]:
    """One step's (rows, noise, timesteps): ``per_style`` rows of each style's pool, style after
    style, then the noise and timesteps of the whole batch, all drawn from ``gen``."""
    device = data.latents.device
    rows = torch.cat([pool[torch.randint(0, len(pool), (per_style,), generator=gen, device=device)] for pool in data.pools])
    return (rows, *draw_noise(data.latents[rows], gen, total_timesteps))


def zoo_loss(lora: MultiLora, unet: nn.Module, data: ZooData, per_style: int, gen: torch.Generator, scheduler: Any,
             weighting: Weighting = Weighting()) -> Tensor:
    """One step's loss of every style of ``lora``: the sum over styles of each style's own mean.

    The batch is ``zoo_batch``'s; each sample's squared error is weighted by ``weighting``'s
    timestep weight. A style's gradient is the one it would get trained alone on its rows.
    """
    device = data.latents.device
    alphas = scheduler.alphas_cumprod.to(device, data.latents.dtype)
    rows, noise, timesteps = zoo_batch(data, per_style, gen, len(alphas))
    lora.index = torch.arange(len(data.pools), device=device).repeat_interleave(per_style)
    errors = denoise_errors(unet, data.latents[rows], data.states[rows], noise, timesteps, alphas)
    weighted = errors * timestep_weights(scheduler, timesteps, weighting.kind, weighting.gamma)
    return weighted.view(len(data.pools), per_style).mean(dim=1).sum()


def train_loras(lora: MultiLora, unet: nn.Module, data: ZooData, plan: Plan, scheduler: Any,
                weighting: Weighting = Weighting(), label: str = "zoo") -> Loop:
    """Train every style of ``lora`` at once: ``plan.batch`` samples of each style per step.

    AdamW on the LoRA factors with the studio's cosine schedule; the reported loss is the mean
    over styles. Checkpoints (``plan.checkpoint``) hold the factors of every style and AdamW's state.
    """
    device = data.latents.device
    opt = torch.optim.AdamW(lora.parameters(), lr=plan.lr, weight_decay=0.0)
    schedule = cosine_schedule(opt, plan.steps)
    first = _resume(plan, lora, opt, schedule)
    if first:
        yield Progress(first, plan.steps, None, stage=label, metrics={"resumed_from": float(first)})
    start = time.time()
    try:
        for step in range(first, plan.steps):
            gen = torch.Generator(device=device).manual_seed(plan.seed * SEED_STRIDE + step)
            loss = zoo_loss(lora, unet, data, plan.batch, gen, scheduler, weighting)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            if _every(step, plan.steps):
                yield Progress(step + 1, plan.steps, float(loss.detach()) / len(data.pools), stage=label, metrics={"seconds": time.time() - start})
            if _checkpoint_due(plan, step + 1):
                checkpoint.save(plan.checkpoint, step + 1, lora, opt, schedule, {}, KEEP_CHECKPOINTS)
    finally:
        lora.index = None
    return lora


@torch.no_grad()
def validation_loss(unet: nn.Module, latents: Tensor, states: Tensor, alphas_cumprod: Tensor, seed: int = VALIDATION_SEED,
                    repeats: int = 4, batch: int = 256, before: Callable[[Tensor], None] | None = None) -> float:
    """Mean denoising loss at fixed noise and ``repeats`` staggered timestep grids (same draws every call).

    The studio's one validation loss (``studio.train.validation.fixed_draws_loss``) with the
    world's draws: noise from a CPU generator seeded ``seed``, grid r putting item i at timestep
    ``(i + r / repeats) * T / n``. ``before(index)`` is called with each batch's sample indices
    (on the device) before its forward, to select per-sample LoRAs.
    """
    device = latents.device

    def loss(rows: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        rows, noise, timesteps = rows.to(device), noise.to(device), timesteps.to(device)
        if before is not None:
            before(rows)
        with autocast(device):
            pred = unet(noisy(latents[rows], timesteps, noise, alphas_cumprod), timesteps, states[rows]).sample
        return F.mse_loss(pred.float(), noise)

    grids = staggered_grids(len(latents), len(alphas_cumprod), repeats)
    return fixed_draws_loss(loss, len(latents), latents.shape[1:], grids, seed, batch)
