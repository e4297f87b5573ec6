"""The canonical factors of every adapter between the two passes of a compress.

The first pass reads and parses each file once and keeps its canonical factors here; the second
pass (projection, errors, baselines) reads them back instead of parsing and canonicalising the
files again. Factors stay in memory up to ``budget`` bytes; beyond, each adapter's factors are
appended to one raw float32 spool file in the run's temporary folder, so memory stays bounded
whatever the number of adapters.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

Factors = dict[str, tuple[Tensor, Tensor]]
DEFAULT_BUDGET = 256 << 20  # bytes of factors kept in memory before spilling to disk (SD1.5 rank 16: 20 adapters)


@dataclass
class _Spilled:
    offset: int  # in float32 numbers
    layout: list[tuple[str, tuple[int, ...], tuple[int, ...]]]  # (layer, down shape, up shape)


class FactorStore:
    """Append-only store of per-adapter canonical factors (float32, on the CPU when read back)."""

    def __init__(self, folder: Path, budget: int = DEFAULT_BUDGET) -> None:
        self.path = Path(folder) / "factors.spool"
        self.budget = budget
        self.held = 0
        self._items: list[Factors | _Spilled] = []
        self.sizes: list[int] = []  # float32 numbers per adapter
        self._handle = None
        self._written = 0

    def __len__(self) -> int:
        return len(self._items)

    def add(self, factors: Factors) -> None:
        """Keep one adapter's factors (moved to the CPU; already-CPU tensors are not copied)."""
        numbers = sum(a.numel() + b.numel() for a, b in factors.values())
        self.sizes.append(numbers)
        size = 4 * numbers
        if self.held + size <= self.budget:
            self._items.append({name: (a.detach().to("cpu", torch.float32), b.detach().to("cpu", torch.float32)) for name, (a, b) in factors.items()})
            self.held += size
            return
        if self._handle is None:
            self._handle = self.path.open("wb")
        layout, offset = [], self._written
        for name, (a, b) in factors.items():
            for tensor in (a, b):
                raw = tensor.detach().to("cpu", torch.float32).contiguous().numpy()
                self._handle.write(raw.tobytes())
                self._written += raw.size
            layout.append((name, tuple(a.shape), tuple(b.shape)))
        self._items.append(_Spilled(offset, layout))

    def get(self, index: int) -> Factors:
        """Adapter ``index``'s factors (CPU float32)."""
        item = self._items[index]
        if isinstance(item, dict):
            return item
        if self._handle is not None and not self._handle.closed:
            self._handle.flush()
        sizes = [int(np.prod(d)) + int(np.prod(u)) for _, d, u in item.layout]
        flat = torch.from_numpy(np.fromfile(self.path, dtype=np.float32, count=sum(sizes), offset=4 * item.offset))
        factors, start = {}, 0
        for (name, down_shape, up_shape), size in zip(item.layout, sizes):
            down_size = int(np.prod(down_shape))
            factors[name] = (flat[start : start + down_size].reshape(down_shape), flat[start + down_size : start + size].reshape(up_shape))
            start += size
        return factors

    @property
    def spilled(self) -> int:
        """How many adapters went to disk."""
        return sum(1 for item in self._items if not isinstance(item, dict))

    def close(self) -> None:
        """Drop everything (the spool file lives in the run's temporary folder, removed with it)."""
        if self._handle is not None and not self._handle.closed:
            self._handle.close()
        self._items, self.sizes = [], []
        self.held = 0
        self.path.unlink(missing_ok=True)
