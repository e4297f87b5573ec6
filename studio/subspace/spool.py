"""Write a safetensors file tensor by tensor, with memory bounded by one tensor.

Tensors are appended to raw spool files as they are produced (one spool per process); the
final file is written atomically at the end: 8-byte header length, JSON header, then the spools
copied in order. The header can only be written once every shape is known, which is why the
data goes to a spool first. Several ranks' spools concatenate into one file.
"""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from studio.fileio import atomic_path

SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8",
}


@dataclass
class SpoolEntry:
    """One tensor in a spool: key, safetensors dtype name, shape and byte range in the spool."""

    key: str
    dtype: str
    shape: list[int]
    begin: int
    end: int

    def as_json(self) -> list:
        return [self.key, self.dtype, self.shape, self.begin, self.end]

    @classmethod
    def from_json(cls, item: list) -> "SpoolEntry":
        return cls(str(item[0]), str(item[1]), [int(d) for d in item[2]], int(item[3]), int(item[4]))


@dataclass
class TensorSpool:
    """Raw tensor bytes appended to ``path``; ``entries`` say where each tensor lies."""

    path: Path
    entries: list[SpoolEntry] = field(default_factory=list)
    size: int = 0

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = self.path.open("wb")

    def add(self, key: str, tensor: torch.Tensor) -> None:
        """Append one tensor (copied to CPU, contiguous, little-endian as torch stores it)."""
        data = tensor.detach().to("cpu").contiguous()
        if data.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"spool cannot store dtype {data.dtype} (tensor {key!r})")
        raw = data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b""
        self._handle.write(raw)
        self.entries.append(SpoolEntry(key, SAFETENSORS_DTYPES[data.dtype], list(data.shape), self.size, self.size + len(raw)))
        self.size += len(raw)

    def close(self) -> None:
        if not self._handle.closed:
            self._handle.close()

    def remove(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)


def header_bytes(parts: list[tuple[list[SpoolEntry], int]], metadata: dict[str, str]) -> bytes:
    """The safetensors header for spools laid end to end (padded to 8 bytes with spaces)."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for entries, size in parts:
        for entry in entries:
            if entry.key in header:
                raise ValueError(f"tensor key {entry.key!r} written twice")
            header[entry.key] = {"dtype": entry.dtype, "shape": entry.shape, "data_offsets": [offset + entry.begin, offset + entry.end]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    if len(raw) % 256 == 0x80:
        # A first file byte of 0x80 looks like a pickle opcode to sniffing readers
        # (studio.formats.safe refuses it); 8 more spaces keep the file plainly safetensors.
        raw += b" " * 8
    return raw


def write_spools(target: str | Path, parts: list[tuple[Path, list[SpoolEntry], int]], metadata: dict[str, str]) -> Path:
    """Write ``target`` atomically from spool files ``(path, entries, size)`` in order."""
    header = header_bytes([(entries, size) for _, entries, size in parts], metadata)
    with atomic_path(target) as tmp:
        with tmp.open("wb") as out:
            out.write(struct.pack("<Q", len(header)))
            out.write(header)
            for path, _, size in parts:
                with Path(path).open("rb") as source:
                    shutil.copyfileobj(source, out, length=16 * 1024 * 1024)
                if Path(path).stat().st_size != size:
                    raise OSError(f"spool {path} has {Path(path).stat().st_size} bytes, expected {size}")
    return Path(target)
