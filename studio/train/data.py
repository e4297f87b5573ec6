"""Training data in the convention LoRA users know: images with same-named ``.txt`` captions.

Kohya repeat folders (``10_mystyle/``) repeat their pairs N times. Every file that cannot be used
is skipped on its own with the reason (RELIABILITY 13); images in CMYK, 16-bit, palette or with
alpha are converted to RGB (alpha over white) and said so. Only a folder without a single usable
pair is an error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from studio.errors import DatasetError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_IMAGE_PIXELS = 64_000_000  # larger images are skipped before they are decoded (a 20000 x 20000 PNG is a few KB)
REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")


@dataclass
class Pair:
    """One usable image and its caption (trigger word already prepended)."""

    image: Path
    caption: str
    repeats: int = 1


@dataclass
class Scan:
    """The usable pairs of a folder and one line per file skipped or converted."""

    folder: Path
    pairs: list[Pair]
    skipped: list[str] = field(default_factory=list)
    converted: list[str] = field(default_factory=list)


def _folders(root: Path, skipped: list[str]) -> list[tuple[Path, int]]:
    """The root (1 repeat) and every kohya ``N_name`` subfolder (N repeats)."""
    folders = [(root, 1)]
    for child in sorted(p for p in root.iterdir() if p.is_dir()):
        match = REPEAT_FOLDER.match(child.name)
        if match and int(match.group(1)) > 0:
            folders.append((child, int(match.group(1))))
        elif not child.name.startswith("."):
            skipped.append(f"{child}: folder skipped (not a kohya 'N_name' repeat folder)")
    return folders


def _caption(path: Path) -> str:
    """Read a caption as UTF-8 (BOM allowed); raise ValueError with the reason."""
    try:
        return path.read_text(encoding="utf-8-sig").strip()
    except UnicodeDecodeError as error:
        raise ValueError(f"caption is not UTF-8 ({error.reason} at byte {error.start})") from error


def open_rgb(path: Path) -> tuple[Image.Image, str]:
    """Open an image fully as 8-bit RGB; return it and a note on any conversion. ValueError if unusable."""
    if path.stat().st_size == 0:
        raise ValueError("image file is empty (0 bytes)")
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise ValueError(f"image is {width} x {height} pixels, more than the {MAX_IMAGE_PIXELS:,} the studio decodes")
            image.load()
            return _to_rgb(image)
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as error:
        raise ValueError(f"image cannot be decoded ({error})") from error


def _to_rgb(image: Image.Image) -> tuple[Image.Image, str]:
    mode = image.mode
    if mode == "RGB":
        return image.copy(), ""
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if mode.startswith("I;16") or array.max() > 255 else 255.0
        gray = Image.fromarray(np.clip(array / peak * 255.0, 0, 255).astype(np.uint8), "L")
        return gray.convert("RGB"), f"converted {mode} (16-bit/float) to 8-bit RGB"
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB"), f"converted {mode} with alpha to RGB over white"
    return image.convert("RGB"), f"converted {mode} to RGB"


def _pairs_in(folder: Path, repeats: int, trigger: str, scan: Scan) -> None:
    by_stem: dict[str, list[Path]] = {}
    captions: dict[str, Path] = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        suffix = path.suffix.lower()
        if suffix in IMAGE_SUFFIXES:
            by_stem.setdefault(path.stem, []).append(path)
        elif suffix == ".txt":
            captions[path.stem] = path
    for stem in sorted(set(captions) - set(by_stem)):
        scan.skipped.append(f"{captions[stem]}: caption without an image")
    for stem, images in sorted(by_stem.items()):
        if len(images) > 1:
            names = ", ".join(p.name for p in images)
            scan.skipped.append(f"{folder / stem}: two or more images share the stem ({names}); all skipped")
            continue
        _add_pair(images[0], captions.get(stem), repeats, trigger, scan)


def _add_pair(image: Path, caption_path: Path | None, repeats: int, trigger: str, scan: Scan) -> None:
    if caption_path is None:
        scan.skipped.append(f"{image}: image without a caption (.txt)")
        return
    try:
        caption = _caption(caption_path)
    except ValueError as error:
        scan.skipped.append(f"{caption_path}: {error}")
        return
    try:
        _, note = open_rgb(image)
    except ValueError as error:
        scan.skipped.append(f"{image}: {error}")
        return
    if note:
        scan.converted.append(f"{image}: {note}")
    if trigger and not _starts_with_word(caption, trigger):
        caption = f"{trigger}, {caption}" if caption else trigger
    scan.pairs.append(Pair(image, caption, repeats))


def _starts_with_word(caption: str, word: str) -> bool:
    """Whether the caption already begins with the trigger word (kohya datasets often carry it)."""
    return caption == word or any(caption.startswith(word + sep) for sep in (" ", ",", ".", ":"))


def fingerprint(scan: Scan) -> dict[str, str]:
    """Each pair's image (relative path -> size, modification time, repeats, caption), so a
    resume can tell whether the data changed since the run started."""
    out = {}
    for pair in scan.pairs:
        stat = pair.image.stat()
        out[str(pair.image.relative_to(scan.folder))] = f"{stat.st_size}:{stat.st_mtime_ns}:{pair.repeats}:{pair.caption}"
    return out


def scan_folder(folder: str | Path, trigger: str = "") -> Scan:
    """Every usable pair of a data folder; DatasetError naming the folder when none is left."""
    root = Path(folder)
    if not root.is_dir():
        raise DatasetError(f"{root}: data folder does not exist")
    scan = Scan(root, [])
    for sub, repeats in _folders(root, scan.skipped):
        _pairs_in(sub, repeats, trigger, scan)
    if not scan.pairs:
        reasons = "; ".join(scan.skipped[:5]) or "the folder holds no images"
        raise DatasetError(f"{root}: no usable image/caption pair ({reasons})")
    return scan


def image_tensor(path: Path, resolution: int) -> Tensor:
    """Resize the short side to ``resolution``, centre-crop to a square, scale to [-1, 1] (3, H, W)."""
    image, _ = open_rgb(path)
    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    image = image.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    array = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
    return array.float() / 127.5 - 1.0


def split(pairs: list[Pair], fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """(train, validation): a seeded, fixed share of pairs held out (at least one train pair kept)."""
    count = min(len(pairs) - 1, round(len(pairs) * fraction)) if fraction > 0 else 0
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:count])
    return [p for i, p in enumerate(pairs) if i not in held], [p for i, p in enumerate(pairs) if i in held]


def epoch_order(weights: list[int], epoch: int, seed: int) -> list[int]:
    """Item indices of one epoch (each repeated ``weights[i]`` times), shuffled by (seed, epoch)."""
    pool = [i for i, count in enumerate(weights) for _ in range(count)]
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return [pool[j] for j in torch.randperm(len(pool), generator=generator).tolist()]


def batch_indices(weights: list[int], micro_step: int, batch_size: int, rank: int, world: int, seed: int) -> list[int]:
    """The items of one micro-batch: a pure function of the step, so resume replays the same order."""
    length = sum(weights)
    first = (micro_step * world + rank) * batch_size
    out, cache = [], {}
    for position in range(first, first + batch_size):
        epoch = position // length
        if epoch not in cache:
            cache[epoch] = epoch_order(weights, epoch, seed)
        out.append(cache[epoch][position % length])
    return out
