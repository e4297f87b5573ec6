"""The whole flow through the HTTP API with gradio_client, on the tiny pipeline.

Import the zoo, compress, make a dataset from a world style, train a few steps, switch adapter,
generate (mix, per image, grid): each call asserts on numbers in what comes back.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from tests.app.conftest import ZOO_SIZE

NATIVE = 16  # the tiny pipeline's native image side


def rows(table: dict) -> list[list]:
    return table["data"]


def test_endpoints_are_named(client):
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    expected = {"/import_files", "/import_folder", "/import_zoo", "/remove_adapter", "/adapter_details", "/compress",
                "/upload_dataset", "/style_dataset", "/family_defaults", "/train", "/resume_training", "/stop_training",
                "/switch_adapter", "/generate", "/gallery", "/load_base"}
    assert expected <= names


def test_import_zoo_lists_every_adapter(client):
    summary, table, _ = client.predict(api_name="/import_zoo")
    ok = [row for row in rows(table) if row[-1] == "ok"]
    assert len(ok) == ZOO_SIZE
    assert {row[0] for row in ok} == {f"style{n}" for n in range(ZOO_SIZE)}
    assert all(float(row[2]) == 4 for row in ok)  # rank
    assert f"{ZOO_SIZE} adapters" in summary


def test_details_of_one_adapter(client):
    details = client.predict("style1", api_name="/adapter_details")
    assert details["name"] == "style1" and details["rank"] == 4 and details["layers"] > 0 and details["error"] is None


def test_compress_reports_errors_and_files(client):
    status, plot, errors, files, summary = client.predict("K per layer", 2, 0.9, 0, "kohya", api_name="/compress")
    assert len(rows(errors)) == ZOO_SIZE
    rel_errors = [float(row[1]) for row in rows(errors)]
    assert all(0.0 <= e < 1.0 for e in rel_errors)
    assert summary["k_summary"]["max"] == 2 and summary["bytes_out"] < summary["bytes_in"]
    assert len(files) == ZOO_SIZE + 1 and all(Path(f).stat().st_size > 0 for f in files)
    assert "compressed" in status


def test_compress_with_energy_threshold(client):
    _, _, errors, _, summary = client.predict("energy threshold", 4, 0.999, 0, "diffusers", api_name="/compress")
    assert len(rows(errors)) == ZOO_SIZE and summary["k_summary"]["min"] >= 1


def test_train_a_few_steps_joins_the_collection(client):
    folder, preview = client.predict("noir", 8, api_name="/style_dataset")
    assert folder == "datasets/world-noir" and len(preview) == 8
    knobs, learning_rate = client.predict("lora", api_name="/family_defaults")
    assert json.loads(knobs)["rank"] == 8 and learning_rate == pytest.approx(1e-3)
    status, plot, samples, result = client.predict(
        "noir-lora", folder, "lora", knobs, 3, 1e-3, 2, "", 3, "noirish style, a red circle", 0, api_name="/train")
    assert result["status"] == "done" and result["steps"] == 3
    assert len(result["losses"]) == 3 and all(0 < v < 10 for v in result["losses"].values())
    assert result["lora"] == "noir-lora.lora.safetensors"
    assert len(samples) == 2 and "step 3" in samples[1]["caption"] and "base" in samples[0]["caption"]
    _, table, _ = client.predict(api_name="/import_zoo")
    assert "noir-lora.lora" in {row[0] for row in rows(table)}


def test_switch_and_generate(client):
    status = client.predict(["style0"], 0.8, api_name="/switch_adapter")
    assert "switched to `style0`" in status
    images, infotext, files, summary, _, history = client.predict(
        "a red circle", "", ["style0", "style1"], "1, 0.5", 1.0, "mix into one", 7, 2, None, 2, None, None, "default",
        api_name="/generate")
    assert summary["images"] == 2 and summary["sizes"] == [[NATIVE, NATIVE], [NATIVE, NATIVE]]
    assert "<lora:style0:1>" in infotext and "<lora:style1:0.5>" in infotext and "Seed: 7" in infotext
    with Image.open(files[0]) as image:
        assert image.size == (NATIVE, NATIVE) and "Seed: 7" in image.text["parameters"]
    assert len(history) >= 2


def test_per_image_and_grid(client):
    _, _, _, summary, _, _ = client.predict(
        "a blue square", "", ["none", "style2", "style2.eigen"], "", 1.0, "one adapter per image", 3, 2, None, 1, None, None, "ddim",
        api_name="/generate")
    assert summary["images"] == 3
    _, infotext, files, summary, _, _ = client.predict(
        "a blue square", "", ["none", "style2", "style2.eigen"], "", 1.0, "same-seed comparison grid", 3, 2, None, 1, None, None, "default",
        api_name="/generate")
    assert summary["images"] == 1 and "Grid: none | style2 | style2.eigen" in infotext
    width, height = summary["sizes"][0]
    assert width >= 2 * NATIVE and height > NATIVE


def test_same_seed_same_image(client):
    args = ("a green circle", "", ["style3"], "", 1.0, "mix into one", 11, 2, None, 1, None, None, "default")
    first = client.predict(*args, api_name="/generate")[2][0]
    second = client.predict(*args, api_name="/generate")[2][0]
    with Image.open(first) as a, Image.open(second) as b:
        assert a.tobytes() == b.tobytes()


def test_stop_and_resume(client):
    import time

    folder, _ = client.predict("noir", 8, api_name="/style_dataset")
    knobs, _ = client.predict("lora", api_name="/family_defaults")
    job = client.submit("stop-me", folder, "lora", knobs, 60, 1e-3, 1, "", 0, "", 0, api_name="/train")
    deadline = time.monotonic() + 60
    while not any("step" in str(o[0]) and "step 0 " not in str(o[0]) for o in job.outputs()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "stopping" in client.predict(api_name="/stop_training")
    stopped = job.result()[3]
    assert stopped["status"] == "stopped" and 0 < stopped["steps"] < 60
    resumed = client.predict("stop-me", api_name="/resume_training")[3]
    assert resumed["status"] == "done" and resumed["steps"] == 60
    assert set(map(int, resumed["losses"])) == set(range(1, 61))
