"""Module trees as data: stored trees equal the models' own module hierarchy; every BASE id resolves."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from safetensors.torch import save_file

from studio.bases import ALIASES, ARCHITECTURES, architecture_tree, module_tree
from studio.bases.trees import TREE_DIR, tree_from_json, tree_to_json

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_stored_tree_equals_a_fresh_meta_build(arch):
    """A stored tree is what `python -m studio.bases.build_trees` makes now (rerun it after a library upgrade)."""
    from studio.bases.meta import build_architecture_tree

    fresh = build_architecture_tree(arch)
    stored = tree_from_json(json.loads((TREE_DIR / f"{arch}.json").read_text()))
    assert stored.modules == fresh.modules and stored.unet_config == fresh.unet_config


@pytest.mark.parametrize("arch, modules, components, probe, shape", [
    ("flux1", 744, ["text_encoder", "text_encoder_2", "transformer"], "transformer.single_transformer_blocks.37.proj_mlp", (12288, 3072)),
    ("flux1-schnell", 742, ["text_encoder", "text_encoder_2", "transformer"], "transformer.transformer_blocks.18.attn.add_q_proj", (3072, 3072)),
    ("sd3.5-large", 971, ["text_encoder", "text_encoder_2", "text_encoder_3", "transformer"], "transformer.transformer_blocks.37.norm1_context.linear", (4864, 2432)),
    ("sd3.5-medium", 827, ["text_encoder", "text_encoder_2", "text_encoder_3", "transformer"], "transformer.transformer_blocks.12.attn2.to_q", (1536, 1536)),
])
def test_transformer_trees(arch, modules, components, probe, shape):
    tree = architecture_tree(arch)
    assert len(tree.modules) == modules and tree.components == components
    assert tree.modules[probe].weight_shape == shape
    assert tree.modules["text_encoder_2.encoder.block.23.layer.1.DenseReluDense.wi_0" if arch.startswith("flux") else
                        "text_encoder_3.encoder.block.23.layer.1.DenseReluDense.wi_0"].weight_shape == (10240, 4096)


def test_flux_dev_has_guidance_embedder_and_schnell_not():
    assert "transformer.time_text_embed.guidance_embedder.linear_1" in architecture_tree("flux1").modules
    schnell = architecture_tree("flux1-schnell").modules
    assert not any("guidance_embedder" in m for m in schnell)
    assert all(architecture_tree("flux1").modules[m] == info for m, info in schnell.items())  # schnell LoRAs fit dev


def test_aliases_carry_their_alternatives():
    tree = module_tree("sd3")
    assert [t.arch for t in tree.variants()] == list(ALIASES["sd3"]) and tree.family == "sd3"
    assert module_tree("flux1-dev").arch == "flux1" and module_tree("flux1").label == "FLUX.1"


def test_sdxl_tree_lists_resnet_convs_and_time_projections():
    """What LoCon files target on SDXL resnets: conv1 / conv2 (3x3), conv_shortcut (1x1), time_emb_proj."""
    tree = architecture_tree("sdxl")
    resnets = {m: i for m, i in tree.modules.items() if ".resnets." in m}
    assert len([m for m in resnets if m.endswith((".conv1", ".conv2"))]) == 2 * (3 * 2 + 2 + 3 * 3)  # 17 resnets
    assert tree.modules["unet.up_blocks.0.resnets.2.conv1"].weight_shape == (1280, 1920, 3, 3)
    assert tree.modules["unet.down_blocks.1.resnets.0.conv_shortcut"].weight_shape == (640, 320, 1, 1)
    assert tree.modules["unet.mid_block.resnets.1.time_emb_proj"].weight_shape == (1280, 1280)
    assert tree.modules["unet.down_blocks.0.downsamplers.0.conv"].kind == "conv"


def test_json_round_trip_keeps_kinds_and_shapes():
    tree = architecture_tree("sd15")
    again = tree_from_json(json.loads(json.dumps(tree_to_json(tree))))
    assert again.modules == tree.modules and again.arch == tree.arch


def test_folder_tree_is_cached_and_the_cache_is_keyed_by_config(tmp_path, tiny_flux_dir, monkeypatch):
    monkeypatch.setenv("STUDIO_CACHE_DIR", str(tmp_path / "cache"))
    from studio.bases import _folder_tree, pipeline_tree, load_pipeline

    _folder_tree.cache_clear()
    tree = module_tree(str(tiny_flux_dir))
    assert tree.arch == "flux1-custom" and tree.family == "flux1"
    assert len(list((tmp_path / "cache" / "trees").glob("*.json"))) == 1
    assert tree.modules == pipeline_tree(load_pipeline(str(tiny_flux_dir))).modules
    _folder_tree.cache_clear()
    assert module_tree(str(tiny_flux_dir)).modules == tree.modules  # read back from the cache


READ_KEYS = """
import sys
from studio.verbs.inspect import InspectRequest, run
infos = run(InspectRequest([sys.argv[1]], base=sys.argv[2] if sys.argv[2] != "-" else None)).infos
assert not infos[0].error, infos[0].error
print(infos[0].format, infos[0].layers, infos[0].base_guess)
print("diffusers" in sys.modules, "transformers" in sys.modules)
"""


@pytest.mark.parametrize("kind", ["kohya-flux", "kohya-sd15", "world-zoo"])
def test_reading_keys_does_not_import_diffusers(tmp_path, kind):
    """inspect's key mapping runs on stored / cached trees: neither diffusers nor transformers is imported."""
    if kind == "kohya-flux":
        from tests.formats.flux_files import FluxParams, write_kohya_flux

        path, base = write_kohya_flux(tmp_path / "f.safetensors", p=FluxParams(depth=1, depth_single_blocks=1), rank=1), "flux1"
    elif kind == "kohya-sd15":
        import torch

        path, base = tmp_path / "s.safetensors", "sd15"
        save_file({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.ones(2, 320),
                   "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.ones(320, 2)}, path)
    else:
        path, base = REPO / "assets" / "world" / "loras" / "noir.safetensors", "-"
        module_tree("world")  # builds and caches the world's folder tree once (this process may import diffusers)
    done = subprocess.run([sys.executable, "-c", READ_KEYS, str(path), base], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    described, imported = done.stdout.strip().splitlines()[-2:]
    assert imported == "False False", described
