"""A corpus of bad command lines across every verb: each is one `error:` line on stderr naming the
field or file, exit code 2, no traceback, nothing on stdout, no input file changed, nothing written.

Run in-process through `studio.cli.main` (fast); a handful again as real processes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from studio.cli import main
from tests.verbs.conftest import digest, train_config

REPO = Path(__file__).resolve().parents[2]
HUGE = str(2**70)

# (id, argv with {placeholders}, text the error line must hold)
USAGE = [
    ("no-verb", [], "VERB"),
    ("unknown-verb", ["paint"], "invalid choice: 'paint'"),
    ("inspect-no-path", ["inspect"], "PATH"),
    ("unknown-flag", ["inspect", "{A}", "--speed", "3"], "unrecognized arguments: --speed"),
]
INSPECT = [
    ("inspect-missing", ["inspect", "{N}/missing.safetensors"], "no such file or folder"),
    ("inspect-lycoris-rank-0", ["inspect", "{A}", "--lycoris-rank", "0"], "lycoris_rank = 0"),
    ("inspect-lycoris-rank-negative", ["inspect", "{A}", "--lycoris-rank", "-3"], "lycoris_rank = -3"),
    ("inspect-lycoris-rank-word", ["inspect", "{A}", "--lycoris-rank", "x"], "--lycoris-rank"),
]
EXPORT = [
    ("export-onto-input", ["export", "{A}", "-o", "{A}"], "would overwrite the input"),
    ("export-onto-input-via-symlink", ["export", "{A}", "-o", "{L}"], "would overwrite the input"),
    ("export-onto-symlinked-input", ["export", "{L}", "-o", "{A}"], "would overwrite the input"),
    ("export-to-folder", ["export", "{A}", "-o", "{D}"], "is a folder"),
    ("export-to-ckpt", ["export", "{A}", "-o", "{N}/out.ckpt"], "must end in .safetensors"),
    ("export-no-output", ["export", "{A}"], "-o/--output"),
    ("export-missing-input", ["export", "{N}/none.safetensors", "-o", "{N}/o.safetensors"], "input: no such file"),
    ("export-input-folder", ["export", "{D}", "-o", "{N}/o.safetensors"], "input: "),
    ("export-collection-without-member", ["export", "{C}", "-o", "{N}/o.safetensors"], "--adapter NAME"),
    ("export-missing-member-hash", ["export", "{C}#nosuch", "-o", "{N}/o.safetensors"], "no adapter 'nosuch'"),
    ("export-missing-member-flag", ["export", "{C}", "--adapter", "nosuch", "-o", "{N}/o.safetensors"], "no adapter 'nosuch'"),
    ("export-member-of-a-lora", ["export", "{A}", "--adapter", "style0", "-o", "{N}/o.safetensors"], "not a compressed collection"),
    ("export-empty-member", ["export", "{C}#", "-o", "{N}/o.safetensors"], "nothing after '#'"),
    ("export-two-members", ["export", "{C}#style0", "--adapter", "style1", "-o", "{N}/o.safetensors"], "--adapter"),
    ("export-bad-format", ["export", "{A}", "--format", "ckpt", "-o", "{N}/o.safetensors"], "--format"),
    ("export-bad-tool", ["export", "{A}", "--for", "photoshop", "-o", "{N}/o.safetensors"], "--for"),
    ("export-lycoris-rank-0", ["export", "{A}", "--lycoris-rank", "0", "-o", "{N}/o.safetensors"], "lycoris_rank = 0"),
    ("export-lycoris-rank-negative", ["export", "{A}", "--lycoris-rank", "-3", "-o", "{N}/o.safetensors"], "lycoris_rank = -3"),
]
COMPRESS = [
    ("compress-k-0", ["compress", "{Z}", "-o", "{N}/c.safetensors", "--k", "0"], "k = 0"),
    ("compress-k-fraction", ["compress", "{Z}", "-o", "{N}/c.safetensors", "--k", "2.5"], "--k"),
    ("compress-energy-above-1", ["compress", "{Z}", "-o", "{N}/c.safetensors", "--energy", "1.5"], "energy = 1.5"),
    ("compress-energy-0", ["compress", "{Z}", "-o", "{N}/c.safetensors", "--energy", "0"], "energy = 0"),
    ("compress-energy-nan", ["compress", "{Z}", "-o", "{N}/c.safetensors", "--energy", "nan"], "energy = nan"),
    ("compress-augment-negative", ["compress", "{Z}", "-o", "{N}/c.safetensors", "--k", "2", "--augment", "-1"], "augment = -1"),
    ("compress-no-size", ["compress", "{Z}", "-o", "{N}/c.safetensors"], "--k --energy"),
    ("compress-k-and-energy", ["compress", "{Z}", "-o", "{N}/c.safetensors", "--k", "2", "--energy", "0.5"], "not allowed with"),
    ("compress-onto-input-file", ["compress", "{A}", "{Z}", "-o", "{A}", "--k", "2"], "would overwrite the input"),
    ("compress-onto-file-of-input-folder", ["compress", "{Z}", "-o", "{Z}/style0.safetensors", "--k", "2"], "would overwrite the input"),
    ("compress-onto-input-via-symlink", ["compress", "{A}", "-o", "{L}", "--k", "2"], "would overwrite the input"),
    ("compress-to-folder", ["compress", "{Z}", "-o", "{D}", "--k", "2"], "is a folder"),
    ("compress-missing-path", ["compress", "{N}/nothing", "-o", "{N}/c.safetensors", "--k", "2"], "no such file or folder"),
    ("compress-bad-device", ["compress", "{Z}", "-o", "{N}/c.safetensors", "--k", "2", "--device", "gpu"], "'gpu' is not a device"),
    ("compress-seed-negative", ["compress", "{Z}", "-o", "{N}/c.safetensors", "--k", "2", "--seed", "-1"], "seed = -1"),
    ("compress-seed-huge", ["compress", "{Z}", "-o", "{N}/c.safetensors", "--k", "2", "--seed", HUGE], "seed = "),
    ("compress-bad-stats-dtype", ["compress", "{Z}", "-o", "{N}/c.safetensors", "--k", "2", "--stats-dtype", "float16"], "--stats-dtype"),
    ("compress-export-dir-a-file", ["compress", "{Z}", "-o", "{N}/c.safetensors", "--k", "2", "--export-dir", "{A}"], "export_dir"),
    ("compress-export-onto-inputs", ["compress", "{Z}", "-o", "{N}/c.safetensors", "--k", "2", "--export-dir", "{Z}"], "would overwrite the input"),
]
PROJECT_SIMILAR = [
    ("project-lora-as-collection", ["project", "{A}", "{A}"], "not a compressed collection"),
    ("project-collection-as-adapter", ["project", "{C}", "{C}"], "adapter: "),
    ("project-missing-adapter", ["project", "{C}", "{N}/none.safetensors"], "adapter: no such file"),
    ("similar-collection-as-query", ["similar", "{C}", "{C}"], "query: "),
    ("similar-missing-against", ["similar", "{A}", "{N}/none.safetensors"], "against: no such file"),
    ("similar-top-negative", ["similar", "{A}", "{C}", "--top", "-1"], "top = -1"),
]
DATASET = [
    ("dataset-unknown-style", ["dataset", "--style", "plaid", "-o", "{N}/d"], "'plaid' is not a world style"),
    ("dataset-output-a-file", ["dataset", "--style", "noir", "-o", "{A}"], "is a file"),
    ("dataset-output-not-ours", ["dataset", "--style", "noir", "-o", "{D}"], "not written by `studio dataset`"),
    ("dataset-count-0", ["dataset", "--style", "noir", "-o", "{N}/d", "--count", "0"], "count = 0"),
    ("dataset-size-4", ["dataset", "--style", "noir", "-o", "{N}/d", "--size", "4"], "size = 4"),
    ("dataset-too-large", ["dataset", "--style", "noir", "-o", "{N}/d", "--count", "4096", "--size", "1024"], "GiB"),
    ("dataset-no-style", ["dataset", "-o", "{N}/d"], "--style"),
]
G = ["generate", "--prompt", "a red circle", "-o", "{N}/g.png"]
GENERATE = [
    ("generate-guidance-nan", [*G, "--guidance", "nan"], "guidance = nan"),
    ("generate-guidance-inf", [*G, "--guidance", "inf"], "guidance = inf"),
    ("generate-guidance-huge", [*G, "--guidance", "1e9"], "max_guidance"),
    ("generate-scale-nan", [*G, "--scale", "nan"], "scale = nan"),
    ("generate-scale-inf", [*G, "--scale", "inf"], "scale = inf"),
    ("generate-scale-huge", [*G, "--scale", "1e30"], "max_weight"),
    ("generate-seed-huge", [*G, "--seed", HUGE], "seed = "),
    ("generate-seed-negative", [*G, "--seed", "-5"], "seed = -5"),
    ("generate-bad-device", [*G, "--device", "gpu"], "'gpu' is not a device"),
    ("generate-device-out-of-range", [*G, "--device", "cuda:99"], "cuda:99"),
    ("generate-steps-0", [*G, "--steps", "0"], "steps = 0"),
    ("generate-steps-above-cap", [*G, "--steps", "500"], "max_steps"),
    ("generate-side-above-cap", [*G, "--width", "100000", "--height", "100000"], "max_side"),
    ("generate-pixels-above-cap", [*G, "--width", "4096", "--height", "4096"], "max_pixels"),
    ("generate-width-not-multiple-of-8", [*G, "--width", "63"], "multiple of 8"),
    ("generate-batch-above-cap", [*G, "--batch", "17"], "max_batch"),
    ("generate-missing-adapter", [*G, "--adapter", "{N}/none.safetensors"], "adapter: no such file"),
    ("generate-missing-member", [*G, "--adapter", "{C}#nosuch"], "no adapter 'nosuch'"),
    ("generate-weight-huge", [*G, "--adapter", "{A}:1e30"], "max_weight"),
    ("generate-weight-nan", [*G, "--adapter", "{A}:nan"], "finite"),
    ("generate-output-not-png", ["generate", "--prompt", "x", "-o", "{N}/g.jpg"], "must end in .png"),
    ("generate-output-folder", ["generate", "--prompt", "x", "-o", "{D}"], "is a folder"),
    ("generate-empty-prompt", ["generate", "--prompt", " ", "-o", "{N}/g.png"], "prompt"),
    ("generate-per-image-without-adapters", [*G, "--per-image"], "per-image"),
    ("generate-unknown-scheduler", [*G, "--scheduler", "magic"], "scheduler 'magic'"),
    ("generate-bad-dtype", [*G, "--dtype", "fp8"], "--dtype"),
    ("generate-no-prompt", ["generate", "-o", "{N}/g.png"], "--prompt"),
    ("generate-steps-word", [*G, "--steps", "many"], "--steps"),
]
TRAIN = [
    ("train-missing-config", ["train", "{N}/none.toml"], "config: no such file"),
    ("train-broken-toml", ["train", "{cfg:[adapter}"], "cannot read train config"),
    ("train-steps-fraction", ["train", "{cfg:steps = 2.5}"], "steps = 2.5"),
    ("train-steps-bool", ["train", "{cfg:steps = true}"], "steps = True"),
    ("train-checkpoint-every-negative", ["train", "{cfg:checkpoint_every = -1}"], "checkpoint_every = -1"),
    ("train-sample-prompts-string", ["train", "{cfg:sample_prompts = 'abc'}"], "sample_prompts"),
    ("train-warmup-negative", ["train", "{cfg:lr_warmup_steps = -5}"], "lr_warmup_steps = -5"),
    ("train-resolution-63", ["train", "{cfg:resolution = 63}"], "resolution = 63"),
    ("train-learning-rate-word", ["train", "{cfg:learning_rate = 'fast'}"], "learning_rate = 'fast'"),
    ("train-unknown-key", ["train", "{cfg:speed = 3}"], "speed"),
    ("train-unknown-family", ["train", "{knobs:family = 'nosuch'}"], "'nosuch'"),
    ("train-rank-0", ["train", "{knobs:rank = 0}"], "rank = 0"),
    ("train-rank-string", ["train", "{knobs:rank = '8'}"], "rank = '8'"),
    ("train-unknown-knob", ["train", "{knobs:rank = 2\nwidth = 3}"], "unknown key(s) ['width']"),
    ("train-missing-data", ["train", "{cfg:data = '/nonexistent/data'}"], "data: no such folder"),
    ("train-override-steps-negative", ["train", "{T}", "--steps", "-1"], "steps = -1"),
    ("train-override-lr-nan", ["train", "{T}", "--learning-rate", "nan"], "learning_rate = nan"),
    ("train-override-bad-schedule", ["train", "{T}", "--lr-schedule", "wavy"], "--lr-schedule"),
    ("train-resume-missing", ["train", "{T}", "--resume", "{N}/run"], "resume: no such folder"),
    ("train-resume-not-a-run", ["train", "{T}", "--resume", "{D}"], "no run to resume"),
    ("train-threads-0", ["train", "{T}", "--threads", "0"], "threads = 0"),
]
RUN = [
    ("run-missing-recipe", ["run", "{N}/none.toml"], "recipe: no such file"),
    ("run-broken-toml", ["run", "{recipe:[job}"], "invalid TOML"),
    ("run-unknown-kind", ["run", "{recipe:[job]\nkind = 'paint'}"], "kind must be one of"),
    ("run-kind-not-text", ["run", "{recipe:[job]\nkind = 3}"], "kind must be one of"),
    ("run-serve-job", ["run", "{recipe:[[jobs]]\nverb = 'serve'}"], "kind must be one of"),
    ("run-compress-k-0", ["run", "{recipe:[job]\nkind = 'compress'\n[compress]\npaths = ['{Z}']\noutput = '{N}/c.safetensors'\nk = 0}"], "k = 0"),
    ("run-compress-unknown-key", ["run", "{recipe:[job]\nkind = 'compress'\n[compress]\npaths = ['{Z}']\noutput = '{N}/c.safetensors'\nspeed = 1}"], "unknown keys ['speed']"),
    ("run-compress-missing-output", ["run", "{recipe:[job]\nkind = 'compress'\n[compress]\npaths = ['{Z}']\nk = 2}"], "missing required keys ['output']"),
    ("run-job-onto-input", ["run", "{recipe:[[jobs]]\nverb = 'export'\ninput = '{A}'\noutput = '{A}'}"], "would overwrite the input"),
    ("run-world-bad-field", ["run", "{recipe:[job]\nkind = 'world'\n[world]\nlora_steps = -1}"], "lora_steps"),
]
SERVE = [
    ("serve-port-0", ["serve", "--port", "0"], "port = 0"),
    ("serve-port-too-high", ["serve", "--port", "70000"], "port = 70000"),
    ("serve-missing-zoo", ["serve", "--zoo", "{N}/zoo"], "zoo: no such folder"),
    ("serve-workspace-a-file", ["serve", "--workspace", "{A}"], "is a file"),
    ("serve-bad-device", ["serve", "--device", "gpu"], "'gpu' is not a device"),
    ("serve-upload-cap-0", ["serve", "--max-upload-mb", "0"], "max_upload_mb = 0"),
]
CASES = USAGE + INSPECT + EXPORT + COMPRESS + PROJECT_SIMILAR + DATASET + GENERATE + TRAIN + RUN + SERVE
SUBPROCESS = ["unknown-verb", "export-onto-input", "compress-k-0", "generate-guidance-nan", "train-steps-bool", "run-unknown-kind"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, zoo, collection, style_data, tiny_pipeline_dir) -> dict[str, Path]:
    """The files the bad command lines name (hashed before and after each case)."""
    root = tmp_path_factory.mktemp("corpus")
    folder = root / "inputs"
    shutil.copytree(zoo, folder / "zoo")
    shutil.copy(zoo / "style0.safetensors", folder / "a.safetensors")
    shutil.copy(collection, folder / "c.safetensors")
    (folder / "link.safetensors").symlink_to(folder / "a.safetensors")
    train_config(folder / "t.toml", tiny_pipeline_dir, style_data, root / "runs" / "t")
    return {"root": root, "inputs": folder, "A": folder / "a.safetensors", "C": folder / "c.safetensors", "L": folder / "link.safetensors",
            "D": folder, "Z": folder / "zoo", "T": folder / "t.toml", "base": tiny_pipeline_dir, "data": style_data}


def _argv(template: list[str], inputs: dict[str, Path], new: Path, case: str) -> list[str]:
    """Fill the placeholders; ``{cfg:...}`` / ``{knobs:...}`` / ``{recipe:...}`` write a file."""
    values = {key: str(value) for key, value in inputs.items()} | {"N": str(new)}
    argv = []
    for item in template:
        if item.startswith(("{cfg:", "{knobs:", "{recipe:")):
            kind, _, body = item[1:-1].partition(":")
            body = body.format(**values) if kind == "recipe" else body
            path = inputs["root"] / "made" / f"{case}.toml"
            path.parent.mkdir(exist_ok=True)
            if kind == "recipe":
                path.write_text(body + "\n")
            else:
                train_config(path, inputs["base"], inputs["data"], inputs["root"] / "runs" / case, **{"extra" if kind == "cfg" else "knobs": body})
            argv.append(str(path))
        else:
            argv.append(item.format(**values))
    return argv


def _assert_one_error_line(code: int, out: str, err: str, expected: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, err)
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in lines[0], lines[0]
    assert out == ""


def test_the_corpus_is_large_and_names_are_unique():
    assert len(CASES) >= 60
    assert len({case for case, _, _ in CASES}) == len(CASES)


@pytest.mark.parametrize("case,template,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_command_line(case, template, expected, inputs, tmp_path, capsys):
    if case == "generate-device-out-of-range" and torch.cuda.device_count() > 99:
        pytest.skip("this machine has a cuda:99")
    new = tmp_path / "new"
    argv = _argv(template, inputs, new, case)
    before = digest(inputs["inputs"])
    code = main(argv)
    captured = capsys.readouterr()
    _assert_one_error_line(code, captured.out, captured.err, expected)
    assert digest(inputs["inputs"]) == before, "an input file changed"
    assert not new.exists(), "something was written"


@pytest.mark.slow
@pytest.mark.parametrize("case", SUBPROCESS)
def test_bad_command_line_as_a_process(case, inputs, tmp_path):
    _, template, expected = next(c for c in CASES if c[0] == case)
    argv = _argv(template, inputs, tmp_path / "new", case)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "studio", *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    _assert_one_error_line(done.returncode, done.stdout, done.stderr, expected)
