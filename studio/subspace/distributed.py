"""Small collectives for the streaming extraction: JSON objects and tensors across ranks.

Objects travel as UTF-8 JSON in uint8 tensors (never pickled). Without an initialised process
group every function is the single-process identity, so callers need no branches.
"""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.distributed as dist


def is_distributed(group=None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def rank_and_world(group=None) -> tuple[int, int]:
    if not is_distributed(group):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def comm_device(group=None) -> torch.device:
    """Where collective buffers must live: CUDA for NCCL, CPU otherwise."""
    if is_distributed(group) and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_json(value: Any, group=None) -> list[Any]:
    """Every rank's JSON-serialisable ``value``, in rank order."""
    if not is_distributed(group):
        return [value]
    device = comm_device(group)
    raw = torch.tensor(list(json.dumps(value).encode("utf-8")), dtype=torch.uint8, device=device)
    _, world = rank_and_world(group)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([raw.numel()], dtype=torch.int64, device=device), group=group)
    longest = int(max(int(s) for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[: raw.numel()] = raw
    gathered = [torch.zeros(longest, dtype=torch.uint8, device=device) for _ in range(world)]
    dist.all_gather(gathered, padded, group=group)
    return [json.loads(bytes(g[: int(s)].cpu().tolist()).decode("utf-8")) for g, s in zip(gathered, sizes)]


def broadcast_json(value: Any, group=None) -> Any:
    """Rank 0's ``value`` on every rank."""
    return all_gather_json(value, group)[0]


def all_reduce_sum(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """In-place sum over ranks (through the communication device if it differs)."""
    if not is_distributed(group):
        return tensor
    device = comm_device(group)
    buffer = tensor if tensor.device == device else tensor.to(device)
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
    if buffer is not tensor:
        tensor.copy_(buffer.to(tensor.device))
    return tensor


def broadcast_tensor(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Rank 0's ``tensor`` copied into ``tensor`` on every rank (shapes must agree)."""
    if not is_distributed(group):
        return tensor
    device = comm_device(group)
    buffer = tensor.contiguous() if tensor.device == device else tensor.to(device).contiguous()
    dist.broadcast(buffer, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    return buffer.to(tensor.device)


def barrier(group=None) -> None:
    if is_distributed(group):
        dist.barrier(group=group)
