"""`studio compress` and `studio project` on real-layout LoRA files (SD1.5 keys, tiny ranks)."""

from __future__ import annotations

import json

import pytest

from studio.commands import compress as compress_command
from studio.commands import project as project_command
from studio.formats import save_adapter
from tests.subspace.synthetic import in_span_adapter, random_adapter, shared_bases

BLOCK = "unet.down_blocks.0.attentions.0.transformer_blocks.0"
SD15 = {f"{BLOCK}.attn1.to_q": (320, 320), f"{BLOCK}.attn2.to_k": (320, 768)}


def _parse(module, argv):
    import argparse

    parser = argparse.ArgumentParser()
    module.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


@pytest.mark.slow  # studio.formats builds the SD module trees once (~8 s)
def test_compress_then_project_json(tmp_path, capsys):
    bases = shared_bases(6, shapes=SD15)
    folder = tmp_path / "zoo"
    for i in range(3):
        save_adapter(in_span_adapter(f"z{i}", bases, 4, seed=i), folder / f"z{i}.safetensors", format="kohya" if i % 2 else "diffusers")
    out = tmp_path / "zoo_c.safetensors"
    assert compress_command.run(_parse(compress_command, ["compress", str(folder), "-o", str(out), "--k", "6", "--json"])) == 0
    printed = capsys.readouterr()
    report = json.loads(printed.out)  # --json: stdout is the JSON alone
    assert [a["name"] for a in report["adapters"]] == ["z0", "z1", "z2"]
    assert max(a["rel_error"] for a in report["adapters"]) < 1e-5
    assert report["k"] == {name: 6 for name in SD15} and report["bytes_out"] == out.stat().st_size
    outside = save_adapter(random_adapter("outside", shapes=SD15), tmp_path / "outside.safetensors")
    assert project_command.run(_parse(project_command, ["project", str(out), str(outside), "--json"])) == 0
    assert json.loads(capsys.readouterr().out)["rel_error"] > 0.9
    again = tmp_path / "again.safetensors"
    assert compress_command.run(_parse(compress_command, ["compress", str(folder), "-o", str(again), "--k", "6"])) == 0
    printed = capsys.readouterr()
    assert "statistics" in printed.err and "projection" in printed.err and "3/3" in printed.err  # a bar per pass
    assert f"wrote {again}" in printed.out
