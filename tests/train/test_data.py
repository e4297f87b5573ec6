"""Bad training data is skipped file by file with the reason; only an empty result fails."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from studio.errors import DatasetError
from studio.train.data import batch_indices, image_tensor, scan_folder, split
from tests.train.helpers import shape_image


def _pair(folder, stem, image=None, caption="a red circle", suffix=".png"):
    (image or shape_image("red", "circle")).save(folder / f"{stem}{suffix}")
    if caption is not None:
        (folder / f"{stem}.txt").write_text(caption)


def test_bad_inputs_are_skipped_one_by_one(tmp_path):
    _pair(tmp_path, "good")
    _pair(tmp_path, "cmyk", shape_image("blue", "square").convert("CMYK"), suffix=".jpg")
    Image.fromarray((np.arange(32 * 32).reshape(32, 32) * 60).astype(np.uint16)).save(tmp_path / "deep.png")
    (tmp_path / "deep.txt").write_text("deep")
    _pair(tmp_path, "alpha", shape_image("green", "circle").convert("RGBA"))
    _pair(tmp_path, "nocap", caption=None)
    (tmp_path / "orphan.txt").write_text("no image")
    _pair(tmp_path, "dup")
    shape_image("red", "square").save(tmp_path / "dup.jpg")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    (tmp_path / "corrupt.txt").write_text("x")
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "zero.txt").write_text("x")
    _pair(tmp_path, "latin", caption=None)
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9 au lait")
    (tmp_path / "3_style").mkdir()
    _pair(tmp_path / "3_style", "rep")
    (tmp_path / "notes").mkdir()

    scan = scan_folder(tmp_path, trigger="zxq")
    assert sorted(p.image.name for p in scan.pairs) == ["alpha.png", "cmyk.jpg", "deep.png", "good.png", "rep.png"]
    assert {p.image.name: p.repeats for p in scan.pairs}["rep.png"] == 3
    assert all(p.caption.startswith("zxq") for p in scan.pairs)
    reasons = "\n".join(scan.skipped)
    for expected in ("nocap.png: image without a caption", "orphan.txt: caption without an image",
                     "two or more images share the stem (dup.jpg, dup.png)", "corrupt.png: image cannot be decoded",
                     "zero.png: image file is empty (0 bytes)", "latin.txt: caption is not UTF-8", "notes: folder skipped"):
        assert expected in reasons
    assert len(scan.skipped) == 7
    converted = "\n".join(scan.converted)
    assert "CMYK" in converted and "I;16" in converted and "alpha" in converted
    for pair in scan.pairs:
        tensor = image_tensor(pair.image, 16)
        assert tensor.shape == (3, 16, 16) and -1 <= float(tensor.min()) and float(tensor.max()) <= 1


def test_no_usable_pair_names_the_folder(tmp_path):
    with pytest.raises(DatasetError, match=str(tmp_path)):
        scan_folder(tmp_path)
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "zero.txt").write_text("x")
    with pytest.raises(DatasetError, match="0 bytes"):
        scan_folder(tmp_path)
    with pytest.raises(DatasetError, match="does not exist"):
        scan_folder(tmp_path / "missing")


def test_resize_and_centre_crop(tmp_path):
    image = Image.new("RGB", (64, 32), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 8, 32))  # white strip on the far left is cropped away
    image.save(tmp_path / "wide.png")
    tensor = image_tensor(tmp_path / "wide.png", 16)
    assert tensor.shape == (3, 16, 16) and float(tensor.max()) == -1.0


def test_order_is_a_function_of_the_step():
    weights = [1, 3, 1]
    first = [batch_indices(weights, m, 2, 0, 1, seed=5) for m in range(10)]
    assert first == [batch_indices(weights, m, 2, 0, 1, seed=5) for m in range(10)]
    epoch = [i for m in range(5) for i in batch_indices(weights, m, 1, 0, 1, seed=5)]
    assert sorted(epoch) == [0, 1, 1, 1, 2]
    ranks = [batch_indices(weights, 0, 1, r, 2, seed=5)[0] for r in range(2)]
    assert ranks == [batch_indices(weights, 0, 2, 0, 1, seed=5)[j] for j in range(2)]


def test_validation_split_is_fixed(tmp_path):
    from studio.train.data import Pair

    pairs = [Pair(tmp_path / f"{i}.png", str(i)) for i in range(10)]
    train_a, val_a = split(pairs, 0.2, seed=1)
    train_b, val_b = split(pairs, 0.2, seed=1)
    assert len(val_a) == 2 and val_a == val_b and train_a == train_b
    assert split(pairs[:1], 0.5, seed=1)[0] == pairs[:1]


@pytest.mark.parametrize("side", [9000, 20000])  # above the studio's 64 MP cap; above PIL's own bomb limit
def test_a_huge_tiny_png_is_skipped_before_it_is_decoded(tmp_path, side):
    """A 20000 x 20000 1-bit PNG is a few KB; it is skipped with its size, never decoded (hardening item 8)."""
    _pair(tmp_path, "ok")
    Image.new("1", (side, side)).save(tmp_path / "bomb.png")
    (tmp_path / "bomb.txt").write_text("a red circle")
    assert (tmp_path / "bomb.png").stat().st_size < 200_000
    scan = scan_folder(tmp_path)
    assert [p.image.name for p in scan.pairs] == ["ok.png"]
    assert any("bomb.png" in line and "pixels" in line for line in scan.skipped)  # PIL's own bomb check or the studio's cap


def test_a_trigger_word_already_in_the_caption_is_not_repeated(tmp_path):
    _pair(tmp_path, "a", caption="pinstriped style, a red circle")
    _pair(tmp_path, "b", caption="a red circle")
    captions = sorted(p.caption for p in scan_folder(tmp_path, "pinstriped").pairs)
    assert captions == ["pinstriped style, a red circle", "pinstriped, a red circle"]
