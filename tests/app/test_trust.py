"""What a kohya_ss / A1111 user must be able to trust (issue 18), without a browser.

Through the services (a `Studio` on a workspace of this module's own) and through the HTTP API
(gradio_client, the session's server): a restart finds everything again; the app imports the
files it wrote itself and says what they are; a long generation stops on Interrupt and the
server answers the next request; a huge width and a huge rank are refused with a message that
names the field and the limit before any work starts; a kohya zip keeps its repeat folders.
The browser versions are in test_browser_trust.py.
"""

from __future__ import annotations

import io
import shutil
import time
import zipfile
from pathlib import Path

import pytest
from gradio_client import handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from studio.app.forms import CompressForm, StyleForm, TrainForm
from studio.app.services import AppConfig, Studio
from studio.app.views import collection_table
from studio.errors import LimitError

RUN = "trust-run"


def make_studio(base: str | None, workspace: Path, zoo: Path) -> Studio:
    """A studio as `studio serve` makes one (base None: the one the workspace used last)."""
    studio = Studio(AppConfig(base=base, workspace=workspace, zoo=zoo, device="cpu", dtype="float32"))
    studio.start()
    return studio


def rows_of(studio: Studio) -> dict[str, dict]:
    """The collection table as the Collection tab shows it, by name."""
    table = collection_table(studio.library.entries())
    return {row["name"]: row for row in table.to_dict("records")}


def png_bytes(colour: str, side: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), colour).save(buffer, format="PNG")
    return buffer.getvalue()


COLOURS = ["red", "green", "blue", "white", "black", "yellow", "purple", "orange"]


def kohya_zip(path: Path, characters: int = 3, styles: int = 2) -> Path:
    """A kohya_ss dataset: ``5_mychar/`` and ``2_inkstyle/`` folders of tiny PNGs, captions beside (starting with the folder's word)."""
    members = {}
    for i, colour in enumerate(COLOURS[:characters]):
        members[f"train/5_mychar/c{i}.png"] = png_bytes(colour)
        members[f"train/5_mychar/c{i}.txt"] = f"mychar, a {colour} square".encode()
    for i, colour in enumerate(COLOURS[3:3 + styles]):
        members[f"train/2_inkstyle/s{i}.png"] = png_bytes(colour)
        members[f"train/2_inkstyle/s{i}.txt"] = f"inkstyle, a {colour} circle".encode()
    with zipfile.ZipFile(path, "w") as bundle:
        for name, data in members.items():
            bundle.writestr(name, data)
    return path


# ---------------------------------------------------------------- a used workspace, restarted


@pytest.fixture(scope="module")
def pipeline(tiny_pipeline_dir, tmp_path_factory) -> Path:
    """A copy of the tiny pipeline: a base (so an engine) of this module's own, so that the
    studios made here never re-register names in the session server's engine."""
    return Path(shutil.copytree(tiny_pipeline_dir, tmp_path_factory.mktemp("trust-base") / "pipeline"))


@pytest.fixture(scope="module")
def used(pipeline, tiny_zoo, tmp_path_factory) -> Studio:
    """A workspace as a user leaves it: the zoo and one uploaded LoRA, a compress, a world-style
    dataset, a 3-step training run."""
    workspace = tmp_path_factory.mktemp("trust-workspace")
    studio = make_studio(str(pipeline), workspace, tiny_zoo)
    upload = tmp_path_factory.mktemp("upload") / "mine.safetensors"
    shutil.copyfile(tiny_zoo / "style0.safetensors", upload)
    assert "mine.safetensors: LoRA file `mine`" in studio.import_files([upload]).lines[-1]
    for _ in studio.compress(CompressForm(size_by="k", k=2)):
        pass
    dataset = studio.training.style_dataset(StyleForm("noir", 8))
    events = list(studio.training.train(TrainForm(name=RUN, dataset=dataset, knobs={"rank": 4, "alpha": 4}, steps=3, batch_size=2)))
    assert events[-1].result.status == "done" and events[-1].result.steps == 3
    return studio


@pytest.fixture(scope="module")
def restarted(used, tiny_zoo) -> Studio:
    """A new studio on the same workspace, started without naming a base (as after a reboot)."""
    return make_studio(None, used.workspace.root, tiny_zoo)


def test_a_restart_finds_everything_again(used, restarted, pipeline):
    assert restarted.base == used.base == str(pipeline)  # the active base, from state.json
    assert restarted.base_form().kind == "folder"  # the Base picker shows it (a folder outside the workspace: no path)
    assert restarted.engine is not None and restarted.base_error is None
    before, after = rows_of(used), rows_of(restarted)
    assert after == before
    assert after["mine"]["kind"] == "LoRA file" and after[f"{RUN}.lora"]["kind"] == "trained (lora)"
    assert {f"style{n}.eigen" for n in range(4)} | {"mine.eigen"} <= {n for n, r in after.items() if r["kind"] == "compressed"}
    assert all(row["status"].startswith("ok") for row in after.values())
    assert restarted.compressed == used.compressed and restarted.compressed["k_summary"]["max"] == 2  # the Subspace tab's report
    assert restarted.training.datasets() == ["datasets/world-noir"]
    runs = restarted.training.runs()
    assert [(r.name, r.status, r.steps_done) for r in runs] == [(RUN, "done", 3)]
    view = restarted.training.run(RUN)
    assert sorted(view.losses) == [1, 2, 3] and view.samples  # the loss history and samples too
    assert "restored 6 adapter files and 1 compressed collections" in restarted.notes[-1]


def test_the_restored_adapters_generate(restarted):
    from studio.app.forms import GenerateForm

    done = restarted.generation.generate(GenerateForm(prompt="a red circle", adapters=[f"{RUN}.lora", "style1.eigen"], steps=1, seed=3))
    assert len(done.paths) == 1 and done.paths[0].is_file()
    assert done.labels == [f"{RUN}.lora 1 + style1.eigen 1 (seed 3)"]


def test_a_restart_leaves_out_what_was_deleted_and_says_so(used, tiny_zoo, tmp_path):
    workspace = tmp_path / "copy"
    shutil.copytree(used.workspace.root, workspace, ignore=shutil.ignore_patterns("cache"))
    (workspace / "adapters" / "mine.safetensors").unlink()
    studio = make_studio(None, workspace, tiny_zoo)
    assert "mine" not in rows_of(studio) and f"{RUN}.lora" in rows_of(studio)
    assert any("adapters/mine.safetensors: no longer in the workspace; left out" in note for note in studio.notes)


# ---------------------------------------------------------------- the app's own files, imported


def uploaded(source: Path, folder: Path, name: str | None = None) -> Path:
    """What a browser upload gives the server: a copy of the file in a temporary folder."""
    folder.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copyfile(source, folder / (name or source.name)))


def test_the_native_trained_file_and_its_best_checkpoint_import(restarted, tmp_path):
    run = restarted.workspace.folder("runs") / RUN
    final = restarted.import_files([uploaded(run / "adapter.safetensors", tmp_path / "a")]).lines
    best = restarted.import_files([uploaded(run / "best" / "adapter.safetensors", tmp_path / "b")]).lines
    assert final[-1].startswith(f"adapter.safetensors: trained (lora) `{RUN}` (studio, rank 4")
    assert "studio-trained lora adapter (done after 3 steps), read as a LoRA exactly" in final[-1]
    assert "stored as adapter-1.safetensors" in best[0]  # a different file of that name: never replaced
    assert f"trained (lora) `{RUN}-best`" in best[-1] and "best checkpoint: step" in best[-1]
    rows = rows_of(restarted)
    assert rows[RUN]["kind"] == rows[f"{RUN}-best"]["kind"] == "trained (lora)"
    assert rows[RUN]["status"] == rows[f"{RUN}-best"]["status"] == "ok"
    assert restarted.entry(RUN).info.rank == 4 and RUN in restarted.names()


def test_the_best_export_imports(restarted):
    from studio.app.forms import ExportRunForm

    path, result = restarted.training.export_run(ExportRunForm(RUN, "best", "kohya"))
    assert path.name == f"{RUN}.best.safetensors" and result.error == 0.0
    rows = rows_of(restarted)
    assert rows[f"{RUN}.best"]["kind"] == "trained (lora)" and rows[f"{RUN}.best"]["status"] == "ok"


def test_a_compressed_collection_imports_as_its_members(restarted, tmp_path):
    collection = restarted.workspace.folder("compressed") / "collection.safetensors"
    same = restarted.import_files([uploaded(collection, tmp_path)]).lines
    assert "collection.safetensors is already in the workspace (same bytes); not copied again" in same[0]
    assert "collection.safetensors: a compressed collection of 5 adapters; in Generate as style0.eigen" in same[-1]
    other = restarted.import_files([uploaded(collection, tmp_path / "o", "older.safetensors")]).lines
    assert other[-1].startswith("older.safetensors: a compressed collection of 5 adapters; in Generate as style0.older")
    rows = rows_of(restarted)
    assert rows["style1.older"]["kind"] == rows["style1.eigen"]["kind"] == "compressed"
    details = restarted.entry("style1.older").info
    assert details.format == "EigenLoRAx member of older.safetensors" and "relative error" in details.notes[0]


def test_a_reconstruction_from_the_zip_imports_and_says_it_is_one(restarted, tmp_path):
    bundle = restarted.workspace.folder("compressed") / restarted.compressed["zip"]
    with zipfile.ZipFile(bundle) as archive:
        member = "reconstructions/style2.reconstructed.safetensors"
        (tmp_path / "style2.reconstructed.safetensors").write_bytes(archive.read(member))
    line = restarted.import_files([tmp_path / "style2.reconstructed.safetensors"]).lines[-1]
    error = next(a["rel_error"] for a in restarted.compressed["adapters"] if a["name"] == "style2")
    assert line.startswith("style2.reconstructed.safetensors: reconstruction `style2.reconstructed` (kohya, rank ")
    assert f"reconstructed from the compressed collection collection.safetensors (relative error {error:.2%})" in line
    row = rows_of(restarted)["style2.reconstructed"]
    assert row["kind"] == "reconstruction"
    assert row["status"] == ("ok (warning)" if error > 0.01 else "ok")  # above 1%: a warning, never silent
    assert error > 0.01 and line.count("⚠") == 1  # K = 2 of rank 4: far from exact, so it warns


def test_a_resumed_run_replaces_its_stopped_lora_in_the_collection(restarted):
    """A stopped run exports its LoRA (it joins the collection); the resume rewrites that file,
    and the collection must then hold the final weights, not the stopped ones."""
    import torch

    from studio.app.library import read_file
    from studio.events import Done, Progress

    training = restarted.training
    form = TrainForm(name="resumed", dataset="datasets/world-noir", knobs={"rank": 4, "alpha": 4}, steps=6, batch_size=1)
    for event in training.train(form):
        if isinstance(event, Progress) and event.step >= 1:
            training.stop()  # a step done: stop (no clock)
    assert isinstance(event, Done) and event.result.status == "stopped" and event.result.steps < 6
    stopped = restarted.entry("resumed.lora").adapter
    *_, done = training.resume("resumed")
    assert done.result.status == "done" and done.result.steps == 6
    entry = restarted.entry("resumed.lora")
    on_disk = read_file(entry.source, restarted.tree_base()).adapter
    assert entry.adapter is not stopped and restarted.library.usable()["resumed.lora"] is entry.adapter  # what the engine gets
    for layer, factors in on_disk.lora_layers.items():
        assert torch.equal(entry.adapter.lora_layers[layer].up, factors.up) and torch.equal(entry.adapter.lora_layers[layer].down, factors.down)


# ---------------------------------------------------------------- limits: refused before any work


def test_a_rank_over_the_memory_estimate_is_refused_before_any_work(restarted, monkeypatch):
    monkeypatch.setattr("studio.verbs.generate.free_memory", lambda device: 1 << 20)  # a device with 1 MiB free
    form = TrainForm(name="too-big", dataset="datasets/world-noir", knobs={"rank": 1024}, steps=3)
    with pytest.raises(LimitError, match=r"trainable numbers: about [0-9.]+ MiB .* has 1.0 MiB free: lower the rank") as caught:
        list(restarted.training.train(form))
    assert "rank" in str(caught.value) and "1024" in str(caught.value)
    assert not (restarted.workspace.folder("runs") / "too-big").exists()


# ---------------------------------------------------------------- through the HTTP API


def pngs(running_app) -> set[Path]:
    return set(running_app.studio.workspace.folder("outputs").glob("*.png"))


@pytest.mark.parametrize("size,message", [
    (dict(width=100000), r"generate: width = 100000: above the cap of 8192 px \(limits.max_side\)"),
    (dict(height=100000), r"generate: height = 100000: above the cap of 8192 px \(limits.max_side\)"),
    (dict(width=8192, height=8192), r"generate: 8192x8192 = 67.1 MP: above the cap of 4.2 MP \(limits.max_pixels\)"),
])
def test_a_huge_image_is_refused_before_any_work(client, running_app, size, message):
    before = pngs(running_app)
    with pytest.raises(AppError, match=message):
        client.predict(prompt="a red circle", steps=200, **size, api_name="/generate")
    assert pngs(running_app) == before
    assert "1 image(s)" in client.predict(prompt="a red circle", steps=1, api_name="/generate")[0]  # and the server is not stuck


@pytest.fixture(scope="module")
def kohya(client, tmp_path_factory):
    """The kohya zip uploaded through /upload_dataset (what the Train tab's upload calls)."""
    archive = kohya_zip(tmp_path_factory.mktemp("kohya") / "mychar.zip")
    return client.predict(archive=handle_file(str(archive)), name="kohya-trust", api_name="/upload_dataset")


def test_a_huge_rank_is_refused_before_any_work(client, running_app, kohya):
    with pytest.raises(AppError, match=r"\[adapter\] family 'lora': rank = 100000: must be <= 1024"):
        client.predict(name="huge-rank", dataset=kohya[0], knobs={"rank": 100000}, steps=3, api_name="/train")
    assert not (running_app.studio.workspace.folder("runs") / "huge-rank").exists()


def test_a_kohya_zip_keeps_its_repeats_and_trigger_words(client, running_app, kohya):
    folder, info, preview, repeat_folder, trigger, sample_prompt = kohya
    assert folder == "datasets/kohya-trust"
    root = running_app.studio.workspace.root / folder
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["2_inkstyle", "5_mychar"]
    assert "**5 images**" in info
    assert "5_mychar: 5 repeats, trigger word `mychar`" in info and "2_inkstyle: 2 repeats, trigger word `inkstyle`" in info
    assert trigger == ""  # two folders, two words: none is put before every caption (the captions carry them)
    captions = sorted(item["caption"] for item in preview)
    assert captions == ["inkstyle, a black circle (x2)", "inkstyle, a white circle (x2)", "mychar, a blue square (x5)",
                        "mychar, a green square (x5)", "mychar, a red square (x5)"]
    assert sample_prompt in [c.rsplit(" (x", 1)[0] for c in captions]
    assert [value for _, value in repeat_folder["choices"]] == ["2_inkstyle", "5_mychar"]  # the Set repeats picker
    _, info, *_ = client.predict(dataset=folder, validation_split=0.4, api_name="/dataset_info")
    assert "3 train, 2 held out for validation (split 0.4)" in info
    _, info, *_ = client.predict(dataset=folder, validation_split=0.0, api_name="/dataset_info")
    assert "all 5 train" in info


def test_set_repeats_renames_the_kohya_folder(client, running_app, kohya):
    folder = kohya[0]
    _, info, preview, *_ = client.predict(dataset=folder, folder="2_inkstyle", repeats=7, api_name="/set_repeats")
    assert "2_inkstyle" not in info and "7_inkstyle: 7 repeats, trigger word `inkstyle`" in info
    assert "5_mychar: 5 repeats" in info
    assert sum(item["caption"].endswith("(x7)") for item in preview) == 2
    root = running_app.studio.workspace.root / folder
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["5_mychar", "7_inkstyle"]
    with pytest.raises(AppError, match="is not a kohya N_name folder"):
        client.predict(dataset=folder, folder="2_inkstyle", repeats=3, api_name="/set_repeats")  # gone: named, nothing moved


def test_a_dataset_picker_closed_without_a_choice_is_a_hint_not_an_error(client):
    folder, info, preview, *_ = client.predict(dataset="", api_name="/dataset_info")
    assert folder == "" and info.startswith("Pick a dataset folder") and preview == []


def test_interrupt_a_long_generation_and_generate_again(client, running_app):
    before = pngs(running_app)
    job = client.submit(prompt="a red circle", steps=200, width=64, height=64, api_name="/generate")
    while not any(str(output[0]).startswith("denoising: step") for output in job.outputs()):  # a step done: no clock
        assert not job.done(), f"the generation ended before it could be interrupted: {job.outputs()[-1:]}"
        time.sleep(0.05)
    assert client.predict(api_name="/interrupt") == "interrupting at the next denoising step ..."
    status, _, _, _, summary, _ = job.result()
    assert status.startswith("**Interrupted** at step ") and "nothing was saved" in status
    assert summary["interrupted"] is True and 0 < summary["step"] < summary["total"] == 200
    assert pngs(running_app) == before
    status, images, *_ = client.predict(prompt="a red circle", steps=2, api_name="/generate")
    assert status.startswith("1 image(s)") and len(images) == 1
