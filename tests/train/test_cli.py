"""`studio train CONFIG.toml [--resume DIR]` and the quality table from [[runs]]."""

from __future__ import annotations

from studio.cli import main


def _write(path, tiny_pipeline_dir, style_data, out, extra=""):
    path.write_text(f"""
base = "{tiny_pipeline_dir}"
data = "{style_data}"
output_dir = "{out}"
steps = 3
batch_size = 2
learning_rate = 0.003
tensorboard = false
export_format = "none"
{extra}
[adapter]
family = "lora"
rank = 2
""")
    return path


def test_cli_trains_resumes_and_refuses_changes(tiny_pipeline_dir, style_data, tmp_path, capsys):
    config = _write(tmp_path / "a.toml", tiny_pipeline_dir, style_data, tmp_path / "run")
    assert main(["train", str(config), "--threads", "1"]) == 0
    assert "done after 3 steps" in capsys.readouterr().out
    assert main(["train", str(config), "--resume", str(tmp_path / "run")]) == 0
    changed = _write(tmp_path / "b.toml", tiny_pipeline_dir, style_data, tmp_path / "run", "seed = 5")
    assert main(["train", str(changed), "--resume", str(tmp_path / "run")]) == 2
    assert "seed: 0 -> 5" in capsys.readouterr().err


def test_quality_table_over_runs(tiny_pipeline_dir, style_data, tmp_path, capsys):
    text = _write(tmp_path / "q.toml", tiny_pipeline_dir, style_data, tmp_path / "unused").read_text()
    text = text.replace(f'output_dir = "{tmp_path / "unused"}"', "")
    text += f"""
[[runs]]
output_dir = "{tmp_path / 'q1'}"

[[runs]]
output_dir = "{tmp_path / 'q2'}"
adapter = {{ family = "unilora", d = 64 }}
"""
    (tmp_path / "q.toml").write_text(text)
    assert main(["train", str(tmp_path / "q.toml")]) == 0
    out = capsys.readouterr().out
    assert "val@end" in out and "unilora" in out and "lora " in out
