"""`studio train CONFIG.toml [--resume DIR] [--FIELD VALUE ...]` and the quality table from [[runs]]."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from studio.cli import main
from studio.events import run_to_end
from studio.verbs import train as train_verb
from tests.verbs.conftest import train_config

REPO = Path(__file__).resolve().parents[2]


def test_cli_trains_with_overrides_resumes_and_refuses_changes(tiny_pipeline_dir, style_data, tmp_path, capsys):
    config = train_config(tmp_path / "a.toml", tiny_pipeline_dir, style_data, tmp_path / "run")
    assert main(["train", str(config), "--threads", "1", "--steps", "3", "--no-tensorboard"]) == 0
    assert "done after 3 steps" in capsys.readouterr().out
    assert main(["train", str(config), "--steps", "3", "--resume", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    changed = train_config(tmp_path / "b.toml", tiny_pipeline_dir, style_data, tmp_path / "run", "seed = 5")
    assert main(["train", str(changed), "--steps", "3", "--resume", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "seed: 0 -> 5" in err and len(err.strip().splitlines()) == 1 and err.startswith("error: ")


def test_request_overrides_reach_the_config(tiny_pipeline_dir, style_data, tmp_path):
    config = train_config(tmp_path / "a.toml", tiny_pipeline_dir, style_data, tmp_path / "run")
    request = train_verb.TrainRequest(str(config), overrides={"steps": 1, "seed": 3, "sample_prompts": ["a red circle"]})
    configs = train_verb.check(request)
    assert (configs[0].steps, configs[0].seed, configs[0].sample_prompts) == (1, 3, ["a red circle"])


def test_quality_table_over_runs(tiny_pipeline_dir, style_data, tmp_path, capsys):
    text = train_config(tmp_path / "q.toml", tiny_pipeline_dir, style_data, tmp_path / "unused").read_text()
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
    (tmp_path / "q2.toml").write_text(text.replace("'q1'", "'q3'").replace(str(tmp_path / "q1"), str(tmp_path / "q3"))
                                      .replace(str(tmp_path / "q2"), str(tmp_path / "q4")))
    outcome = run_to_end(train_verb.run(train_verb.TrainRequest(str(tmp_path / "q2.toml"), overrides={"steps": 1})))
    runs = json.loads(json.dumps(outcome.as_json()))
    assert [(r["family"], r["status"], r["steps"]) for r in runs] == [("lora", "done", 1), ("unilora", "done", 1)]


@pytest.mark.slow
def test_first_ctrl_c_stops_with_a_checkpoint(tiny_pipeline_dir, style_data, tmp_path):
    """SIGINT once the loop has started: the run stops at the next step, saves, and says so."""
    config = train_config(tmp_path / "a.toml", tiny_pipeline_dir, style_data, tmp_path / "run", "steps = 100000")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "studio", "train", str(config)], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in process.stderr:  # the loop's first message comes once the base is loaded
            if line.startswith("training lora"):
                break
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == 1, err[-2000:]
    assert "stopping after this step" in err and "Traceback" not in err
    assert "run: stopped after" in out
    assert (tmp_path / "run" / "config.toml").is_file()
