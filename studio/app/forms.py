"""The tabs' requests: one dataclass per action, its fields declared with `studio.options.option`.

A tab callback takes one of these (built by `studio.app.wiring.form_of` from the form's
components, checked field by field with the same messages as the CLI), and the services turn it
into a verb's request. The help text and bounds are what the page shows next to each field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from studio.options import option, same_option
from studio.train.config import ExportFormat, TrainConfig
from studio.verbs.generate import GenerateRequest

GenerateMode = Literal["mix", "per_image", "grid"]
BaseKind = Literal["world", "folder", "file", "hub"]
Layout = Literal["kohya", "diffusers"]
SizeBy = Literal["energy", "k"]
Checkpoint = Literal["best", "final"]
MAX_K = 4096
MAX_REPEATS = 10_000


@dataclass
class FolderForm:
    """Import the adapter files of a folder inside the workspace."""

    folder: str = option(help="a folder inside the workspace, e.g. adapters")


@dataclass
class BaseForm:
    """Which base model to load."""

    kind: BaseKind = option("world", "the embedded world, a diffusers folder or a .safetensors file inside the workspace, or a hub id (online)")
    value: str = option("", "the folder or file (relative to the workspace, e.g. bases/my-model) or the hub id (org/name)")


@dataclass
class CompressForm:
    """The Subspace tab: size the subspace by explained energy (default) or by K per layer."""

    size_by: SizeBy = option("energy", "energy: per layer the smallest K explaining this share of the energy; k: the same K everywhere")
    energy: float = option(0.9, "share of each layer's energy the components explain", minimum=0, exclusive_minimum=True, maximum=1)
    k: int = option(4, "components per layer (with size_by = k)", minimum=1, maximum=MAX_K)
    augment: int = option(0, "extra seeded random components per layer (for EigenLoRAx training)", minimum=0, maximum=MAX_K)
    export_format: Layout = option("kohya", "layout of the reconstructed LoRAs in the zip download")


@dataclass
class StyleForm:
    """Render a world style as a dataset."""

    style: str = option(help="the world style to render")
    count: int = option(16, "images (with captions)", minimum=1, maximum=4096)


@dataclass
class RepeatsForm:
    """Set how often one folder of a dataset repeats per epoch (kohya's N_name)."""

    dataset: str = option(help="the dataset folder inside the workspace")
    folder: str = option("", "the folder inside the dataset ('' for the images at its top)")
    repeats: int = option(1, "repeats per epoch", minimum=1, maximum=MAX_REPEATS)


@dataclass
class DatasetView:
    """Which dataset to show, with which validation split."""

    dataset: str = option(help="the dataset folder inside the workspace")
    validation_split: float = option(0.1, "share of the pairs held out for the validation loss", minimum=0, maximum=0.9)


@dataclass
class TrainForm:
    """The Train tab's form; becomes a `studio.train.TrainConfig` in the workspace."""

    name: str = option("my-adapter", "run name: the folder under runs/ and the adapter's name")
    dataset: str = option("", "dataset folder inside the workspace (images + same-named .txt captions)")
    family: str = same_option(TrainConfig, "family")
    knobs: dict[str, Any] = option(default_factory=dict, help="the family's knobs (the run's [adapter] table)")
    steps: int = same_option(TrainConfig, "steps")
    learning_rate: float = same_option(TrainConfig, "learning_rate")
    batch_size: int = same_option(TrainConfig, "batch_size")
    resolution: int = same_option(TrainConfig, "resolution")
    trigger_word: str = same_option(TrainConfig, "trigger_word")
    validation_split: float = same_option(TrainConfig, "validation_split")
    sample_every: int = option(0, "steps between sample images (0: only the baseline and the last step)", minimum=0)
    sample_prompt: str = option("", "prompt of the sample images (default: the first caption)")
    checkpoint_every: int = same_option(TrainConfig, "checkpoint_every")
    export_format: ExportFormat = same_option(TrainConfig, "export_format")
    export_rank: int = same_option(TrainConfig, "export_rank")
    seed: int = same_option(TrainConfig, "seed")
    caption_dropout: float = same_option(TrainConfig, "caption_dropout")


@dataclass
class RunForm:
    """A training run of the workspace, picked from the list."""

    run: str = option(help="the run (its folder under runs/)")


@dataclass
class ExportRunForm:
    """Export a run's best (by validation) or final adapter as a standard LoRA."""

    run: str = option(help="the run (its folder under runs/)")
    checkpoint: Checkpoint = option("best", "best: the step with the lowest validation loss; final: the last step")
    format: Layout = option("kohya", "layout of the LoRA file")


@dataclass
class GenerateForm:
    """The Generate tab's form: adapters by registered name, with optional weights."""

    prompt: str = same_option(GenerateRequest, "prompt")
    negative_prompt: str = same_option(GenerateRequest, "negative_prompt")
    adapters: list[str] = option(default_factory=list, help="adapters of the collection ('none': no adapter)")
    weights: str = option("", "one weight per adapter, e.g. 1, 0.5 (empty: 1 each)")
    mode: GenerateMode = option("mix", "mix: all adapters into one; per_image: one adapter per image; grid: a labelled same-seed grid")
    strength: float = same_option(GenerateRequest, "scale")
    seed: int = same_option(GenerateRequest, "seed")
    steps: int = same_option(GenerateRequest, "steps")
    # a number box cannot be left empty: 0 stands for the request's None (the base's own value)
    guidance: float = option(0.0, "CFG scale (0: the base's usual)", minimum=0)
    batch: int = same_option(GenerateRequest, "batch")
    width: int = option(0, "width in pixels, a multiple of 8 (0: the base's native size)", minimum=0)
    height: int = option(0, "height in pixels, a multiple of 8 (0: the base's native size)", minimum=0)
    scheduler: str = option("default", "sampler")


@dataclass
class SwitchForm:
    """Merge one adapter (the first picked) into the live weights."""

    adapters: list[str] = option(default_factory=list, help="adapters picked ('none' or nothing: the bare base)")
    strength: float = option(1.0, "overall adapter strength")


@dataclass
class NameForm:
    """One adapter of the collection, by name."""

    name: str = option(help="the adapter's name in the collection")


@dataclass
class SearchForm:
    """Filter the collection table."""

    query: str = option("", "words to find in the name, base, format, trigger words or status")


@dataclass
class ImportForm:
    """Uploaded files to import (their temporary paths)."""

    files: list[str] = option(default_factory=list, help="uploaded .safetensors files (LoRAs, trained adapters, compressed collections)")


@dataclass
class ArchiveForm:
    """An uploaded dataset zip and where it goes."""

    archive: str | None = option(None, "the uploaded zip")
    name: str = option("my-dataset", "the dataset's folder name under datasets/")
    repeats: int = option(1, "repeats of the images that are not in a kohya N_name folder already", minimum=1, maximum=MAX_REPEATS)
    trigger_word: str = option("", "the folder name part for those images; empty: the dataset's name")


def field_names(cls: type) -> list[str]:
    """The form's field names in order (the API's parameter names)."""
    return list(cls.__dataclass_fields__)


