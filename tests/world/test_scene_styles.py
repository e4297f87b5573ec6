"""The procedural world, styles from TOML, and the tokenizer."""

from __future__ import annotations

import pytest
import torch

from studio.errors import ConfigError
from studio.world.scene import COLOURS, SHAPES, render, sample_scenes, world_words
from studio.world.styles import DEFAULT_STYLES, load_styles
from studio.world.tokenizer import build_tokenizer
from studio.world.transforms import STEPS


def test_render_is_deterministic_and_uint8():
    a = render(sample_scenes(16, seed=3))
    b = render(sample_scenes(16, seed=3))
    assert a.dtype == torch.uint8 and a.shape == (16, 3, 64, 64)
    assert torch.equal(a, b)
    assert not torch.equal(a, render(sample_scenes(16, seed=4)))


def test_caption_states_the_scene():
    scene = sample_scenes(1, seed=0)[0]
    caption = scene.caption()
    for word in (scene.colour, scene.shape, scene.size, scene.background, "background"):
        assert word in caption
    assert caption.endswith(scene.position)
    assert scene.caption(size=False, position=False) == f"a {scene.colour} {scene.shape} on a {scene.background} background"


def test_zoo_has_at_least_24_styles_with_distinct_triggers():
    styles = load_styles(DEFAULT_STYLES)
    assert len(styles) >= 24
    assert len({s.trigger for s in styles}) == len(styles)
    images = render(sample_scenes(4, seed=1))
    for style in styles:
        out = style.apply(images, seed=0)
        assert out.shape == images.shape and out.dtype == torch.uint8
        assert torch.equal(out, style.apply(images, seed=0)), style.name
        assert not torch.equal(out, images), f"{style.name} changes nothing"


def test_a_new_style_needs_only_toml(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('[[style]]\nname = "mine"\ntrigger = "minestyle"\nsteps = [{ op = "invert" }, { op = "pixelate", block = 4 }]\n')
    (style,) = load_styles(path)
    images = render(sample_scenes(2, seed=0))
    out = style.apply(images)
    blocks = out.view(2, 3, 16, 4, 16, 4).float()
    assert torch.equal(blocks, blocks[:, :, :, :1, :, :1].expand_as(blocks))  # pixelated in 4x4 blocks
    assert (out.float().mean() - (255 - images.float().mean())).abs() < 2  # inverted
    assert style.caption("a red circle").startswith("minestyle style, ")


@pytest.mark.parametrize("text, needle", [
    ('[[style]]\nname = "x"\ntrigger = "xstyle"\nsteps = [{ op = "explode" }]\n', "unknown op 'explode'"),
    ('[[style]]\nname = "x"\ntrigger = "xstyle"\nsteps = [{ op = "blur", radius = 3 }]\n', "unknown parameters ['radius']"),
    ('[[style]]\nname = "x"\ntrigger = "Bad Word"\nsteps = [{ op = "invert" }]\n', "'trigger'"),
    ('[[style]]\nname = "x"\ntrigger = "xstyle"\nsteps = [{ op = "tint", colour = "mauve" }]\n', "unknown colour 'mauve'"),
    ('[[style]]\nname = "x"\ntrigger = "xstyle"\nsteps = [{ op = "invert" }]\n[[style]]\nname = "y"\ntrigger = "xstyle"\nsteps = [{ op = "invert" }]\n', "share the trigger"),
    ("[[style]\n", "invalid TOML"),
])
def test_bad_style_files_are_refused_naming_file_and_problem(tmp_path, text, needle):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_styles(path)
    assert str(path) in str(error.value) and needle in str(error.value)


def test_transform_ops_cover_the_issue_list():
    for op in ("palette_swap", "grayscale", "invert", "posterize", "outline", "stripes", "dots", "pixelate", "blur", "noise", "frame", "mirror", "tile"):
        assert op in STEPS


def test_tokenizer_gives_one_id_per_word(tmp_path):
    styles = load_styles()
    words = world_words() + [s.trigger for s in styles]
    tokenizer = build_tokenizer(words, tmp_path)
    assert len(tokenizer("a red circle")["input_ids"]) == 3 + 2
    for word in list(COLOURS) + list(SHAPES) + [s.trigger for s in styles]:
        assert len(tokenizer(word)["input_ids"]) == 3, word
    prompt = f"{styles[0].trigger} style, a small red circle on a blue background, top left"
    assert len(tokenizer(prompt)["input_ids"]) == len(prompt.replace(",", " ,").split()) + 2
