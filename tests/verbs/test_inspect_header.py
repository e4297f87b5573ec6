"""`studio inspect FILE` reads a plain LoRA from its header (no torch): the row must be the one the
full reader gives, and every file the header view cannot vouch for goes to the full reader."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from studio.collection import describe, load_collection
from studio.formats.reader import header_adapter
from studio.verbs.inspect import InspectRequest, run

REPO = Path(__file__).resolve().parents[2]
SHARED = Path("/work/shared/loras")
WORLD = sorted((REPO / "assets" / "world" / "loras").rglob("*.safetensors"))
REAL = sorted(SHARED.glob("*.safetensors")) if SHARED.is_dir() else []
PLAIN_REAL = {"sd15_attnproc_catundchat", "sd15_diffusers_jettooss", "sd15_diffusers_rafidreezwan",
              "sd15_handmade_kohya_like_timohavdk", "sd2_bf16_vfph55"}  # unet-only LoRAs of known layouts


def _full_row(path: Path):
    return load_collection([path]).infos[0]


@pytest.mark.parametrize("path", WORLD, ids=lambda p: p.name)
def test_header_row_is_the_full_readers_row_world(path):
    adapter = header_adapter(path)
    assert adapter is not None, "the world's kohya / diffusers files are plain LoRAs"
    assert describe(path, adapter) == _full_row(path)


@pytest.mark.skipif(not REAL, reason="needs /work/shared/loras")
@pytest.mark.parametrize("path", REAL, ids=lambda p: p.name)
def test_header_row_is_the_full_readers_row_real_files(path):
    adapter = header_adapter(path)
    if path.stem in PLAIN_REAL:
        assert adapter is not None
    if "lycoris" in path.stem:
        assert adapter is None, "LoKr / LoHa layers need the full reader's conversion"
    if adapter is not None:
        assert describe(path, adapter) == _full_row(path)


def _kohya_file(path: Path, value: float, dtype=torch.float16) -> Path:
    stem = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q"
    down = torch.randn(4, 1280).to(dtype)
    down[1, 7] = value
    save_file({f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": torch.randn(1280, 4).to(dtype),
               f"{stem}.alpha": torch.tensor(2.0)}, str(path))
    return path


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_values_go_to_the_full_reader(tmp_path, dtype, value):
    path = _kohya_file(tmp_path / "bad.safetensors", value, dtype)
    assert header_adapter(path) is None
    row = run(InspectRequest(paths=[str(path)])).infos[0]
    assert row.error and "NaN or inf" in row.error


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_large_finite_values_are_finite(tmp_path, dtype):
    big = 60000.0 if dtype == torch.float16 else 1e30
    path = _kohya_file(tmp_path / "big.safetensors", big, dtype)
    adapter = header_adapter(path)
    assert adapter is not None and adapter.alphas == [2.0]
    assert describe(path, adapter) == _full_row(path)


def test_inspect_of_a_plain_file_does_not_import_torch():
    import os

    from studio.bases import module_tree

    module_tree("world")  # the world's tree is cached data from here on (a cold cache builds it once, with torch)
    code = ("import sys, json; from studio.verbs.inspect import InspectRequest, run; "
            f"result = run(InspectRequest(paths=[{str(WORLD[0])!r}])); "
            "print(json.dumps({'torch': 'torch' in sys.modules, 'rows': result.as_json()}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["torch"] is False
    assert found["rows"] == [_full_row(WORLD[0]).as_dict()]
