"""Training loops of the world's build: VAE, base (text encoder + UNet), zoo LoRAs.

Each loop is a generator that yields ``Progress`` events and returns its trained module
(``result = yield from loop(...)``). Data stays on the device as tensors; bf16 autocast on GPU,
fp32 on CPU; every random draw comes from a seeded generator.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Generator

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from studio.events import Event, Progress
from studio.fileio import save_safetensors
from studio.world.multilora import MultiLora

Loop = Generator[Event, None, object]


def autocast(device: torch.device):
    """bf16 autocast on CUDA; plain fp32 elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up then cosine decay to 5% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def to_unit(images: Tensor) -> Tensor:
    """uint8 (N, 3, H, W) -> float in [-1, 1]."""
    return images.float() / 127.5 - 1.0


def _every(step: int, total: int, parts: int = 50) -> bool:
    return step == total - 1 or step % max(1, total // parts) == 0


def train_vae(vae: nn.Module, images: Tensor, steps: int, batch: int, lr: float, seed: int, kl_weight: float = 1e-6) -> Loop:
    """Reconstruction (MSE) + a small KL term; images are uint8 on the training device."""
    device = images.device
    gen = torch.Generator(device=device).manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    vae.train()
    start = time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, max(1, steps // 20))
        x = to_unit(images[torch.randint(0, len(images), (batch,), generator=gen, device=device)])
        with autocast(device):
            posterior = vae.encode(x).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen, device=device)
            recon = vae.decode(z).sample
        loss = F.mse_loss(recon.float(), x) + kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if _every(step, steps):
            yield Progress(step + 1, steps, float(loss), stage="vae", metrics={"seconds": time.time() - start})
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
    a = alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    return a.sqrt() * latents + (1 - a).sqrt() * noise


def save_checkpoint(path: Path, modules: dict[str, nn.Module], opt: torch.optim.Optimizer, step: int) -> None:
    """Weights and AdamW moments in one safetensors file (no pickle), written atomically."""
    tensors = {f"{name}.{k}": v for name, m in modules.items() for k, v in m.state_dict().items()}
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        state = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                tensors[f"opt.{i}.{key}"] = state[key]
    save_safetensors(tensors, path, {"step": str(step)})


def load_checkpoint(path: Path, modules: dict[str, nn.Module], opt: torch.optim.Optimizer) -> int:
    """Restore a checkpoint written by ``save_checkpoint``; returns the step it was taken at."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        step = int(f.metadata()["step"])
    tensors = load_file(str(path))
    for name, module in modules.items():
        prefix = f"{name}."
        module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        if f"opt.{i}.exp_avg" in tensors:
            opt.state[p] = {
                "step": torch.tensor(float(step)),
                "exp_avg": tensors[f"opt.{i}.exp_avg"].to(p.device),
                "exp_avg_sq": tensors[f"opt.{i}.exp_avg_sq"].to(p.device),
            }
    return step


def train_base(
    unet: nn.Module, text_encoder: nn.Module, latents: Tensor, ids: Tensor, empty_ids: Tensor,
    steps: int, batch: int, lr: float, seed: int, empty_prob: float, alphas_cumprod: Tensor,
    checkpoint: Path | None = None, checkpoint_every: int = 0,
) -> Loop:
    """Epsilon-prediction training of UNet and text encoder together, from scratch."""
    device = latents.device
    modules = {"unet": unet, "text_encoder": text_encoder}
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    first = load_checkpoint(checkpoint, modules, opt) if checkpoint is not None and checkpoint.exists() else 0
    if first:
        yield Progress(first, steps, None, stage="base", metrics={"resumed_from": float(first)})
    unet.train(), text_encoder.train()
    start = time.time()
    for step in range(first, steps):
        gen = torch.Generator(device=device).manual_seed(seed * 100003 + step)  # resumable draws
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, max(1, steps // 20))
        pick = torch.randint(0, len(latents), (batch,), generator=gen, device=device)
        tokens = ids[pick].long()
        drop = torch.rand(batch, generator=gen, device=device) < empty_prob
        tokens = torch.where(drop[:, None], empty_ids.view(1, -1).long(), tokens)
        loss = _denoise_loss(unet, text_encoder, latents[pick], tokens, gen, alphas_cumprod)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if _every(step, steps):
            yield Progress(step + 1, steps, float(loss), stage="base", metrics={"seconds": time.time() - start})
        if checkpoint is not None and checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            save_checkpoint(checkpoint, modules, opt, step + 1)
    unet.eval(), text_encoder.eval()
    return unet, text_encoder


def _denoise_loss(unet: nn.Module, text_encoder: nn.Module | None, latents: Tensor, tokens_or_states: Tensor, gen: torch.Generator, alphas_cumprod: Tensor) -> Tensor:
    device = latents.device
    noise = torch.randn(latents.shape, generator=gen, device=device)
    timesteps = torch.randint(0, len(alphas_cumprod), (len(latents),), generator=gen, device=device)
    with autocast(device):
        states = text_encoder(tokens_or_states)[0] if text_encoder is not None else tokens_or_states
        pred = unet(noisy(latents, timesteps, noise, alphas_cumprod), timesteps, states).sample
    return F.mse_loss(pred.float(), noise)


def train_loras(
    lora: MultiLora, unet: nn.Module, latents: Tensor, states: Tensor, pools: list[Tensor],
    steps: int, per_style: int, lr: float, seed: int, alphas_cumprod: Tensor, label: str = "zoo",
) -> Loop:
    """Train every style of ``lora`` at once: ``per_style`` samples of each style per step.

    ``pools[s]`` holds the indices (into ``latents`` / ``states``) of style s's training images.
    """
    device = latents.device
    opt = torch.optim.AdamW(lora.parameters(), lr=lr, weight_decay=0.0)
    index = torch.arange(len(pools), device=device).repeat_interleave(per_style)
    start = time.time()
    for step in range(steps):
        gen = torch.Generator(device=device).manual_seed(seed * 100003 + step)
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, max(1, steps // 20))
        pick = torch.cat([pool[torch.randint(0, len(pool), (per_style,), generator=gen, device=device)] for pool in pools])
        lora.index = index
        loss = _denoise_loss(unet, None, latents[pick], states[pick], gen, alphas_cumprod)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if _every(step, steps):
            yield Progress(step + 1, steps, float(loss), stage=label, metrics={"seconds": time.time() - start})
    lora.index = None
    return lora


@torch.no_grad()
def validation_loss(unet: nn.Module, latents: Tensor, states: Tensor, alphas_cumprod: Tensor, seed: int = 1234, repeats: int = 4, batch: int = 256, before: Callable[[Tensor], None] | None = None) -> float:
    """Mean denoising loss over fixed noise and an even grid of timesteps (same draws every call).

    ``before(index)`` is called with each batch's sample indices (to select per-sample LoRAs).
    """
    device = latents.device
    n = len(latents)
    total, count = 0.0, 0
    gen = torch.Generator(device="cpu").manual_seed(seed)
    T = len(alphas_cumprod)
    for r in range(repeats):
        noise_all = torch.randn((n, *latents.shape[1:]), generator=gen).to(device)
        grid = ((torch.arange(n).float() + r / repeats) * T / n).long().clamp(max=T - 1).to(device)
        for start in range(0, n, batch):
            sl = slice(start, start + batch)
            if before is not None:
                before(torch.arange(start, min(start + batch, n), device=device))
            with autocast(device):
                pred = unet(noisy(latents[sl], grid[sl], noise_all[sl], alphas_cumprod), grid[sl], states[sl]).sample
            total += float(F.mse_loss(pred.float(), noise_all[sl], reduction="sum"))
            count += noise_all[sl].numel()
    return total / count
