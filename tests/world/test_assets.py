"""The shipped world (assets/world): it loads, it is fast, it follows captions, its LoRAs work.

These run on CPU against the committed GPU-built weights; numbers are asserted.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from studio.world.data import style_split
from studio.world.evaluate import caption_accuracy, style_improvement
from studio.world.models import make_scheduler
from studio.world.scene import world_words
from studio.world.styles import load_styles

WORLD = Path(__file__).resolve().parents[2] / "assets" / "world"
CI_STYLES = ("noir", "mosaic", "candy")  # candy is the zoo's weakest LoRA in the build report

pytestmark = pytest.mark.skipif(not (WORLD / "model_index.json").exists(), reason="assets/world not built")


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(WORLD, local_files_only=True, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_assets_are_small_fp16_safetensors():
    total = sum(p.stat().st_size for p in WORLD.rglob("*") if p.is_file())
    assert total <= 40 * 2**20
    weights = [p for part in ("unet", "vae", "text_encoder") for p in (WORLD / part).glob("*.safetensors")]
    assert {p.parent.name for p in weights} >= {"unet", "vae", "text_encoder"}
    for path in weights:
        with safe_open(str(path), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}, path
    assert not list(WORLD.rglob("*.bin")) and not list(WORLD.rglob("*.pt"))


def test_plain_from_pretrained_loads_and_matches_sd_names():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(WORLD, local_files_only=True)
    names = dict(pipe.unet.named_modules())
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q" in names
    assert "mid_block.attentions.0.transformer_blocks.0.attn2.to_k" in names
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.safety_checker is None
    assert abs(pipe.vae.config.scaling_factor - 1.0) > 1e-3  # set from the latents' std


def test_tokenizer_has_one_token_per_world_word(pipe):
    tok = pipe.tokenizer
    assert tok("a red circle")["input_ids"][1:-1] == [tok.convert_tokens_to_ids(w + "</w>") for w in ("a", "red", "circle")]
    for word in world_words() + [s.trigger for s in load_styles(WORLD / "styles.toml")]:
        assert len(tok(word)["input_ids"]) == 3, word


def test_one_image_in_well_under_three_seconds(pipe):
    gen = torch.Generator().manual_seed(0)
    pipe("a red circle on a white background", num_inference_steps=25, guidance_scale=4.0, height=64, width=64, generator=gen)
    start = time.perf_counter()
    image = pipe("a red circle on a white background", num_inference_steps=25, guidance_scale=4.0, height=64, width=64, generator=gen).images[0]
    elapsed = time.perf_counter() - start
    assert image.size == (64, 64)
    assert elapsed < 3.0, f"25 DDIM steps took {elapsed:.2f} s"


def test_base_follows_its_captions(pipe):
    accuracy = caption_accuracy(pipe, n=64, seed=2024, steps=25, guidance=4.0)
    print(f"colour {accuracy.colour:.3f} shape {accuracy.shape:.3f}", accuracy.failures)
    assert accuracy.colour >= 0.80
    assert accuracy.shape >= 0.60


@pytest.mark.parametrize("name", CI_STYLES)
def test_zoo_lora_lowers_heldout_loss_by_20_percent(pipe, name):
    from studio.formats import load_adapter

    styles = load_styles(WORLD / "styles.toml")
    index = next(i for i, s in enumerate(styles) if s.name == name)
    images, captions = style_split(styles[index], index, 32, seed=7, heldout=True, size=64)  # unseen seed
    adapter = load_adapter(WORLD / "loras" / f"{name}.safetensors", base=str(WORLD))
    alphas = make_scheduler().alphas_cumprod
    without, with_lora = style_improvement(pipe, adapter, images, captions, alphas, repeats=2)
    assert 1 - with_lora / without >= 0.20, (name, without, with_lora)


def test_zoo_files_carry_kohya_metadata():
    styles = load_styles(WORLD / "styles.toml")
    files = sorted((WORLD / "loras").glob("*.safetensors"))
    assert {p.stem for p in files} == {s.name for s in styles}
    for style in styles:
        with safe_open(str(WORLD / "loras" / f"{style.name}.safetensors"), "pt") as f:
            meta = f.metadata()
            keys = list(f.keys())
        assert meta["ss_base_model_version"] == "world"
        assert meta["ss_output_name"] == style.name
        assert style.trigger in meta["ss_training_comment"]
        assert 4 <= int(meta["ss_network_dim"]) <= 16 and float(meta["ss_network_alpha"]) > 0
        assert style.trigger in json.loads(meta["ss_tag_frequency"])[f"1_{style.name}"]
        assert meta["modelspec.title"] and meta["modelspec.trigger_phrase"] == style.trigger
        assert any(k.startswith("lora_unet_") and k.endswith("attn1_to_q.lora_down.weight") for k in keys)
    diffusers_files = list((WORLD / "loras" / "diffusers").glob("*.safetensors"))
    assert diffusers_files
    with safe_open(str(diffusers_files[0]), "pt") as f:
        assert any(k.startswith("unet.") and k.endswith(".lora_A.weight") for k in f.keys())


def test_build_report_records_every_style_passing():
    report = json.loads((WORLD / "report.json").read_text())
    styles = load_styles(WORLD / "styles.toml")
    assert set(report["styles"]) == {s.name for s in styles}
    assert all(v["improvement"] >= 0.20 for v in report["styles"].values())
    assert report["caption_following"]["colour"] >= 0.80 and report["caption_following"]["shape"] >= 0.60


def test_shipped_zoo_carries_the_fingerprints_the_recipe_gives():
    """A re-run of pipelines/world.toml finds every shipped LoRA up to date (nothing retrained)."""
    from studio.world.build import select_styles
    from studio.world.config import load_config
    from studio.world.stages import Stages
    from studio.world.zoo import FINGERPRINT_KEY, lora_fingerprint

    config = load_config(WORLD.parents[1] / "pipelines" / "world.toml")
    stages = Stages(config, select_styles(config))
    for style in stages.styles:
        with safe_open(str(WORLD / "loras" / f"{style.name}.safetensors"), "pt") as f:
            assert f.metadata()[FINGERPRINT_KEY] == lora_fingerprint(stages, style), style.name


# The held-out losses of noir as the world's validation loop gave them before it moved onto
# studio.train.validation (CPU, fp32, 1 thread) and as the GPU build recorded them (bf16 autocast).
NOIR_CPU_BEFORE = {"without": 0.06658662855625153, "with": 0.03180369781330228}


@pytest.mark.slow
def test_held_out_losses_reproduce_the_old_loop_and_the_build_report(pipe):
    from studio.formats import load_adapter

    styles = load_styles(WORLD / "styles.toml")
    index = next(i for i, s in enumerate(styles) if s.name == "noir")
    images, captions = style_split(styles[index], index, 64, seed=0, heldout=True, size=64)  # the build's held-out images
    adapter = load_adapter(WORLD / "loras" / "noir.safetensors", base=str(WORLD))
    without, with_lora = style_improvement(pipe, adapter, images, captions, make_scheduler().alphas_cumprod)
    assert without == pytest.approx(NOIR_CPU_BEFORE["without"], rel=1e-4)
    assert with_lora == pytest.approx(NOIR_CPU_BEFORE["with"], rel=1e-4)
    report = json.loads((WORLD / "report.json").read_text())["styles"]["noir"]
    assert without == pytest.approx(report["without"], rel=0.01) and with_lora == pytest.approx(report["with"], rel=0.01)
