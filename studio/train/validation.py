"""One validation loss for every trainer: the denoising error at fixed draws of noise and timesteps.

A validation loss is comparable across steps, runs and adapters only when every call sees the
same noise at the same timesteps. ``fixed_draws_loss`` is that one implementation: for each
timestep grid (one timestep per validation item) it draws the noise of every item from a CPU
generator seeded once per call, then averages the caller's loss over rows and grids. What a loss
is (epsilon or v-prediction target, which model, which conditioning, per-sample adapters) is the
caller's ``loss(rows, noise, timesteps)``; the draws and the averaging are shared.

Two grid shapes are in use: ``level_grids`` (every item at the same level per grid, the studio's
trainer) and ``staggered_grids`` (each item its own timestep, spread evenly over the range and
shifted per repeat, the embedded world's zoo report).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

RowLoss = Callable[[Tensor, Tensor, Tensor], Tensor]  # (rows, noise of the rows, timesteps of the rows) -> mean loss


@torch.no_grad()
def fixed_draws_loss(loss: RowLoss, count: int, shape: Sequence[int], grids: Sequence[Tensor], seed: int,
                     batch: int = 0) -> float:
    """Mean of ``loss(rows, noise, timesteps)`` over every grid and every item, at fixed draws.

    ``count`` items of latent ``shape``; ``grids`` holds one int64 timestep tensor of length
    ``count`` per repeat. For each grid in turn, noise ``(count, *shape)`` is drawn from a CPU
    generator seeded ``seed`` (so a call's draws are a function of ``seed`` alone, on any device).
    Rows go to ``loss`` in chunks of ``batch`` (0: all at once) as CPU index tensors with their
    noise and timesteps; ``loss`` returns the mean squared error of those rows (a scalar), which
    is weighted by the number of rows.
    """
    if count <= 0:
        raise ValueError("a validation loss needs at least one item")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    step = batch if batch > 0 else count
    total, rows_seen = 0.0, 0
    for timesteps in grids:
        if len(timesteps) != count:
            raise ValueError(f"a timestep grid of {len(timesteps)} entries for {count} items")
        noise = torch.randn((count, *shape), generator=generator)
        for start in range(0, count, step):
            rows = torch.arange(start, min(start + step, count))
            total += float(loss(rows, noise[rows], timesteps[rows].cpu())) * len(rows)
            rows_seen += len(rows)
    return total / rows_seen


def level_grids(count: int, total_timesteps: int, levels: int) -> list[Tensor]:
    """``levels`` grids, grid k putting every item at timestep ``total * (k + 0.5) / levels``."""
    return [torch.full((count,), int(total_timesteps * (k + 0.5) / levels), dtype=torch.long) for k in range(levels)]


def staggered_grids(count: int, total_timesteps: int, repeats: int) -> list[Tensor]:
    """``repeats`` grids, item i of grid r at timestep ``(i + r / repeats) * total / count``.

    Every grid covers the whole range once; the repeats interleave, so a small set of items still
    sees ``count * repeats`` distinct timesteps.
    """
    items = torch.arange(count).float()
    return [((items + r / repeats) * total_timesteps / count).long().clamp(max=total_timesteps - 1) for r in range(repeats)]
