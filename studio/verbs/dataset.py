"""`studio dataset --style pinstripe -o DIR`: a world style's training images and captions as a
dataset folder (PNG + same-named .txt), ready for `studio train`.

The images are the style's training split as the world renders it (`studio.world.data.style_split`,
the styles the embedded world was built with). The folder is written beside its target and renamed
into place; a folder the studio did not write (no marker file) is never replaced.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from studio.errors import ConfigError, LimitError, PathError
from studio.options import check as check_fields
from studio.options import Cli, option
from studio.verbs import checks
from studio.verbs.result import VerbResult

MARKER = ".studio-dataset.json"  # written into every dataset folder the studio renders (hidden: the trainer skips it)
MAX_COUNT = 4096
MIN_SIZE, MAX_SIZE = 8, 1024
MAX_RENDER_BYTES = 2 << 30  # the split is rendered at once as float32 pixels: count x 3 x size^2 x 4 bytes at most
FLOAT_BYTES = 4


@dataclass
class DatasetRequest:
    """Which style, how many images, where."""

    style: str = option(help="the world style to render (see studio/world/styles.toml)")
    output: str = option(help="dataset folder to write (replaced only if the studio wrote it)",
                         cli=Cli(short="-o", metavar="DIR"))
    count: int = option(16, "images (with captions)", minimum=1, maximum=MAX_COUNT)
    seed: int = option(0, "seed of the scenes", minimum=0, maximum=checks.MAX_SEED)
    size: int = option(64, "image side in pixels", minimum=MIN_SIZE, maximum=MAX_SIZE)


@dataclass
class DatasetResult(VerbResult):
    """The written folder and its pairs."""

    folder: Path
    images: list[Path]
    warnings: list[str] = field(default_factory=list)

    def as_json(self) -> dict:
        return {"folder": str(self.folder), "images": len(self.images)}

    def as_text(self) -> str:
        return f"wrote {len(self.images)} images with captions to {self.folder}"


def styles_file() -> Path:
    """The styles the embedded world (and its zoo) was built with; the package's own otherwise."""
    from studio.bases import world_dir
    from studio.world.styles import DEFAULT_STYLES

    shipped = world_dir() / "styles.toml"
    return shipped if shipped.is_file() else DEFAULT_STYLES


def world_styles() -> list[str]:
    """Names of the world's styles."""
    from studio.world.styles import load_styles

    return [style.name for style in load_styles(styles_file())]


def check(request: DatasetRequest) -> None:
    """Every field; a known style; a size the render fits in; an output folder that may be replaced."""
    check_fields(request, "dataset")
    names = world_styles()
    if request.style not in names:
        raise ConfigError(f"dataset: style {request.style!r} is not a world style; known: {', '.join(names)}")
    needed = request.count * 3 * request.size * request.size * FLOAT_BYTES
    if needed > MAX_RENDER_BYTES:
        raise LimitError(f"dataset: {request.count} images of {request.size} px need {needed / 2**30:.1f} GiB to render "
                         f"(at most {MAX_RENDER_BYTES / 2**30:.0f} GiB): fewer or smaller images")
    folder = checks.output_folder("output", request.output)
    if folder.is_dir() and any(folder.iterdir()) and not (folder / MARKER).is_file():
        raise PathError(f"output: {folder} is not empty and was not written by `studio dataset`; choose a new folder "
                        "(nothing was written)")


def run(request: DatasetRequest) -> DatasetResult:
    """Render the style's split and write it, replacing a previous studio dataset at the target."""
    from PIL import Image

    from studio.world.data import style_split
    from studio.world.styles import load_styles

    check(request)
    styles = load_styles(styles_file())
    index = next(i for i, s in enumerate(styles) if s.name == request.style)
    images, captions = style_split(styles[index], index, request.count, request.seed, False, request.size)
    target = Path(request.output)
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        for i, (pixels, caption) in enumerate(zip(images, captions)):
            stem = f"{request.style}-{i:04d}"
            Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(work / f"{stem}.png")
            (work / f"{stem}.txt").write_text(caption, encoding="utf-8")
        (work / MARKER).write_text(json.dumps(asdict(request)), encoding="utf-8")
        _replace(work, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return DatasetResult(target, sorted(target.glob("*.png")))


def _replace(work: Path, target: Path) -> None:
    """Rename ``work`` onto ``target``; a previous studio dataset there is moved aside, then removed."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{work.name}")
        target.rename(old)
    work.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
