"""RELIABILITY 15 and 16 through the API: paths, names, uploads, simultaneous calls, determinism."""

from __future__ import annotations

import pickle

import pytest
from gradio_client import handle_file
from gradio_client.exceptions import AppError
from PIL import Image


@pytest.fixture(scope="module", autouse=True)
def zoo_imported(client):
    client.predict(api_name="/import_zoo")


@pytest.mark.parametrize("folder,message", [("../", "'..' is not accepted"), ("/etc", "absolute paths"), ("adapters/../../x", "'..' is not accepted")])
def test_folders_outside_the_workspace_are_refused(client, folder, message):
    with pytest.raises(AppError, match=message):
        client.predict(folder=folder, api_name="/import_folder")


@pytest.mark.parametrize("name", ["../style0", "/tmp/style0.safetensors", "style0/../../x", "C:\\x"])
def test_adapter_names_that_are_paths_are_refused(client, name):
    with pytest.raises(AppError, match="is not allowed"):
        client.predict(adapters=[name], strength=1.0, api_name="/switch_adapter")
    with pytest.raises(AppError, match="is not allowed"):
        client.predict(prompt="a red circle", adapters=[name], steps=1, api_name="/generate")


def test_bases_outside_the_workspace_are_refused(client):
    with pytest.raises(AppError, match="'..' is not accepted"):
        client.predict(kind="folder", value="../../", api_name="/load_base")
    with pytest.raises(AppError, match="offline"):
        client.predict(kind="hub", value="org/model", api_name="/load_base")


def test_dataset_folders_outside_the_workspace_are_refused(client):
    with pytest.raises(AppError, match="absolute paths"):
        client.predict(name="x", dataset="/etc", steps=1, api_name="/train")


def test_oversized_upload_is_refused(client, running_app, tmp_path):
    big = tmp_path / "big.safetensors"
    big.write_bytes(b"\0" * (running_app.studio.config.max_file_size + 1024))
    with pytest.raises(Exception):
        client.predict(files=[handle_file(str(big))], api_name="/import_files")
    assert not (running_app.studio.workspace.folder("adapters") / "big.safetensors").exists()


class _Boom:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_pickles_are_never_unpickled(client, tmp_path, capsys):
    evil = tmp_path / "evil.safetensors"  # a pickle wearing the right suffix
    evil.write_bytes(pickle.dumps(_Boom()))
    _, table, _ = client.predict(files=[handle_file(str(evil))], api_name="/import_files")
    row = next(r for r in table["data"] if r[0] == "evil")
    assert row[-1].startswith("refused:")
    assert "unpickled!" not in capsys.readouterr().out
    client.predict(name="evil", api_name="/remove_adapter")


def _generate(client, adapter: str, seed: int):
    return client.submit(prompt="a red circle", adapters=[adapter], seed=seed, steps=2, api_name="/generate")


def _pixels(job) -> bytes:
    with Image.open(job.result()[3][0]) as image:  # (status, gallery, infotext, files, ...)
        return image.tobytes()


def test_simultaneous_switch_and_generate_are_serialized(client):
    references = {name: _pixels(_generate(client, name, 5)) for name in ("style0", "style1")}
    assert references["style0"] != references["style1"]
    jobs = []
    for name in ("style0", "style1", "style0", "style1"):
        jobs.append((name, _generate(client, name, 5)))
        jobs.append((None, client.submit(adapters=["style2"], strength=1.7, api_name="/switch_adapter")))
    for name, job in jobs:
        if name is None:
            assert "switched" in job.result()
        else:
            assert _pixels(job) == references[name]


def test_png_info_reads_back(client, running_app):
    from studio.engine import read_png_parameters

    _, _, _, files, _, _ = client.predict(prompt="a red circle", adapters=["style1"], weights="0.7", seed=9, steps=2, guidance=3.5,
                                          scheduler="euler", api_name="/generate")
    params = read_png_parameters(files[0])  # files: the PNGs as written, with their info
    assert params.seed == 9 and params.steps == 2 and params.cfg_scale == 3.5 and params.adapters == [("style1", 0.7)]


def test_a_same_named_upload_never_replaces_a_file(client, running_app, tiny_zoo, tmp_path):
    """Hardening 3: a different file under a name already in the workspace is stored beside it."""
    first, second = tmp_path / "a" / "twin.safetensors", tmp_path / "b" / "twin.safetensors"
    for target, source in ((first, "style0"), (second, "style1")):
        target.parent.mkdir()
        target.write_bytes((tiny_zoo / f"{source}.safetensors").read_bytes())
    client.predict(files=[handle_file(str(first))], api_name="/import_files")
    summary, _, _ = client.predict(files=[handle_file(str(second))], api_name="/import_files")
    folder = running_app.studio.workspace.folder("adapters")
    assert (folder / "twin.safetensors").read_bytes() == first.read_bytes()
    assert (folder / "twin-1.safetensors").read_bytes() == second.read_bytes()
    assert "twin-1.safetensors" in summary
    for name in ("twin", "twin-1"):
        client.predict(name=name, api_name="/remove_adapter")


def test_a_reader_crash_is_one_refused_row_and_the_app_goes_on(client, tiny_zoo, tmp_path, monkeypatch):
    """Hardening 3: an unexpected exception inside the reader refuses that file only (one guard, in
    `studio.collection.load_collection`, which every front end reads through)."""
    import studio.collection as collection

    real = collection.load_adapter

    def crashing(path, *args, **kwargs):
        if "crasher" in str(path):
            raise IndexError("reader bug")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(collection, "load_adapter", crashing)
    crasher = tmp_path / "crasher.safetensors"
    crasher.write_bytes((tiny_zoo / "style2.safetensors").read_bytes())
    _, table, _ = client.predict(files=[handle_file(str(crasher))], api_name="/import_files")
    row = next(r for r in table["data"] if r[0] == "crasher")
    assert row[-1].startswith("refused:")
    assert "IndexError: reader bug" in client.predict(name="crasher", api_name="/adapter_details")["error"]
    summary, _, _ = client.predict(api_name="/import_zoo")  # the collection is not wedged
    assert "already in the collection" in summary
    assert "switched" in client.predict(adapters=["style1"], strength=1.0, api_name="/switch_adapter")
    client.predict(name="crasher", api_name="/remove_adapter")
