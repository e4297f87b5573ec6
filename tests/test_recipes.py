"""`studio run`: recipes dispatch to verbs; bad recipes name the file and the problem."""

from __future__ import annotations

import pytest

from studio.errors import ConfigError
from studio.events import run_to_end
from studio.recipes import run_recipe


def test_unknown_kind_and_bad_toml(tmp_path):
    bad_kind = tmp_path / "a.toml"
    bad_kind.write_text('[job]\nkind = "paint"\n')
    with pytest.raises(ConfigError, match=r"a\.toml.*kind must be"):
        list(run_recipe(bad_kind))
    broken = tmp_path / "b.toml"
    broken.write_text("[job\n")
    with pytest.raises(ConfigError, match=r"b\.toml: invalid TOML"):
        list(run_recipe(broken))


def test_unknown_keys_are_named(tmp_path):
    recipe = tmp_path / "c.toml"
    recipe.write_text('[job]\nkind = "benchmark"\n[benchmark]\nscript = "x.py"\nspeed = 3\n')
    with pytest.raises(ConfigError, match=r"unknown keys \['speed'\]"):
        list(run_recipe(recipe))


def test_benchmark_recipe_runs_script(tmp_path):
    script = tmp_path / "bench.py"
    marker = tmp_path / "ran.txt"
    script.write_text(f"import sys; open({str(marker)!r}, 'w').write(' '.join(sys.argv[1:]))\n")
    recipe = tmp_path / "d.toml"
    recipe.write_text(f'[job]\nkind = "benchmark"\n[benchmark]\nscript = {str(script)!r}\nargs = ["--quick"]\n')
    assert run_to_end(run_recipe(recipe)) == 0
    assert marker.read_text() == "--quick"
