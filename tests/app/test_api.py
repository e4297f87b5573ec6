"""The whole flow through the HTTP API with gradio_client, on the tiny pipeline.

Import the zoo, compress, make a dataset from a world style, train a few steps, export the best
checkpoint, switch adapter, generate (mix, per image, grid), reuse a PNG's parameters: each call
names the form's fields and asserts on numbers in what comes back.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
from gradio_client import handle_file
from PIL import Image

from tests.app.conftest import ZOO_SIZE

NATIVE = 16  # the tiny pipeline's native image side


def rows(table: dict) -> list[list]:
    return table["data"]


def points(plot: dict) -> list[dict]:
    """A line plot's data as it reaches an API client, one dict per point."""
    data = plot.get("value", plot)
    return [dict(zip(data["columns"], row)) for row in data["data"]]


def test_endpoints_are_named(client):
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    expected = {"/import_files", "/import_folder", "/import_zoo", "/remove_adapter", "/adapter_details", "/search_collection",
                "/switch_base_for", "/compress", "/upload_dataset", "/style_dataset", "/dataset_info", "/set_repeats", "/family_defaults",
                "/train", "/resume_training", "/stop_training", "/run_info", "/export_run", "/switch_adapter", "/generate", "/interrupt",
                "/reuse_parameters", "/gallery", "/load_base"}
    assert expected <= names


def test_endpoints_take_the_forms_fields_by_name(client):
    from studio.app.forms import GenerateForm, TrainForm, field_names

    api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert [p["parameter_name"] for p in api["/generate"]["parameters"]] == field_names(GenerateForm)
    assert [p["parameter_name"] for p in api["/train"]["parameters"]] == field_names(TrainForm)


def test_import_zoo_lists_every_adapter(client):
    summary, table, _ = client.predict(api_name="/import_zoo")
    ok = [row for row in rows(table) if row[-1] == "ok"]
    assert {row[0] for row in ok} >= {f"style{n}" for n in range(ZOO_SIZE)}
    assert all(row[3] == "4" for row in ok if row[0].startswith("style"))  # rank
    assert "already in the collection" in summary


def test_search_and_details(client):
    table = client.predict(query="style1", api_name="/search_collection")
    assert [row[0] for row in rows(table)] == ["style1"]
    details = client.predict(name="style1", api_name="/adapter_details")
    assert details["name"] == "style1" and details["rank"] == 4 and details["layers"] > 0 and details["error"] is None
    assert details["metadata"]["ss_training_comment"] == "style1"


def test_compress_reports_verdict_baselines_and_one_zip(client):
    status, plot, errors, duplicates, download, summary = client.predict(size_by="k", k=2, api_name="/compress")
    assert len(rows(errors)) == ZOO_SIZE
    assert all(0.0 <= float(row[1]) < 1.0 for row in rows(errors))
    assert summary["k_summary"]["max"] == 2 and summary["bytes_out"] < summary["bytes_in"]
    assert "Verdict:" in status and summary["report"]["verdict"] in status
    k_line = [point for point in points(plot) if point["curve"].startswith("K")]
    assert k_line, "K is marked on the energy plot"
    with zipfile.ZipFile(download) as bundle:
        names = bundle.namelist()
        assert summary["collection"] in names and any(n.endswith(".report.json") for n in names)
        reconstructions = [n for n in names if n.startswith("reconstructions/")]
        assert len(reconstructions) == ZOO_SIZE and all(n.endswith(".reconstructed.safetensors") for n in reconstructions)
        from studio.formats import read_header

        target = Path(download).parent / "one.safetensors"
        target.write_bytes(bundle.read(reconstructions[0]))
        metadata = read_header(target)[1]
        assert float(metadata["studio.reconstruction_error"]) >= 0 and metadata["studio.reconstructed_from"] == summary["collection"]


def test_energy_is_the_default_dial(client):
    _, _, errors, _, _, summary = client.predict(api_name="/compress")
    assert len(rows(errors)) == ZOO_SIZE and summary["k_summary"]["min"] >= 1
    explained = summary["explained_mean"]["down"]
    assert all(b >= a - 1e-9 for a, b in zip(explained, explained[1:]))  # cumulative: never dips


def test_train_a_few_steps_joins_the_collection(client, running_app):
    folder, _, preview, _, trigger, sample_prompt = client.predict(style="noir", count=8, api_name="/style_dataset")
    assert folder == "datasets/world-noir" and len(preview) == 8
    assert trigger == "noirish style" and sample_prompt.startswith("noirish style")
    _, info, _, _, _, _ = client.predict(dataset=folder, validation_split=0.25, api_name="/dataset_info")
    assert "8 images" in info and "6 train, 2 held out for validation" in info
    status, plot, samples, result = client.predict(name="noir-lora", dataset=folder, knobs={"rank": 4, "alpha": 4}, steps=3,
                                                   batch_size=2, sample_prompt="noirish style, a red circle", api_name="/train")
    assert result["status"] == "done" and result["steps"] == 3
    assert len(result["losses"]) == 3 and all(0 < v < 10 for v in result["losses"].values())
    assert result["lora"] == "noir-lora.lora.safetensors"
    assert len(samples) == 2 and "base" in samples[0]["caption"] and "step 3" in samples[1]["caption"]
    assert "trainable numbers" in status or "done" in status
    _, table, _ = client.predict(api_name="/import_zoo")
    assert "noir-lora.lora" in {row[0] for row in rows(table)}


def test_the_run_list_and_the_best_checkpoint_export(client):
    text, plot, samples = client.predict(run="noir-lora", api_name="/run_info")
    assert "done" in text and "best validation loss" in text
    assert {point["curve"] for point in points(plot)} == {"train", "validation"}
    assert any("base (no adapter)" in s["caption"] for s in samples)
    message, exported = client.predict(run="noir-lora", checkpoint="best", api_name="/export_run")
    assert "relative error 0.00e+00" in message and Path(exported).name == "noir-lora.best.safetensors"
    details = client.predict(name="noir-lora.best", api_name="/adapter_details")
    assert details["error"] is None and details["rank"] == 4


def test_switch_and_generate(client):
    status = client.predict(adapters=["style0"], strength=0.8, api_name="/switch_adapter")
    assert "switched to `style0`" in status
    _, images, infotext, files, summary, history = client.predict(
        prompt="a red circle", adapters=["style0", "style1"], weights="1, 0.5", seed=7, steps=2, batch=2, api_name="/generate")
    assert summary["images"] == 2 and summary["sizes"] == [[NATIVE, NATIVE], [NATIVE, NATIVE]]
    assert "<lora:style0:1>" in infotext and "<lora:style1:0.5>" in infotext and "Seed: 7" in infotext
    assert [image["caption"] for image in images] == ["style0 1 + style1 0.5 (seed 7)", "style0 1 + style1 0.5 (seed 8)"]
    with Image.open(files[0]) as image:
        assert image.size == (NATIVE, NATIVE) and "Seed: 7" in image.text["parameters"]
    assert len(history) >= 2


def test_per_image_and_grid(client):
    _, images, _, _, summary, _ = client.predict(prompt="a blue square", adapters=["none", "style2", "style2.eigen"], mode="per_image",
                                                 seed=3, steps=2, scheduler="ddim", api_name="/generate")
    assert summary["images"] == 3
    assert [image["caption"].split(" (")[0] for image in images] == ["no adapter", "style2 1", "style2.eigen 1"]
    _, images, infotext, _, summary, _ = client.predict(prompt="a blue square", adapters=["none", "style2", "style2.eigen"], mode="grid",
                                                        seed=3, steps=2, api_name="/generate")
    assert summary["images"] == 1 and "Grid: none | style2 | style2.eigen" in infotext
    width, height = summary["sizes"][0]
    assert width >= 2 * NATIVE and height > NATIVE


def test_seed_minus_one_is_random_and_recorded(client):
    from studio.engine import read_png_parameters

    seeds = {read_png_parameters(client.predict(prompt="a red circle", seed=-1, steps=1, api_name="/generate")[3][0]).seed for _ in range(2)}
    assert len(seeds) == 2 and all(seed >= 0 for seed in seeds)


def test_same_seed_same_image(client):
    args = dict(prompt="a green circle", adapters=["style3"], seed=11, steps=2)
    first = client.predict(**args, api_name="/generate")[3][0]
    second = client.predict(**args, api_name="/generate")[3][0]
    with Image.open(first) as a, Image.open(second) as b:
        assert a.tobytes() == b.tobytes()


def test_reuse_parameters_from_a_png(client):
    files = client.predict(prompt="a red square", adapters=["style1"], weights="0.7", seed=9, steps=3, guidance=3.5,
                           scheduler="euler", api_name="/generate")[3]
    prompt, negative, adapters, weights, mode, seed, steps, guidance, width, height, scheduler, note = client.predict(
        handle_file(files[0]), api_name="/reuse_parameters")
    assert (prompt, adapters, weights, mode, seed, steps, guidance, scheduler) == ("a red square", ["style1"], "0.7", "mix", 9, 3, 3.5, "euler")
    assert width == height == NATIVE and "taken from the PNG" in note


def test_stop_and_resume_keep_the_history(client):
    import time

    folder = client.predict(style="noir", count=8, api_name="/style_dataset")[0]
    job = client.submit(name="stop-me", dataset=folder, knobs={"rank": 4, "alpha": 4}, steps=60, batch_size=1, api_name="/train")
    while not any("**step " in str(o[0]) and "**step 0 " not in str(o[0]) for o in job.outputs()):  # a step done: no clock
        assert not job.done(), f"the run ended before it could be stopped: {job.outputs()[-1:]}"
        time.sleep(0.1)
    assert "stopping" in client.predict(api_name="/stop_training")
    stopped = job.result()[3]
    assert stopped["status"] == "stopped" and 0 < stopped["steps"] < 60
    text, _, _ = client.predict(run="stop-me", api_name="/run_info")
    assert "stopped" in text and "can be resumed" in text
    status, plot, _, resumed = client.predict(run="stop-me", api_name="/resume_training")
    assert resumed["status"] == "done" and resumed["steps"] == 60
    assert set(map(int, resumed["losses"])) == set(range(1, 61))
    assert {p["step"] for p in points(plot) if p["curve"] == "train"} == set(range(1, 61))  # history before the stop kept
    assert "stopping" not in client.predict(api_name="/stop_training")  # nothing runs now
