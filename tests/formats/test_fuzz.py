"""In-process fuzzer of the safetensors adapter reader and the compressed-collection reader.

Valid seed files are mutated (byte flips in the header or data, truncation, header-length lies,
header JSON fields replaced by hostile values, metadata junk) and read again. Only studio errors
may come out; a run is bounded in time (pytest-timeout) and in memory (peak RSS growth).
A few hundred cases run in CI's normal pass; ``-m slow`` runs over 5,000.
"""

from __future__ import annotations

import json
import random
import resource
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from studio.errors import StudioError
from studio.formats import load_adapter

Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
K = "lora_te_text_model_encoder_layers_0_self_attn_k_proj"
HOSTILE = [None, True, False, -1, 0, 1, 2**31, 2**63, 1.5, -0.0, 1e308, "x", "F32", "", [], {}, [0], [1, 2, 3],
           [2**40, 2**40], [True], [1.0, 2.0], [-8, 8], {"dtype": "F32"}, "NaN", [[[]]], "\u0000", "a" * 3000]


def seed_files(folder: Path) -> list[Path]:
    """A kohya LoRA, a LoHa, a LoKr and a diffusers file with metadata (small, SD1.5 names)."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g) * 0.01  # noqa: E731
    files = {
        "kohya": ({f"{Q}.lora_down.weight": r(2, 320), f"{Q}.lora_up.weight": r(320, 2), f"{Q}.alpha": torch.tensor(1.0),
                   f"{K}.lora_down.weight": r(2, 768).half(), f"{K}.lora_up.weight": r(768, 2).half()},
                  {"ss_network_dim": "2", "ss_tag_frequency": json.dumps({"a": {"tag": 3}})}),
        "loha": ({f"{Q}.hada_w1_a": r(320, 2), f"{Q}.hada_w1_b": r(2, 320), f"{Q}.hada_w2_a": r(320, 2),
                  f"{Q}.hada_w2_b": r(2, 320), f"{Q}.alpha": torch.tensor(2.0)}, None),
        "lokr": ({f"{Q}.lokr_w1": r(4, 4), f"{Q}.lokr_w2_a": r(80, 2), f"{Q}.lokr_w2_b": r(2, 80), f"{Q}.alpha": torch.tensor(2.0)}, None),
        "diffusers": ({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": r(2, 320),
                       "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": r(320, 2)},
                      {"lora_adapter_metadata": json.dumps({"unet.r": 2, "unet.lora_alpha": 1})}),
    }
    paths = []
    for name, (tensors, metadata) in files.items():
        save_file(tensors, folder / f"{name}.safetensors", metadata=metadata)
        paths.append(folder / f"{name}.safetensors")
    return paths


def _split(data: bytes) -> tuple[dict, bytes] | None:
    (length,) = struct.unpack("<Q", data[:8])
    try:
        return json.loads(data[8 : 8 + length]), data[8 + length :]
    except ValueError:
        return None


def _join(header: dict, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


def _mutate_json(data: bytes, rng: random.Random) -> bytes:
    parsed = _split(data)
    if parsed is None:
        return data
    header, body = parsed
    key = rng.choice(list(header))
    if key == "__metadata__" or rng.random() < 0.15:
        meta = header.setdefault("__metadata__", {}) if isinstance(header.get("__metadata__", {}), dict) else {}
        meta[rng.choice(["lora_adapter_metadata", "ss_tag_frequency", "ss_network_dim", "modelspec.trigger_phrase"])] = (
            json.dumps(rng.choice(HOSTILE)) if rng.random() < 0.5 else rng.choice(["{", "[1]", '{"unet.r": -1}', '{"a": {"b": NaN}}']))
        header["__metadata__"] = meta
    elif rng.random() < 0.2:
        header[key] = rng.choice(HOSTILE)  # the whole entry
    elif isinstance(header[key], dict):
        header[key][rng.choice(["dtype", "shape", "data_offsets"])] = rng.choice(HOSTILE)
    if rng.random() < 0.1:
        header[f"{rng.choice(list(header))}.extra"] = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
    return _join(header, body)


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One hostile variant of a valid file."""
    (length,) = struct.unpack("<Q", data[:8])
    kind = rng.randrange(6)
    if kind == 0:  # flip bytes in the header
        out = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            out[rng.randrange(8, 8 + length)] = rng.randrange(256)
        return bytes(out)
    if kind == 1:  # flip bytes anywhere
        out = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            out[rng.randrange(len(out))] = rng.randrange(256)
        return bytes(out)
    if kind == 2:  # truncate
        return data[: rng.randrange(len(data))]
    if kind == 3:  # header length lies
        return struct.pack("<Q", rng.choice([0, 1, length - 1, length + 1, 2**31, 2**64 - 1])) + data[8:]
    if kind == 4:  # data bytes become NaN / inf patterns
        out = bytearray(data)
        start = rng.randrange(8 + length, len(out) - 4) if len(out) > 12 + length else 8 + length
        out[start : start + 4] = struct.pack("<f", rng.choice([float("nan"), float("inf"), 1e38, -0.0]))
        return bytes(out)
    return _mutate_json(data, rng)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fuzz_reader(folder: Path, cases: int, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    seeds = [p.read_bytes() for p in seed_files(folder)]
    outcomes = {"read": 0, "refused": 0}
    target = folder / "fuzzed.safetensors"
    for _ in range(cases):
        target.write_bytes(mutate(rng.choice(seeds), rng))
        try:
            load_adapter(target, "sd15")
            outcomes["read"] += 1
        except StudioError:
            outcomes["refused"] += 1
    return outcomes


def _collection_file(folder: Path) -> Path:
    from studio.subspace import compress_sources, held_sources
    from tests.subspace.synthetic import shared_collection

    path = folder / "zoo.safetensors"
    compress_sources(held_sources(shared_collection(3, rank=2, true_k=3)), path, k=2, base_id="fuzz")
    return path


def fuzz_collection(folder: Path, cases: int, seed: int) -> dict[str, int]:
    from studio.subspace.collection import CompressedCollection

    rng = random.Random(seed)
    original = _collection_file(folder).read_bytes()
    target = folder / "fuzzed_zoo.safetensors"
    outcomes = {"read": 0, "refused": 0}
    for _ in range(cases):
        target.write_bytes(mutate(original, rng))
        try:
            collection = CompressedCollection.load(target)
            for name in collection.names[:1]:
                collection.export(name)
            outcomes["read"] += 1
        except StudioError:
            outcomes["refused"] += 1
    return outcomes


@pytest.mark.timeout(120)
def test_fuzzed_adapter_files_give_only_studio_errors(tmp_path):
    before = _peak_mb()
    outcomes = fuzz_reader(tmp_path, 200, seed=1)
    assert outcomes["refused"] > 80 and sum(outcomes.values()) == 200
    assert _peak_mb() - before < 1024


@pytest.mark.timeout(120)
def test_fuzzed_collection_files_give_only_studio_errors(tmp_path):
    before = _peak_mb()
    outcomes = fuzz_collection(tmp_path, 200, seed=2)
    assert outcomes["refused"] > 50 and sum(outcomes.values()) == 200
    assert _peak_mb() - before < 1024


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_fuzz_thousands_of_cases(tmp_path):
    before = _peak_mb()
    reader = fuzz_reader(tmp_path, 4000, seed=11)
    collection = fuzz_collection(tmp_path, 1200, seed=12)
    assert sum(reader.values()) + sum(collection.values()) >= 5000
    assert _peak_mb() - before < 1536
