"""Safe safetensors reading: the studio's own caps, checked before anything is allocated.

Pickle files (.ckpt, .pt, .pth, .bin, or any file whose bytes look like a pickle or a torch zip)
are refused and never unpickled. The header is parsed by hand so that its size, the tensor
count, every shape's element count and every byte range are checked against the file before
safetensors maps a single tensor.
"""

from __future__ import annotations

import json
import math
import functools
import struct
from pathlib import Path
from typing import TYPE_CHECKING

from studio.errors import FormatError, UnsafeFileError

if TYPE_CHECKING:
    import torch

MAX_HEADER_BYTES = 64 * 1024 * 1024
MAX_TENSORS = 50_000
MAX_TENSOR_ELEMENTS = 2**31
MAX_DIMS = 8
MAX_METADATA_VALUE_CHARS = 2_000  # shown truncated; the full value is kept for export
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"}
DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}


def _refuse_pickle(path: Path, head: bytes) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UnsafeFileError(
            f"{path}: {path.suffix} files are Python pickles, which can run code when loaded; "
            "the studio reads safetensors only (convert the file with a tool you trust)"
        )
    looks_like_safetensors = len(head) >= 9 and head[8:9] == b"{"
    if not looks_like_safetensors and (head[:1] == b"\x80" or head[:4] == b"PK\x03\x04"):
        raise UnsafeFileError(f"{path}: the bytes are a pickle / torch zip archive, not safetensors; refused unread")


def read_header(path: str | Path) -> tuple[dict[str, dict], dict[str, str]]:
    """Parse and check a safetensors header: ``(tensor entries, metadata)``; no tensor is read."""
    header, metadata, _ = _parse_header(Path(path))
    return header, metadata


def read_header_layout(path: str | Path) -> tuple[dict[str, dict], dict[str, str], int]:
    """`read_header` plus the byte offset where the tensor data starts (entries' offsets count from it)."""
    return _parse_header(Path(path))


def _parse_header(path: Path) -> tuple[dict[str, dict], dict[str, str], int]:
    if not path.is_file():
        raise FormatError(f"{path}: no such file")
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(9)
        _refuse_pickle(path, head)
        head = head[:8]
        if len(head) < 8:
            raise FormatError(f"{path}: truncated ({size} bytes), not a safetensors file")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > MAX_HEADER_BYTES:
            raise FormatError(f"{path}: header of {header_len} bytes exceeds the cap of {MAX_HEADER_BYTES}")
        if header_len > size - 8:
            raise FormatError(f"{path}: header length {header_len} is larger than the file ({size} bytes); truncated or not safetensors")
        handle.seek(8)
        raw = handle.read(header_len)
    header = _json_object(path, raw)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise FormatError(f"{path}: __metadata__ is not an object")
    _check_entries(path, header, size - 8 - header_len)
    return header, _metadata_strings(path, metadata), 8 + header_len


def _json_object(path: Path, raw: bytes) -> dict:
    """The header as a JSON object; NaN / Infinity, deep nesting and bad bytes are format errors."""
    def refuse_constant(name: str):
        raise ValueError(f"{name} is not valid JSON")

    try:
        header = json.loads(raw, parse_constant=refuse_constant)
    except (UnicodeDecodeError, ValueError) as error:  # JSONDecodeError is a ValueError
        raise FormatError(f"{path}: invalid header JSON ({error}); not a safetensors file") from error
    except RecursionError as error:
        raise FormatError(f"{path}: header JSON is nested too deeply; not a safetensors file") from error
    if not isinstance(header, dict):
        raise FormatError(f"{path}: header is not a JSON object")
    return header


def _metadata_strings(path: Path, metadata: dict) -> dict[str, str]:
    """Metadata values as strings (safetensors metadata should be strings; others are kept as JSON)."""
    try:
        return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    except RecursionError as error:
        raise FormatError(f"{path}: __metadata__ is nested too deeply") from error


def _is_count(value) -> bool:
    """A non-negative JSON integer (``true`` and ``1.0`` are not)."""
    return type(value) is int and value >= 0


def _check_entries(path: Path, header: dict, data_bytes: int) -> None:
    if len(header) > MAX_TENSORS:
        raise FormatError(f"{path}: {len(header)} tensors exceed the cap of {MAX_TENSORS}")
    for key, entry in header.items():
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise FormatError(f"{path}: tensor {key!r} has a malformed header entry")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
            raise FormatError(f"{path}: tensor {key!r} has unknown dtype {str(dtype)[:40]!r}")
        if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_is_count(d) for d in shape):
            raise FormatError(f"{path}: tensor {key!r} has an invalid shape {str(shape)[:80]}")
        elements = math.prod(shape)
        if elements > MAX_TENSOR_ELEMENTS:
            raise FormatError(f"{path}: tensor {key!r} of shape {shape} has {elements} elements, over the cap")
        valid = isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
        begin, end = offsets if valid else (-1, -1)
        if not (0 <= begin <= end <= data_bytes) or end - begin != elements * DTYPE_BYTES[dtype]:
            raise FormatError(f"{path}: tensor {key!r} byte range {offsets} does not fit its shape or the file (truncated?)")


@functools.cache
def torch_dtypes() -> dict:
    """safetensors dtype name -> torch dtype (torch is imported here, not with the header reader)."""
    import torch

    return {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
        "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
        "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
        "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    }


def safe_load(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read every tensor of a checked safetensors file: ``(tensors, metadata)``.

    Tensors are cut from the data section by the byte ranges already checked in the header
    (safetensors is little-endian, like every machine torch runs on here)."""
    tensors, metadata, _ = _read_tensors(Path(path), screen=False)
    return tensors, metadata


def safe_load_screened(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """`safe_load` plus the keys of floating tensors holding NaN or inf (fp16 overflow shows up as
    inf), found from the bytes (`finite_bytes`) before any tensor is looked at."""
    return _read_tensors(Path(path), screen=True)


def _read_tensors(path: Path, screen: bool) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """The file's tensors as views of one buffer read in a single call (a tensor whose offset is
    not a multiple of its item size is copied out instead). Few Python-level torch calls per
    tensor: loader threads beside a busy main thread otherwise queue for the GIL at every call."""
    header, metadata, data_start = _parse_header(path)
    with path.open("rb") as handle:
        handle.seek(data_start)
        data = bytearray(handle.read())
    tensors, flagged = {}, []
    for key, entry in header.items():
        begin, end = entry["data_offsets"]
        name, shape = entry["dtype"], entry["shape"]
        if screen and not _finite_entry(data, begin, end, name):
            flagged.append(key)
        tensors[key] = _view(data, begin, end, name, shape)
    return tensors, metadata, flagged


# How each safetensors dtype is held by numpy: its own type, or (bfloat16, fp8: no numpy type) raw
# unsigned integers of its width, viewed as the torch dtype afterwards.
NUMPY_STORAGE = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1",
                 "BOOL": "?", "U16": "<u2", "U32": "<u4", "U64": "<u8", "BF16": "<u2", "F8_E4M3": "u1", "F8_E5M2": "u1"}
NO_NUMPY_TYPE = {"BF16", "F8_E4M3", "F8_E5M2"}


def _view(data: bytearray, begin: int, end: int, name: str, shape: list[int]) -> torch.Tensor:
    import numpy
    import torch

    if begin == end:
        return torch.empty(shape, dtype=torch_dtypes()[name])
    size = DTYPE_BYTES[name]
    array = numpy.frombuffer(data, dtype=NUMPY_STORAGE[name], count=(end - begin) // size, offset=begin).reshape(shape)
    tensor = torch.from_numpy(array) if begin % size == 0 else torch.from_numpy(array.copy())
    return tensor.view(torch_dtypes()[name]) if name in NO_NUMPY_TYPE else tensor


# Float dtypes whose NaN / inf show in the exponent bits: (item size, (byte, mask), (byte, mask) or None);
# a value is not finite when both bytes have every bit of their mask (fp8 e4m3fn has NaN only, no inf).
FINITE_BYTES = {
    "F16": (2, (1, 0x7C), None), "BF16": (2, (1, 0x7F), (0, 0x80)), "F32": (4, (3, 0x7F), (2, 0x80)),
    "F8_E5M2": (1, (0, 0x7C), None), "F8_E4M3": (1, (0, 0x7F), None),
}
_ALL_SET = {mask: bytes(1 if byte & mask == mask else 0 for byte in range(256)) for mask in (0x7C, 0x7F)}


def finite_bytes(raw: bytes | bytearray, begin: int, end: int, size: int, high: tuple[int, int], low: tuple[int, int] | None) -> bool:
    """Whether every value in raw[begin:end] is finite, from the exponent bytes alone (strided
    slices and a byte table run at C speed, without numpy or torch)."""
    marked = raw[begin + high[0] : end : size].translate(_ALL_SET[high[1]])
    if b"\x01" not in marked:
        return True
    if low is None:
        return False
    lows = raw[begin + low[0] : end : size]
    position = marked.find(b"\x01")
    while position >= 0:
        if lows[position] & low[1] == low[1]:
            return False
        position = marked.find(b"\x01", position + 1)
    return True


def _finite_entry(data: bytearray, begin: int, end: int, name: str) -> bool:
    """Whether a stored tensor's values are finite; F64 counts as finite only within float32's
    range (the studio computes in float32: a larger value would overflow there)."""
    if name in FINITE_BYTES:
        return begin == end or finite_bytes(data, begin, end, *FINITE_BYTES[name])
    if name == "F64":
        import numpy

        values = numpy.frombuffer(data, dtype="<f8", count=(end - begin) // 8, offset=begin)
        return bool(numpy.isfinite(values).all() and (numpy.abs(values) <= numpy.finfo(numpy.float32).max).all())
    return True


def shown_metadata(metadata: dict[str, str], limit: int = MAX_METADATA_VALUE_CHARS) -> dict[str, str]:
    """Metadata for display: long values (a huge ss_tag_frequency) truncated, with the length said."""
    return {key: value if len(value) <= limit else f"{value[:limit]}... ({len(value)} chars)" for key, value in metadata.items()}
