"""Joining the process group that `torchrun` / `accelerate launch` describe in the environment.

`studio compress` under torchrun shards its files across the processes (`joined` starts and
ends the group around the verb); `studio train` leaves it to accelerate's ``Accelerator``, which
reads the same environment. Only the main process (rank 0) prints.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator


def world_size() -> int:
    """Processes of this run, from the launcher's environment (1 when started alone)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def is_main_process() -> bool:
    """Rank 0 (or no launcher): the process that prints and writes shared files."""
    return int(os.environ.get("RANK", "0") or 0) == 0


@contextlib.contextmanager
def joined(device: str) -> Iterator[str]:
    """Join the launcher's process group for the body (NCCL on CUDA, gloo on CPU); yield the
    device this process uses (``cuda:LOCAL_RANK`` on CUDA). Alone, nothing is started."""
    import torch
    import torch.distributed as dist

    if world_size() <= 1 or dist.is_initialized():
        yield device
        return
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl")
        device = f"cuda:{local}"
    else:
        dist.init_process_group("gloo")
    try:
        yield device
    finally:
        dist.destroy_process_group()
