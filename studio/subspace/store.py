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
        """Keep one adapter's factors: one device-to-host copy of all of them, kept as views of
        that buffer, or written to the spool file without a further copy."""
        layout = [(name, tuple(a.shape), tuple(b.shape)) for name, (a, b) in factors.items()]
        flat = torch.cat([t.detach().reshape(-1).float() for pair in factors.values() for t in pair]) if factors else torch.zeros(0)
        flat = flat.to("cpu")
        self.sizes.append(flat.numel())
        if self.held + 4 * flat.numel() <= self.budget:
            self._items.append(_split(flat, layout))
            self.held += 4 * flat.numel()
            return
        if self._handle is None:
            self._handle = self.path.open("wb")
        self._handle.write(flat.numpy().data)
        self._items.append(_Spilled(self._written, layout))
        self._written += flat.numel()

    def get(self, index: int) -> Factors:
        """Adapter ``index``'s factors (CPU float32)."""
        item = self._items[index]
        if isinstance(item, dict):
            return item
        if self._handle is not None and not self._handle.closed:
            self._handle.flush()
        count = sum(int(np.prod(d)) + int(np.prod(u)) for _, d, u in item.layout)
        return _split(torch.from_numpy(np.fromfile(self.path, dtype=np.float32, count=count, offset=4 * item.offset)), item.layout)

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


def _split(flat: torch.Tensor, layout: list[tuple[str, tuple[int, ...], tuple[int, ...]]]) -> Factors:
    """Views of one flat buffer as ``{layer: (down, up)}`` in ``layout`` order."""
    factors, start = {}, 0
    for name, down_shape, up_shape in layout:
        down_size, up_size = int(np.prod(down_shape)), int(np.prod(up_shape))
        factors[name] = (flat[start : start + down_size].reshape(down_shape), flat[start + down_size : start + down_size + up_size].reshape(up_shape))
        start += down_size + up_size
    return factors
