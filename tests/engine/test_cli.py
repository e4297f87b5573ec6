"""``studio generate`` through its own parser: files written, PNG info, grid, clear errors."""

from __future__ import annotations

import argparse

import pytest
from safetensors.torch import save_file

from studio.commands import generate as command
from studio.engine import read_png_parameters
from tests.engine.conftest import attention_layers, random_lora
from tests.engine.test_diffusers_match import kohya_file


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="studio")
    command.add_parser(parser.add_subparsers(dest="command"))
    return command.run(parser.parse_args(["generate", *argv]))


@pytest.fixture
def tiny(tiny_pipeline_dir, session_engine, monkeypatch):
    """CLI runs reuse the session engine (the verb keeps engines per base)."""
    from studio.engine import verbs

    monkeypatch.setitem(verbs._ENGINES, (str(tiny_pipeline_dir), "cpu", "torch.float32"), session_engine)
    session_engine.restore()
    return str(tiny_pipeline_dir)


def test_cli_writes_png_with_parameters(tiny, tmp_path, capsys):
    out = tmp_path / "out.png"
    code = run_cli("--base", tiny, "--prompt", "a red circle", "--seed", "4", "--steps", "3", "--scheduler", "euler",
                   "--device", "cpu", "-o", str(out))
    assert code == 0 and out.exists()
    params = read_png_parameters(out)
    assert (params.prompt, params.seed, params.steps, params.sampler, params.model) == ("a red circle", 4, 3, "Euler", "pipeline")
    assert str(out) in capsys.readouterr().out


def test_cli_per_image_batch_and_grid(tiny, session_engine, tmp_path):
    lora_path = tmp_path / "style.safetensors"
    kohya_file(random_lora(session_engine, "style", 80, layers=attention_layers(session_engine)), lora_path)
    out = tmp_path / "each.png"
    code = run_cli("--base", tiny, "--prompt", "a red circle", "--steps", "2", "--device", "cpu", "--per-image",
                   "--adapter", f"{lora_path}:0.7", "--adapter", "none", "-o", str(out))
    assert code == 0
    first, second = read_png_parameters(tmp_path / "each-0.png"), read_png_parameters(tmp_path / "each-1.png")
    assert first.adapters == [("style", 0.7)] and second.adapters == [] and (first.seed, second.seed) == (0, 1)
    grid = tmp_path / "grid.png"
    assert run_cli("--base", tiny, "--prompt", "x", "--steps", "2", "--device", "cpu", "--grid",
                   "--adapter", "none", "--adapter", str(lora_path), "-o", str(grid)) == 0
    assert read_png_parameters(grid).extra["Grid"] == "none | style"


def test_cli_errors_are_one_line_and_exit_2(tiny, tmp_path, capsys):
    code = run_cli("--base", tiny, "--prompt", "x", "--adapter", str(tmp_path / "nope.safetensors"), "--device", "cpu",
                   "-o", str(tmp_path / "o.png"))
    assert code == 2
    assert "no such file" in capsys.readouterr().err
    bad = tmp_path / "other_base.safetensors"
    save_file({"lora_unet_no_such_layer.lora_down.weight": __import__("torch").zeros(2, 4)}, str(bad))
    assert run_cli("--base", tiny, "--prompt", "x", "--adapter", str(bad), "--device", "cpu", "-o", str(tmp_path / "o.png")) == 2
    assert not (tmp_path / "o.png").exists()
