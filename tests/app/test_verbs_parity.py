"""The same request through the command line and through the app's API gives the same result
(inspect, compress, generate): both build the verb's request and call the same verb."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from studio.cli import main


@pytest.fixture(scope="module", autouse=True)
def zoo_imported(client):
    client.predict(api_name="/import_zoo")


def _cli_json(capsys, *argv) -> object:
    code = main([str(a) for a in argv] + ["--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def test_inspect(client, tiny_zoo, tiny_pipeline_dir, capsys):
    details = client.predict(name="style1", api_name="/adapter_details")
    row, = _cli_json(capsys, "inspect", tiny_zoo / "style1.safetensors", "--base", tiny_pipeline_dir)
    row["file"] = row.pop("path").rsplit("/", 1)[-1]
    assert details.pop("kind") == "LoRA file"  # the app adds which kind of entry it is
    assert details == json.loads(json.dumps(row))


def test_compress(client, running_app, tiny_pipeline_dir, tmp_path, capsys):
    _, _, _, _, _, summary = client.predict(size_by="k", k=2, api_name="/compress")
    files = [entry.info.path for entry in running_app.studio.library.entries() if entry.ok and entry.source is not None
             and entry.kind != "compressed"]  # what the app compresses: every loaded file (trained ones too), no members
    report = _cli_json(capsys, "compress", *files, "-o", tmp_path / "c.safetensors", "--k", "2", "--base", tiny_pipeline_dir)
    app = {a["name"]: (a["rel_error"], a["loo_error"]) for a in summary["adapters"]}
    cli = {a["name"]: (a["rel_error"], a["loo_error"]) for a in report["adapters"]}
    assert app.keys() == cli.keys() and len(app) >= 4
    for name in app:
        assert app[name] == pytest.approx(cli[name], rel=1e-5, abs=1e-7), name
    assert summary["report"]["verdict"] == report["report"]["verdict"] and summary["warnings"] == report["warnings"]


def test_generate(client, tiny_zoo, tiny_pipeline_dir, tmp_path, capsys):
    _, _, infotext, files, _, _ = client.predict(prompt="a red circle", adapters=["style0"], seed=7, steps=2, api_name="/generate")
    out = tmp_path / "cli.png"
    result = _cli_json(capsys, "generate", "--base", tiny_pipeline_dir, "--prompt", "a red circle", "--adapter",
                       tiny_zoo / "style0.safetensors", "--seed", "7", "--steps", "2", "--device", "cpu", "--dtype", "float32", "-o", out)
    assert result["infotexts"] == [infotext]
    with Image.open(files[0]) as app_image, Image.open(out) as cli_image:
        assert app_image.tobytes() == cli_image.tobytes()
