"""The pixel checker decides colour and shape on rendered (ground-truth) images."""

from __future__ import annotations

import numpy as np

from studio.world.judge import judge
from studio.world.scene import render, sample_scenes


def test_judge_is_right_on_rendered_scenes():
    scenes = sample_scenes(200, seed=11)
    images = render(scenes)
    verdicts = [judge(image, s.colour, s.shape, s.background) for s, image in zip(scenes, images)]
    assert sum(v.colour_ok for v in verdicts) == 200
    assert sum(v.shape_ok for v in verdicts) >= 198


def test_judge_rejects_wrong_requests_and_empty_images():
    scene = sample_scenes(1, seed=5)[0]
    image = render([scene])[0]
    other = next(c for c in ("red", "blue") if c not in (scene.colour, scene.background))
    assert not judge(image, other, scene.shape, scene.background).colour_ok
    blank = np.zeros((64, 64, 3), np.uint8) + 245  # all white
    verdict = judge(blank, "red", "circle", "white")
    assert verdict.colour is None and not verdict.colour_ok and not verdict.shape_ok
