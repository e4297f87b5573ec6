"""`studio run`: recipes are jobs of verbs; every recipe in pipelines/ still reads; bad recipes name the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from studio.cli import main
from studio.errors import ConfigError
from studio.events import run_to_end
from studio.recipes import jobs_of, read_recipe
from studio.verbs.run import RunRequest, run as run_verb

from studio.verbs import train as train_verb
from tests.verbs.conftest import train_config



def run_recipe_(path):
    """What `studio run PATH` runs: the run verb over the recipe file."""
    return run_verb(RunRequest(str(path)))


PIPELINES = sorted((Path(__file__).resolve().parents[2] / "pipelines").glob("*.toml"))


@pytest.mark.parametrize("path", PIPELINES, ids=[p.name for p in PIPELINES])
def test_every_shipped_recipe_builds_its_requests(path):
    jobs = jobs_of(read_recipe(path), path)
    assert jobs and all(job.verb.recipe for job in jobs)
    for job in jobs:
        if job.verb.name == "train":
            assert train_verb.configs_of(job.request)  # the TrainConfig(s) build and check


def test_world_recipes_are_world_jobs():
    for name in ("world.toml", "world-quick.toml"):
        path = next(p for p in PIPELINES if p.name == name)
        job, = jobs_of(read_recipe(path), path)
        assert job.verb.name == "world" and type(job.request).__name__ == "WorldConfig"


def test_bad_recipes_name_the_file(tmp_path):
    bad_kind = tmp_path / "a.toml"
    bad_kind.write_text('[job]\nkind = "paint"\n')
    with pytest.raises(ConfigError, match=r"a\.toml.*kind must be one of"):
        list(run_recipe_(bad_kind))
    broken = tmp_path / "b.toml"
    broken.write_text("[job\n")
    with pytest.raises(ConfigError, match=r"b\.toml: invalid TOML"):
        list(run_recipe_(broken))
    unknown = tmp_path / "c.toml"
    unknown.write_text('[job]\nkind = "benchmark"\n[benchmark]\nscript = "x.py"\nspeed = 3\n')
    with pytest.raises(ConfigError, match=r"unknown keys \['speed'\]"):
        list(run_recipe_(unknown))


def test_benchmark_recipe_runs_script(tmp_path):
    script = tmp_path / "bench.py"
    marker = tmp_path / "ran.txt"
    script.write_text(f"import sys; open({str(marker)!r}, 'w').write(' '.join(sys.argv[1:]))\n")
    recipe = tmp_path / "d.toml"
    recipe.write_text(f'[job]\nkind = "benchmark"\n[benchmark]\nscript = {str(script)!r}\nargs = ["--quick"]\n')
    result = run_to_end(run_recipe_(recipe))
    assert [job.verb for job in result.jobs] == ["benchmark"] and result.jobs[0].result.returncode == 0
    assert marker.read_text() == "--quick"


def test_jobs_chain_a_dataset_into_training_and_a_compress(tiny_pipeline_dir, zoo, tmp_path, capsys):
    """Files an earlier job writes are checked when the later job starts, not when the recipe is read."""
    config = train_config(tmp_path / "t.toml", tiny_pipeline_dir, tmp_path / "data", tmp_path / "run")
    recipe = tmp_path / "r.toml"
    recipe.write_text(f"""
[[jobs]]
verb = "dataset"
style = "noir"
output = "{tmp_path / 'data'}"
count = 4
size = 16

[[jobs]]
verb = "train"
config = "{config}"
steps = 1

[[jobs]]
verb = "compress"
paths = ["{zoo}"]
output = "{tmp_path / 'c.safetensors'}"
k = 1
base = "{tiny_pipeline_dir}"
""")
    assert main(["run", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "[dataset]" in out and "done after 1 steps" in out and "verdict:" in out
    assert (tmp_path / "c.safetensors").is_file()


def test_a_train_config_is_a_recipe(tiny_pipeline_dir, style_data, tmp_path):
    config = train_config(tmp_path / "t.toml", tiny_pipeline_dir, style_data, tmp_path / "run")
    job, = jobs_of(read_recipe(config), config)
    assert job.verb.name == "train" and job.request.config == str(config)
