"""The zoo's multi-style LoRA training against the studio trainer's pieces, on tiny random models.

- One zoo step trains every style as if it were trained alone through studio/train (its LoRA
  family, the engine's Attachment, AdamW, the studio's LR schedule and timestep weighting).
- A zoo run cut off after a checkpoint and resumed ends with the factors of an uncut run.
- The world's validation loss (now the shared fixed-draws loss) gives what the old loop gave.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from studio.adapters.lora_train import Config as LoraConfig, TrainableLora
from studio.engine.patch import Attachment, component_modules, merged
from studio.train.apply import trainable_parameters
from studio.train.config import TrainConfig
from studio.train.session import lr_lambda, timestep_weights
from studio.world.models import ModelSizes, make_scheduler, make_unet
from studio.world.multilora import MultiLora
from studio.world.train import SEED_STRIDE, Plan, Weighting, ZooData, train_loras, validation_loss, zoo_batch, zoo_loss

SIZES = ModelSizes(unet_channels=(16, 16, 16), unet_heads=4, vae_channels=(8, 8), text_hidden=16, max_length=6, image_size=16)
RANK, ALPHA, STEPS, PER_STYLE, LR, SEED = 4, 4.0, 3, 2, 1e-2, 3


@pytest.fixture(autouse=True)
def float64():
    """Every model and draw in float64: the comparisons then see the math, not fp32 rounding
    (which Adam's normalisation of near-zero gradients would amplify to ~1e-2 of a step)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _unet() -> torch.nn.Module:
    torch.manual_seed(0)
    unet = make_unet(SIZES).eval()
    unet.requires_grad_(False)
    return unet


def _data(styles: int = 2, per_pool: int = 4) -> ZooData:
    gen = torch.Generator().manual_seed(1)
    n = styles * per_pool
    latents = torch.randn((n, SIZES.latent_channels, SIZES.latent_size, SIZES.latent_size), generator=gen)
    states = torch.randn((n, SIZES.max_length, SIZES.text_hidden), generator=gen)
    return ZooData(latents, states, [torch.arange(s * per_pool, (s + 1) * per_pool) for s in range(styles)])


def _factors(lora: MultiLora, style: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {f"unet.{name}": (lora.down[i][style].detach().clone(), lora.up[i][style].detach().clone()) for i, name in enumerate(lora.names)}


def _lora_from(start: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> TrainableLora:
    """A trainable LoRA whose factors start at ``start`` (layer -> (down, up))."""
    adapter = TrainableLora(LoraConfig(rank=RANK, alpha=ALPHA), {layer: (up.shape[0], down.shape[1]) for layer, (down, up) in start.items()})
    with torch.no_grad():
        for layer, (down, up) in start.items():
            adapter.down[layer.replace(".", "__")].copy_(down)
            adapter.up[layer.replace(".", "__")].copy_(up)
    return adapter


def _alone(unet, data: ZooData, style: int, start: dict, weighting: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Style ``style``'s LoRA trained alone the studio trainer's way, on the rows the zoo drew for it."""
    config = TrainConfig(base="world", data="unused", output_dir="unused", steps=STEPS, lr_warmup_steps=max(1, STEPS // 20),
                         learning_rate=LR, loss_weighting=weighting, weight_decay=0.0)
    adapter = _lora_from(start)
    attached = Attachment({"unet": unet}, adapter)
    opt = torch.optim.AdamW(trainable_parameters(adapter), lr=config.learning_rate, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(config))
    scheduler = make_scheduler()
    ours = slice(style * PER_STYLE, (style + 1) * PER_STYLE)
    try:
        for step in range(STEPS):
            gen = torch.Generator().manual_seed(SEED * SEED_STRIDE + step)
            rows, noise, timesteps = zoo_batch(data, PER_STYLE, gen, scheduler.config.num_train_timesteps)
            rows, noise, timesteps = rows[ours], noise[ours], timesteps[ours]
            noisy = scheduler.add_noise(data.latents[rows], noise, timesteps)
            pred = unet(noisy, timesteps, encoder_hidden_states=data.states[rows]).sample
            errors = (pred - noise).pow(2).flatten(1).mean(dim=1)
            loss = (errors * timestep_weights(scheduler, timesteps, config.loss_weighting, config.min_snr_gamma)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
    finally:
        attached.detach()
    return {layer: (adapter.down[layer.replace(".", "__")].detach(), adapter.up[layer.replace(".", "__")].detach()) for layer in start}


@pytest.mark.parametrize("weighting", ["none", "min_snr"])
def test_zoo_step_trains_each_style_as_studio_train_would_alone(weighting):
    unet, data = _unet(), _data()
    lora = MultiLora(unet, 2, RANK, ALPHA, seed=5)
    start = [_factors(lora, s) for s in range(2)]
    events = list(_run(train_loras(lora, unet, data, Plan(STEPS, PER_STYLE, LR, SEED), make_scheduler(), Weighting(weighting))))
    lora.remove()
    assert len(events) == STEPS and all(math.isfinite(e.loss) for e in events)
    for style in range(2):
        zoo, alone = _factors(lora, style), _alone(unet, data, style, start[style], weighting)
        for layer, (down, up) in zoo.items():
            torch.testing.assert_close(down, alone[layer][0], rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(up, alone[layer][1], rtol=1e-9, atol=1e-12)
        assert any(float((up - start[style][layer][1]).abs().max()) > 1e-3 for layer, (_, up) in zoo.items())  # it trained
    first = next(iter(start[0]))
    assert not torch.allclose(_factors(lora, 0)[first][1], _factors(lora, 1)[first][1])  # styles stay apart


def test_zoo_gradient_of_each_style_is_its_gradient_alone():
    unet, data, scheduler = _unet(), _data(), make_scheduler()
    lora = MultiLora(unet, 2, RANK, ALPHA, seed=5)
    with torch.no_grad():
        for up in lora.up:
            up.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))  # B = 0 would leave A without a gradient
    gen = torch.Generator().manual_seed(7)
    zoo_loss(lora, unet, data, PER_STYLE, gen, scheduler, Weighting("sampler")).backward()
    lora.index = None
    rows, noise, timesteps = zoo_batch(data, PER_STYLE, torch.Generator().manual_seed(7), scheduler.config.num_train_timesteps)
    for style in range(2):
        start = _factors(lora, style)
        adapter = _lora_from(start)
        attached = Attachment({"unet": unet}, adapter)
        ours = slice(style * PER_STYLE, (style + 1) * PER_STYLE)
        noisy = scheduler.add_noise(data.latents[rows[ours]], noise[ours], timesteps[ours])
        pred = unet(noisy, timesteps[ours], encoder_hidden_states=data.states[rows[ours]]).sample
        errors = (pred - noise[ours]).pow(2).flatten(1).mean(dim=1)
        (errors * timestep_weights(scheduler, timesteps[ours], "sampler")).mean().backward()
        attached.detach()
        for i, name in enumerate(lora.names):
            key = f"unet.{name}".replace(".", "__")
            torch.testing.assert_close(lora.down[i].grad[style], adapter.down[key].grad, rtol=1e-9, atol=1e-15)
            torch.testing.assert_close(lora.up[i].grad[style], adapter.up[key].grad, rtol=1e-9, atol=1e-15)
    assert float(lora.down[0].grad.abs().max()) > 0
    lora.remove()


def _run(loop):
    """The events of a loop (its return value dropped)."""
    return [event for event in loop]


def test_a_zoo_run_cut_off_resumes_from_its_checkpoint_to_the_uncut_result(tmp_path):
    unet, data, scheduler = _unet(), _data(), make_scheduler()
    uncut = MultiLora(unet, 2, RANK, ALPHA, seed=5)
    _run(train_loras(uncut, unet, data, Plan(4, PER_STYLE, LR, SEED, tmp_path / "a", 2), scheduler))
    uncut.remove()

    cut = MultiLora(unet, 2, RANK, ALPHA, seed=5)
    plan = Plan(4, PER_STYLE, LR, SEED, tmp_path / "b", 2)
    loop = train_loras(cut, unet, data, plan, scheduler)
    for event in loop:
        if event.step >= 3:
            break  # the checkpoint after step 2 is on disk
    loop.close()
    cut.remove()
    again = MultiLora(unet, 2, RANK, ALPHA, seed=99)  # another start: the checkpoint replaces it
    events = _run(train_loras(again, unet, data, plan, scheduler))
    again.remove()
    assert events[0].metrics.get("resumed_from") == 2.0
    for a, b in zip(list(uncut.parameters()), list(again.parameters())):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _old_validation_loss(unet, latents, states, alphas, seed=1234, repeats=4, batch=256):
    """The world's validation loop before it moved onto studio.train.validation (the oracle)."""
    n, T = len(latents), len(alphas)
    total, count = 0.0, 0
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for r in range(repeats):
        noise_all = torch.randn((n, *latents.shape[1:]), generator=gen)
        grid = ((torch.arange(n).float() + r / repeats) * T / n).long().clamp(max=T - 1)
        for start in range(0, n, batch):
            sl = slice(start, start + batch)
            a = alphas[grid[sl]].view(-1, 1, 1, 1)
            pred = unet(a.sqrt() * latents[sl] + (1 - a).sqrt() * noise_all[sl], grid[sl], states[sl]).sample
            total += float(F.mse_loss(pred.float(), noise_all[sl], reduction="sum"))
            count += noise_all[sl].numel()
    return total / count


@torch.no_grad()
def test_world_validation_loss_gives_the_old_loops_numbers():
    unet, data = _unet(), _data(per_pool=5)
    alphas = make_scheduler().alphas_cumprod
    for repeats, batch in ((4, 256), (3, 4)):
        new = validation_loss(unet, data.latents, data.states, alphas, repeats=repeats, batch=batch)
        old = _old_validation_loss(unet, data.latents, data.states, alphas, repeats=repeats, batch=batch)
        assert new == pytest.approx(old, rel=1e-6)
    lora = MultiLora(unet, 1, RANK, ALPHA, seed=5)
    with torch.no_grad():
        for up in lora.up:
            up.normal_(0, 0.5)
    adapter = lora.adapter(0, "x")
    lora.remove()
    with merged(component_modules(unet), adapter):
        with_lora = validation_loss(unet, data.latents, data.states, alphas)
        assert with_lora == pytest.approx(_old_validation_loss(unet, data.latents, data.states, alphas), rel=1e-6)
    assert with_lora != pytest.approx(validation_loss(unet, data.latents, data.states, alphas), rel=1e-3)  # the merge took effect


def test_the_trainers_validation_draws_are_unchanged_on_the_shared_function():
    """studio/train's validation loss moved onto the same fixed-draws function: same draws, same mean."""
    from studio.train.validation import fixed_draws_loss, level_grids

    latents = torch.randn((5, 4, 3, 3), generator=torch.Generator().manual_seed(0))

    def error(noise, timesteps):  # stands in for the model's squared error
        return ((0.5 * noise - latents[: len(noise)]) ** 2 * (timesteps.view(-1, 1, 1, 1) + 1) / 1000).mean()

    generator, old = torch.Generator().manual_seed(12_345), []
    for k in range(8):  # the trainer's loop before the move
        timesteps = torch.full((5,), int(1000 * (k + 0.5) / 8), dtype=torch.long)
        old.append(float(error(torch.randn(latents.shape, generator=generator), timesteps)))
    new = fixed_draws_loss(lambda rows, noise, timesteps: error(noise, timesteps), 5, latents.shape[1:], level_grids(5, 1000, 8), 12_345)
    assert new == pytest.approx(sum(old) / len(old), rel=1e-12)
