"""Each verb through its request type and through the command line: the same request, the same result.

The tiny pipeline is the base; its LoRAs and collection come from tests/verbs/conftest.py.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import MISSING
import subprocess
import sys
from pathlib import Path

import pytest

from studio.cli import main
from studio.errors import LimitError, StudioError
from studio.events import Message, Progress, run_to_end
from studio.options import default_of, help_of
from studio.verbs import VERBS
from studio.verbs import compress, dataset, export, generate, inspect, project, similar
from tests.verbs.conftest import ZOO

REPO = Path(__file__).resolve().parents[2]


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def cli_json(capsys, *argv: str):
    code, out, err = cli(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


# ---------------------------------------------------------------- the table itself


def test_every_verb_has_a_request_check_and_run_with_help_on_every_field():
    for name, verb in VERBS.items():
        assert callable(verb.run) and callable(verb.check) and verb.summary, name
        if verb.request is None:
            continue
        for item in dataclasses.fields(verb.request):
            assert help_of(item), f"{name}.{item.name} has no help text"


def test_help_imports_neither_torch_nor_diffusers():
    script = (
        "import contextlib, io, sys\n"
        "from studio.cli import main\n"
        "from studio.verbs import VERBS\n"
        "for argv in [['--help']] + [[n, '--help'] for n, v in VERBS.items() if v.cli]:\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        try:\n"
        "            main(argv)\n"
        "        except SystemExit as done:\n"
        "            assert done.code == 0, argv\n"
        "print('torch' in sys.modules, 'diffusers' in sys.modules, 'gradio' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False", "False"]


def test_help_shows_bounds_defaults_and_choices(capsys):
    with pytest.raises(SystemExit):
        main(["compress", "--help"])
    text = capsys.readouterr().out
    assert "components per layer (1 <= value <= 4096)" in text and "{float64,float32}" in text and "--export-dir DIR" in text


def test_interrupt_exits_130_and_a_bug_keeps_its_traceback(monkeypatch, capsys, zoo):
    def interrupted(request):
        raise KeyboardInterrupt

    monkeypatch.setattr(inspect, "run", interrupted)
    assert main(["inspect", str(zoo)]) == 130

    def bug(request):
        raise RuntimeError("a bug")

    monkeypatch.setattr(inspect, "run", bug)
    with pytest.raises(RuntimeError):
        main(["inspect", str(zoo)])


# ---------------------------------------------------------------- inspect, export


def test_inspect_request_and_cli_agree(zoo, tiny_pipeline_dir, capsys):
    result = inspect.run(inspect.InspectRequest([str(zoo)], base=str(tiny_pipeline_dir)))
    assert [i.name for i in result.infos] == [f"style{n}" for n in range(ZOO)] and result.exit_code == 0
    assert cli_json(capsys, "inspect", zoo, "--base", tiny_pipeline_dir) == json.loads(json.dumps(result.as_json(), default=str))
    code, out, _ = cli(capsys, "inspect", zoo / "style1.safetensors", "--base", tiny_pipeline_dir)
    assert code == 0 and "style1" in out and "kohya" in out


def test_inspect_of_only_broken_files_exits_1(tmp_path, capsys):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    code, out, err = cli(capsys, "inspect", broken)
    assert code == 1 and "ERROR" in out and err == ""


@pytest.mark.parametrize("layout,key", [("kohya", "lora_unet_"), ("diffusers", "unet.")])
def test_export_layouts(zoo, tiny_pipeline_dir, tmp_path, capsys, layout, key):
    from safetensors import safe_open

    out = tmp_path / f"{layout}.safetensors"
    code, stdout, err = cli(capsys, "export", zoo / "style0.safetensors", "--base", tiny_pipeline_dir, "--format", layout, "-o", out)
    assert code == 0 and f"wrote {out} ({layout}" in stdout and "warning" not in err
    with safe_open(str(out), "pt") as handle:
        assert all(name.startswith(key) for name in handle.keys())


def test_export_of_a_member_warns_with_its_error(collection, tmp_path, capsys):
    out = tmp_path / "member.safetensors"
    code, stdout, err = cli(capsys, "export", f"{collection}#style1", "-o", out)
    assert code == 0 and out.is_file()
    warning, = [line for line in err.splitlines() if line.startswith("warning:")]
    stored = export.run(export.ExportRequest(str(collection), str(tmp_path / "again.safetensors"), adapter="style1")).error
    assert "style1" in warning and f"{stored:.2%}" in warning and stored > export.FAITHFUL


# ---------------------------------------------------------------- compress, project, similar


def test_compress_cli_prints_the_report_and_warns(zoo, tiny_pipeline_dir, tmp_path, capsys):
    out = tmp_path / "c.safetensors"
    code, stdout, err = cli(capsys, "compress", zoo, "-o", out, "--k", "2", "--base", tiny_pipeline_dir, "--export-dir", tmp_path / "x")
    assert code == 0
    assert "statistics" in err and "projection" in err and f"{ZOO}/{ZOO}" in err  # a bar per pass
    assert "LOO" in stdout and "SVD same bytes" in stdout and "verdict: " in stdout and f"wrote {out}" in stdout
    assert any(line.startswith("warning: ") and "above 1%" in line for line in err.splitlines())  # K=2 of rank-4 random LoRAs
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == [f"style{n}.safetensors" for n in range(ZOO)]


def test_compress_json_is_the_verbs_result(zoo, tiny_pipeline_dir, collection, tmp_path, capsys):
    report = cli_json(capsys, "compress", zoo, "-o", tmp_path / "c.safetensors", "--k", "2", "--base", tiny_pipeline_dir)
    outcome = run_to_end(compress.run(compress.CompressRequest([str(zoo)], str(tmp_path / "d.safetensors"), k=2, base=str(tiny_pipeline_dir))))
    assert [a["rel_error"] for a in report["adapters"]] == pytest.approx([a.rel_error for a in outcome.result.adapters], abs=1e-6)
    assert report["report"]["verdict"] == outcome.result.report.verdict and report["warnings"] == outcome.warnings
    assert report["k_summary"]["max"] == 2


def test_compress_warns_on_no_shared_structure():
    """The warnings read the report: a poor leave-one-out and a 'no shared structure' verdict."""
    from studio.subspace.report import AdapterQuality, build_report
    from studio.subspace.stream import AdapterReport

    qualities = [AdapterQuality(f"a{i}", 0.005, 0.99, 0.98, 0.99, 0.3, 1.0) for i in range(4)]
    report = build_report(qualities, [], True, "", True)
    result = type("Result", (), {"adapters": [AdapterReport(q.name, 0.005, 1, 1, loo_error=0.99) for q in qualities], "report": report})
    warnings = compress.quality_warnings(result)
    assert len(warnings) == 2 and "leave-one-out error 0.99" in warnings[0] and "no shared structure" in warnings[1]


def test_project_and_similar(zoo, collection, tiny_pipeline_dir, capsys):
    member = zoo / "style0.safetensors"
    projected = cli_json(capsys, "project", collection, member, "--base", tiny_pipeline_dir)
    direct = project.run(project.ProjectRequest(str(collection), str(member), base=str(tiny_pipeline_dir)))
    assert projected["rel_error"] == pytest.approx(direct.result.rel_error) and 0 < projected["rel_error"] < 1
    rows = cli_json(capsys, "similar", member, zoo, "--base", tiny_pipeline_dir)["rows"]
    assert rows[0]["name"] == "style0" and rows[0]["cosine"] == pytest.approx(1.0) and len(rows) == ZOO
    stored = similar.run(similar.SimilarRequest(str(member), [str(collection)], top=1, base=str(tiny_pipeline_dir)))
    assert [row.name for row in stored.rows] == ["style0"] and stored.rows[0].reconstruction_error is not None


# ---------------------------------------------------------------- dataset


def test_dataset_writes_pairs_and_replaces_only_its_own(tmp_path, capsys):
    target = tmp_path / "noir"
    code, out, _ = cli(capsys, "dataset", "--style", "noir", "-o", target, "--count", "3", "--size", "32")
    assert code == 0 and "wrote 3 images" in out
    assert len(list(target.glob("*.png"))) == 3 and len(list(target.glob("*.txt"))) == 3
    assert (target / "noir-0000.txt").read_text().startswith("noirish")
    again = dataset.run(dataset.DatasetRequest("noir", str(target), count=2, size=32))  # its own folder: replaced
    assert len(again.images) == 2 and not list(tmp_path.glob(".noir.*"))


# ---------------------------------------------------------------- generate


def test_generate_writes_pngs_with_parameters(tiny, tmp_path, capsys):
    from studio.engine import read_png_parameters

    out = tmp_path / "out.png"
    code, stdout, _ = cli(capsys, "generate", "--base", tiny, "--prompt", "a red circle", "--seed", "4", "--steps", "3",
                          "--scheduler", "euler", "--device", "cpu", "-o", out)
    assert code == 0 and stdout.strip() == str(out)
    params = read_png_parameters(out)
    assert (params.prompt, params.seed, params.steps, params.sampler) == ("a red circle", 4, 3, "Euler")


def test_generate_per_image_and_grid(tiny, zoo, tmp_path, capsys):
    from studio.engine import read_png_parameters

    style = zoo / "style0.safetensors"
    code, _, err = cli(capsys, "generate", "--base", tiny, "--prompt", "x", "--steps", "2", "--device", "cpu", "--per-image",
                       "--adapter", f"{style}:0.7", "--adapter", "none", "-o", tmp_path / "each.png")
    assert code == 0, err
    first, second = read_png_parameters(tmp_path / "each-0.png"), read_png_parameters(tmp_path / "each-1.png")
    assert first.adapters == [("style0", 0.7)] and second.adapters == [] and (first.seed, second.seed) == (0, 1)
    code, _, _ = cli(capsys, "generate", "--base", tiny, "--prompt", "x", "--steps", "2", "--device", "cpu", "--grid",
                     "--adapter", "none", "--adapter", style, "-o", tmp_path / "grid.png")
    assert code == 0 and read_png_parameters(tmp_path / "grid.png").extra["Grid"] == "none | style0"


def test_generate_limits_are_flags_and_refuse_before_loading(tiny, tmp_path, capsys, monkeypatch):
    import studio.engine

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(studio.engine, "get_engine", no_loading)
    code, _, err = cli(capsys, "generate", "--base", tiny, "--prompt", "x", "--steps", "3", "--max-steps", "2", "-o", tmp_path / "a.png")
    assert code == 2 and "steps = 3: above the cap of 2" in err


def test_generate_refuses_what_the_memory_estimate_says_does_not_fit(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(generate, "free_memory", lambda device: 1024)
    request = generate.GenerateRequest("x", base=tiny, steps=2, device="cpu", dtype="float32", output=str(tmp_path / "a.png"))
    with pytest.raises(LimitError, match="has 0.0 MiB free"):  # 1 KiB
        generate.run(request)
    assert not (tmp_path / "a.png").exists()
    with pytest.raises(LimitError, match="limits.max_seconds"):
        generate.run(dataclasses.replace(request, limits=generate.Limits(check_memory=False, max_seconds=1e-12)))
    checked = generate.run(dataclasses.replace(request, limits=generate.Limits(check_memory=False)))
    assert checked.paths == [tmp_path / "a.png"] and checked.estimate is None


def test_the_engine_takes_the_verbs_request():
    from studio.engine import GenerateRequest

    assert GenerateRequest is generate.GenerateRequest


# ---------------------------------------------------------------- requests from tables


REQUEST_TABLES = [
    ("inspect", {"paths": ["a.safetensors"]}, {"base": None}),
    ("export", {"input": "a.safetensors", "output": "b.safetensors", "tool": "comfyui"}, {"format": "kohya", "tool": "comfyui"}),
    ("compress", {"paths": ["zoo"], "output": "c.safetensors", "energy": 0.9}, {"k": None, "augment": 0}),
    ("project", {"collection": "c.safetensors", "adapter": "a.safetensors"}, {"base": None}),
    ("similar", {"query": "a.safetensors", "against": ["c.safetensors"]}, {"top": 20}),
    ("dataset", {"style": "noir", "output": "d"}, {"count": 16, "size": 64}),
    ("generate", {"prompt": "x", "output": "g.png", "limits": {"max_steps": 10}}, {"steps": 25}),
    ("train", {"config": "t.toml", "steps": 5}, {"overrides": {"steps": 5}}),
    ("run", {"recipe": "r.toml"}, {}),
    ("serve", {"port": 7861}, {"host": "127.0.0.1"}),
    ("benchmark", {"script": "b.py"}, {"args": []}),
]


@pytest.mark.parametrize("name,table,expected", REQUEST_TABLES, ids=[r[0] for r in REQUEST_TABLES])
def test_recipe_tables_build_the_same_requests(name, table, expected):
    verb = VERBS[name]
    request = verb.request_from(table, f"[{name}]")
    for key, value in expected.items():
        assert getattr(request, key) == value
    if name == "generate":
        assert request.limits.max_steps == 10 and request.limits.max_batch == default_of(
            next(f for f in dataclasses.fields(generate.Limits) if f.name == "max_batch"))
    with pytest.raises(StudioError, match="unknown keys"):
        verb.request_from({**table, "no_such_field": 1}, f"[{name}]")


def test_required_fields_are_named_when_missing():
    for name, verb in VERBS.items():
        if verb.request is None:
            continue
        required = [f.name for f in dataclasses.fields(verb.request) if default_of(f) is MISSING]
        if required:
            with pytest.raises(StudioError, match="missing required keys"):
                verb.request_from({}, name)


def test_compress_events_are_progress_then_done(zoo, tiny_pipeline_dir, tmp_path):
    events = list(compress.run(compress.CompressRequest([str(zoo)], str(tmp_path / "c.safetensors"), k=1, base=str(tiny_pipeline_dir))))
    stages = {e.stage for e in events if isinstance(e, Progress)}
    assert stages == {"statistics", "projection"} and type(events[-1]).__name__ == "Done"
    assert not any(isinstance(e, Message) and e.level == "error" for e in events)


@pytest.mark.slow
def test_compress_under_torchrun_shards_and_prints_once(zoo, tiny_pipeline_dir, tmp_path, capsys):
    """`torchrun -m studio.cli compress`: the verb joins the process group (gloo), rank 0 writes and prints."""
    import os

    from tests.ports import free_port

    alone = cli_json(capsys, "compress", zoo, "-o", tmp_path / "one.safetensors", "--k", "2", "--base", tiny_pipeline_dir)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "-m", "studio.cli", "compress", str(zoo), "-o", str(tmp_path / "two.safetensors"),
               "--k", "2", "--base", str(tiny_pipeline_dir), "--json"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    together = json.loads(done.stdout)  # one JSON document: only rank 0 printed
    assert [a["rel_error"] for a in together["adapters"]] == pytest.approx([a["rel_error"] for a in alone["adapters"]], rel=1e-4)


def test_every_verb_result_declares_how_it_renders():
    """Results declare JSON, text and exit code (studio.verbs.result.VerbResult), no probing with hasattr."""
    import inspect as pyinspect

    from studio.verbs import VERBS
    from studio.verbs.result import VerbResult

    rendered = [cls for verb in VERBS.values() for _, cls in pyinspect.getmembers(verb.module, pyinspect.isclass)
                if cls.__module__ == verb.module.__name__ and "as_text" in vars(cls)]
    assert len(rendered) >= 10
    assert all(issubclass(cls, VerbResult) for cls in rendered), [c.__name__ for c in rendered if not issubclass(c, VerbResult)]
    with pytest.raises(TypeError):
        type("Half", (VerbResult,), {"as_text": lambda self: ""})()  # as_json missing: refused at construction
