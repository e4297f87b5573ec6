"""The studio reads back what its training writes: native adapter files of every family, run folders."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from studio.errors import ConfigError, FormatError
from studio.events import run_to_end
from studio.train import train
from studio.train.native import load_native, native_to_lora
from studio.train.runs import list_runs, loss_history, run_info
from tests.train.helpers import FAMILIES, family_of, tiny_config


@pytest.mark.parametrize("case", FAMILIES)
def test_native_file_rebuilds_the_trained_adapter_exactly(case, tiny_pipeline_dir, style_data, tmp_path, family_cases):
    knobs, lr = family_cases[case]
    config = tiny_config(tiny_pipeline_dir, style_data, tmp_path / "run", family_of(case), adapter=knobs, steps=3,
                         learning_rate=lr, export_format="kohya")
    result = run_to_end(train(config))
    native = load_native(result.adapter_path)
    assert native.family == family_of(case) and native.base == str(tiny_pipeline_dir)
    trained = load_file(str(result.adapter_path))
    rebuilt = {name: p for name, p in native.adapter.named_parameters() if name in trained}
    assert set(rebuilt) == set(trained) and all(torch.equal(rebuilt[k], trained[k]) for k in trained)
    export = native_to_lora(result.adapter_path)
    for layer in native.adapter.layers():
        expected = native.adapter.delta(layer).float()
        error = float((export.adapter.delta(layer).float() - expected).norm() / expected.norm().clamp(min=1e-12))
        assert error <= export.layer_errors[layer] + 1e-4 and error <= 0.01 + 1e-4, (layer, error)  # the 1% export target
    if export.exact:
        assert export.relative_error == 0.0


def test_run_folders_list_status_best_and_history(tiny_pipeline_dir, style_data, tmp_path):
    config = tiny_config(tiny_pipeline_dir, style_data, tmp_path / "runs" / "a", steps=4, validation_every=2)
    run_to_end(train(config))
    (tmp_path / "runs" / "not-a-run").mkdir()
    runs = list_runs(tmp_path / "runs")
    assert [r.name for r in runs] == ["a"]
    info = runs[0]
    assert info.status == "done" and info.steps_done == 4 and info.steps_total == 4 and not info.resumable
    assert info.best_step in (2, 4) and info.best_path is not None and info.best_path.exists()
    history = loss_history(info.folder)
    assert sorted(history["loss"]) == [1, 2, 3, 4] and sorted(history["val_loss"]) == [0, 2, 4]
    with pytest.raises(ConfigError, match="not a training run"):
        run_info(tmp_path / "runs" / "not-a-run")


def test_a_file_that_is_not_native_is_refused_by_name(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(path), metadata={"format": "pt"})
    with pytest.raises(FormatError, match="not a studio-trained adapter file"):
        load_native(path)


def test_the_readers_take_the_studios_own_files(tiny_pipeline_dir, style_data, tmp_path, family_cases):
    """`studio inspect` / `load_adapter` read a run's native file and its best checkpoint as LoRAs, and
    report a compressed collection as what it is (the app's importers refused both before)."""
    from studio.collection import load_collection
    from studio.formats import load_adapter

    config = tiny_config(tiny_pipeline_dir, style_data, tmp_path / "run", steps=4, validation_every=2)
    result = run_to_end(train(config))
    lora = load_adapter(result.adapter_path, str(tiny_pipeline_dir))
    expected = native_to_lora(result.adapter_path).adapter
    assert set(lora.layers()) == set(expected.layers()) and all(torch.equal(lora.delta(m), expected.delta(m)) for m in lora.layers())
    assert lora.notes[0] == "a studio-trained lora adapter (done after 4 steps), read as a LoRA exactly"
    best = load_adapter(result.best_path, str(tiny_pipeline_dir))
    assert best.notes[0].startswith("a studio-trained lora adapter (best checkpoint: step ") and best.metadata["studio.family"] == "lora"
    collection_path = family_cases["eigenlora"][0]["collection"]
    report = load_collection([result.adapter_path, result.best_path, collection_path], base=str(tiny_pipeline_dir))
    rows = {info.name: info for info in report.infos}
    assert {"run", "run-best"} <= set(rows) and all(rows[n].error is None for n in ("run", "run-best"))
    collection_row = next(info for info in report.infos if info.format == "eigenlora-collection")
    assert collection_row.error is None and "compressed EigenLoRAx collection of 4 adapters" in collection_row.notes[0]
    with pytest.raises(FormatError, match="a compressed EigenLoRAx collection of 4 adapters"):
        load_adapter(collection_path, str(tiny_pipeline_dir))


def test_the_exported_lora_is_not_mistaken_for_the_native_file(tiny_pipeline_dir, style_data, tmp_path):
    from studio.formats import load_adapter, read_header

    result = run_to_end(train(tiny_config(tiny_pipeline_dir, style_data, tmp_path / "run", steps=2, export_format="kohya")))
    assert "studio.format" not in read_header(result.lora_path)[1]
    assert load_adapter(result.lora_path, str(tiny_pipeline_dir)).source_format == "kohya"
