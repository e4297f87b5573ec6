"""The safetensors reader's tensors and its byte-level NaN / inf screen, against torch's own
view of the same values: every float dtype, values at the edges, misaligned offsets."""

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from studio.formats.safe import safe_load, safe_load_screened

FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2]


def _edge_values(dtype: torch.dtype) -> torch.Tensor:
    info = torch.finfo(dtype)
    return torch.tensor([0.0, -0.0, info.tiny, -info.max, info.max, 1.5, -2.25], dtype=torch.float32).to(dtype)


def _expected(tensor: torch.Tensor) -> bool:
    """Finite the way the studio computes: in float32 (float64 beyond float32's range overflows)."""
    return bool(torch.isfinite(tensor.to(torch.float64)).all()) and bool(torch.isfinite(tensor.to(torch.float64).float()).all())


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("bad", [None, "nan", "inf", "-inf"])
def test_screen_agrees_with_torch(tmp_path, dtype, bad):
    values = _edge_values(dtype)
    if bad is not None:
        values = values.clone()
        values[3] = torch.tensor(float(bad)).to(dtype)
    tensors = {"a": values, "b": torch.ones(5, dtype=torch.float32), "c": torch.arange(6, dtype=torch.int64)}
    path = tmp_path / "x.safetensors"
    save_file(tensors, str(path))
    loaded, _, flagged = safe_load_screened(path)
    assert ("a" in flagged) == (not _expected(values))
    assert "b" not in flagged and "c" not in flagged
    for key, tensor in tensors.items():
        assert loaded[key].dtype == tensor.dtype and loaded[key].shape == tensor.shape
        assert torch.equal(loaded[key].view(torch.uint8), tensor.view(torch.uint8))  # bit for bit, NaN included


def test_float64_beyond_float32_is_flagged(tmp_path):
    path = tmp_path / "big.safetensors"
    save_file({"a": torch.tensor([1e39], dtype=torch.float64), "b": torch.tensor([1e38], dtype=torch.float64)}, str(path))
    assert safe_load_screened(path)[2] == ["a"]


def _raw(path, entries: dict, data: bytes):
    header = json.dumps(entries).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def test_misaligned_tensors_read_right(tmp_path):
    """A 1-byte tensor first puts the float32 tensor after it at an odd offset: it is copied out,
    with the right values, and the screen still sees its inf."""
    values = torch.tensor([1.0, float("inf"), -3.5], dtype=torch.float32)
    data = bytes([7]) + values.numpy().tobytes() + torch.tensor([2.0], dtype=torch.float16).numpy().tobytes()
    entries = {
        "byte": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
        "f32": {"dtype": "F32", "shape": [3], "data_offsets": [1, 13]},
        "f16": {"dtype": "F16", "shape": [1], "data_offsets": [13, 15]},
    }
    path = _raw(tmp_path / "odd.safetensors", entries, data)
    tensors, _, flagged = safe_load_screened(path)
    assert flagged == ["f32"]
    assert torch.equal(tensors["f32"], values) and tensors["byte"].tolist() == [7] and tensors["f16"].tolist() == [2.0]
    plain, _ = safe_load(path)
    assert torch.equal(plain["f32"], values)


def test_tensors_are_independent(tmp_path):
    """Views of one read buffer: writing into one tensor changes no other."""
    path = tmp_path / "two.safetensors"
    save_file({"a": torch.zeros(4), "b": torch.ones(4)}, str(path))
    tensors, _ = safe_load(path)
    tensors["a"] += 5
    assert tensors["b"].tolist() == [1.0] * 4
