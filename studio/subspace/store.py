"""The canonical factors of every adapter between the two passes of a compress.

The first pass reads and parses each file once and keeps its canonical factors here; the second
pass (projection, errors, baselines) reads them back instead of parsing and canonicalising the
files again. On a GPU the first ``device_budget`` bytes of factors stay where they were computed
(the second pass then stacks them there: no device-to-host copy in the first pass and no
host-to-device copy in the second); then factors stay in host memory up to ``budget`` bytes;
beyond, each adapter's factors are appended to one raw float32 spool file in the run's temporary
folder, so memory stays bounded by the two budgets whatever the number of adapters.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

Factors = dict[str, tuple[Tensor, Tensor]]
DEFAULT_BUDGET = 256 << 20  # bytes of factors kept in memory before spilling to disk (SD1.5 rank 16: 20 adapters)
DEVICE_BUDGET = 8 << 30  # at most this many bytes of factors left on a GPU (SD1.5 rank 16: ~620 adapters)
DEVICE_SHARE = 0.25  # and at most this share of the GPU's free memory when the compress starts


def device_budget(device: torch.device | str) -> int:
    """Bytes of factors a compress may leave on ``device``: 0 on a CPU (host memory is the
    ``budget`` tier), else the smaller of `DEVICE_BUDGET` and `DEVICE_SHARE` of the free memory."""
    device = torch.device(device)
    if device.type != "cuda":
        return 0
    free, _ = torch.cuda.mem_get_info(device)
    return int(min(DEVICE_BUDGET, DEVICE_SHARE * free))


@dataclass
class _Spilled:
    offset: int  # in float32 numbers
    layout: list[tuple[str, tuple[int, ...], tuple[int, ...]]]  # (layer, down shape, up shape)


class FactorStore:
    """Append-only store of per-adapter canonical factors (float32; read back on the device they
    were added on while the device tier has room, else on the CPU)."""

    def __init__(self, folder: Path, budget: int = DEFAULT_BUDGET, device_budget: int = 0) -> None:
        self.path = Path(folder) / "factors.spool"
        self.budget = budget
        self.device_budget = device_budget
        self.held = 0
        self.held_on_device = 0
        self._items: list[Factors | _Spilled] = []
        self.tiers: list[str] = []  # where each adapter's factors are: "device", "host" or "disk"
        self.sizes: list[int] = []  # float32 numbers per adapter
        self._handle = None
        self._written = 0

    def __len__(self) -> int:
        return len(self._items)

    def add(self, factors: Factors) -> None:
        """Keep one adapter's factors: one device-to-host copy of all of them, kept as views of
        that buffer, or written to the spool file without a further copy."""
        layout = [(name, tuple(a.shape), tuple(b.shape)) for name, (a, b) in factors.items()]
        flat = torch.cat([t.detach().reshape(-1).float() for pair in factors.values() for t in pair]) if factors else torch.zeros(0)
        self.sizes.append(flat.numel())
        if flat.device.type != "cpu" and self.held_on_device + 4 * flat.numel() <= self.device_budget:
            self._items.append(_split(flat, layout))
            self.tiers.append("device")
            self.held_on_device += 4 * flat.numel()
            return
        flat = flat.to("cpu")
        if self.held + 4 * flat.numel() <= self.budget:
            self._items.append(_split(flat, layout))
            self.tiers.append("host")
            self.held += 4 * flat.numel()
            return
        if self._handle is None:
            self._handle = self.path.open("wb")
        self._handle.write(flat.numpy().data)
        self._items.append(_Spilled(self._written, layout))
        self.tiers.append("disk")
        self._written += flat.numel()

    def get(self, index: int) -> Factors:
        """Adapter ``index``'s factors (float32; on the device they were added on if kept there)."""
        item = self._items[index]
        if isinstance(item, dict):
            return item
        if self._handle is not None and not self._handle.closed:
            self._handle.flush()
        count = sum(int(np.prod(d)) + int(np.prod(u)) for _, d, u in item.layout)
        return _split(torch.from_numpy(np.fromfile(self.path, dtype=np.float32, count=count, offset=4 * item.offset)), item.layout)

    @property
    def on_device(self) -> int:
        """How many adapters' factors stayed on the device."""
        return self.tiers.count("device")

    @property
    def spilled(self) -> int:
        """How many adapters went to disk."""
        return self.tiers.count("disk")

    def close(self) -> None:
        """Drop everything (the spool file lives in the run's temporary folder, removed with it)."""
        if self._handle is not None and not self._handle.closed:
            self._handle.close()
        self._items, self.sizes, self.tiers = [], [], []
        self.held = self.held_on_device = 0
        self.path.unlink(missing_ok=True)


def _split(flat: torch.Tensor, layout: list[tuple[str, tuple[int, ...], tuple[int, ...]]]) -> Factors:
    """Views of one flat buffer as ``{layer: (down, up)}`` in ``layout`` order."""
    factors, start = {}, 0
    for name, down_shape, up_shape in layout:
        down_size, up_size = int(np.prod(down_shape)), int(np.prod(up_shape))
        factors[name] = (flat[start : start + down_size].reshape(down_shape), flat[start + down_size : start + down_size + up_size].reshape(up_shape))
        start += down_size + up_size
    return factors
