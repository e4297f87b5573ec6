"""The Train tab's services: datasets, training runs, resuming, exporting a run's best checkpoint.

Datasets are folders under the workspace's ``datasets/`` (`studio.verbs.dataset` renders world
styles; uploaded zips keep kohya ``N_name/`` folders); what a folder holds is read by the
trainer's own scanner (`studio.train.data`). Training is `studio.verbs.train` (its checks: the
family's knobs, the adapter's memory estimate, before anything loads); runs are read back with
`studio.train.runs` (status, loss history, samples: the resume picker after a restart); a run's
best or final adapter becomes a standard LoRA through `studio.verbs.export`.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from studio.engine import check_name
from studio.errors import ConfigError, StudioError
from studio.events import Done, Event, Message
from studio.app.forms import ArchiveForm, DatasetView, ExportRunForm, RepeatsForm, StyleForm, TrainForm
from studio.app.workspace import REPEAT_FOLDER, WorkspaceError, extract_dataset_zip, safe_folder_name

if TYPE_CHECKING:
    from studio.app.services import Studio

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
PREVIEW_IMAGES = 24
TRIGGER_SHARE = 0.8  # a first caption tag on this share of the captions is the dataset's trigger word
WORKSPACE_COLLECTION = "compressed/collection.safetensors"


@dataclass
class Dataset:
    """What a dataset folder holds, as the trainer will read it."""

    folder: str  # workspace-relative
    pairs: list[tuple[Path, str, int]]  # image, caption, repeats
    folders: dict[str, int]  # kohya N_name folder -> repeats ('' for the top)
    skipped: list[str]
    train: int
    validation: int
    trigger_word: str = ""
    sample_prompt: str = ""

    def summary(self, split: float) -> str:
        """"6 images: 5 train, 1 held out for validation (split 0.1); 5_noir: 5 repeats"."""
        images = len(self.pairs)
        if self.validation:
            held = f"{self.train} train, {self.validation} held out for validation (split {split:g})"
        else:
            held = f"all {images} train; validation on training pairs (split {split:g} holds none out)"
        repeats = "; ".join(_folder_text(name, n) for name, n in self.folders.items())
        text = f"**{images} image{'s' if images != 1 else ''}**: {held}. {repeats}."
        if self.trigger_word:
            text += f" Trigger word (put before every caption): `{self.trigger_word}`."
        if self.skipped:
            text += f" Skipped {len(self.skipped)}: " + "; ".join(self.skipped[:3])
        return text


@dataclass
class RunView:
    """A run picked from the list: its info, loss history and samples (read from its folder)."""

    info: Any  # studio.train.runs.RunInfo
    losses: dict[int, float] = field(default_factory=dict)
    validation: dict[int, float] = field(default_factory=dict)
    samples: list[tuple[Path, str]] = field(default_factory=list)


class Training:
    """Datasets, runs and the one training job (its stop flag)."""

    def __init__(self, studio: "Studio"):
        self.studio = studio
        self.workspace = studio.workspace
        self.stop_event = threading.Event()
        self.running = threading.Lock()

    # -- datasets -------------------------------------------------------------------------------

    def datasets(self) -> list[str]:
        """The dataset folders of the workspace (workspace-relative)."""
        root = self.workspace.folder("datasets")
        return [self.workspace.relative(p) for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")
                and self.workspace.contains(p)]

    def style_dataset(self, form: StyleForm) -> str:
        """A world style's images and captions as a dataset folder (`studio.verbs.dataset`)."""
        from studio.verbs import dataset as dataset_verb

        check_name(form.style)
        target = self.workspace.folder("datasets") / f"world-{safe_folder_name(form.style)}"
        dataset_verb.run(dataset_verb.DatasetRequest(form.style, str(target), form.count, 0, 64))
        return self.workspace.relative(target)

    def upload_dataset(self, form: ArchiveForm) -> str:
        """Extract an uploaded zip (safely, kohya folders kept) as a new dataset folder."""
        if not form.archive:
            raise ConfigError("no dataset zip given: upload a .zip of images with same-named .txt captions")
        check_name(form.name)
        target = self.workspace.folder("datasets") / safe_folder_name(form.name)
        extract_dataset_zip(form.archive, target, repeats=form.repeats, trigger=form.trigger_word)
        return self.workspace.relative(target)

    def set_repeats(self, form: RepeatsForm) -> str:
        """Rename a dataset's ``N_name`` folder to the new repeats (the top images move into one)."""
        dataset = self._dataset_folder(form.dataset)
        if form.folder:
            check_name(form.folder)
            source = dataset / form.folder
            match = REPEAT_FOLDER.match(form.folder)
            if not source.is_dir() or match is None:
                raise WorkspaceError(f"{form.folder!r} is not a kohya N_name folder of {form.dataset}")
            target = dataset / f"{form.repeats}_{match.group(2)}"
            if target != source:
                _refuse_existing(target)
                source.rename(target)
            return self.workspace.relative(target)
        target = dataset / f"{form.repeats}_{safe_folder_name(dataset.name)}"
        _refuse_existing(target)
        target.mkdir()
        for path in [p for p in dataset.iterdir() if p.is_file() and not p.name.startswith(".")]:
            path.rename(target / path.name)
        return self.workspace.relative(target)

    def dataset(self, form: DatasetView) -> Dataset:
        """What the trainer will read in a dataset folder, with the validation split applied."""
        from studio.train import data

        folder = self._dataset_folder(form.dataset)
        scan = data.scan_folder(folder)
        train, held = data.split(scan.pairs, form.validation_split, 0)
        folders: dict[str, int] = {}
        for pair in scan.pairs:
            parent = pair.image.parent
            folders[parent.name if parent != folder else ""] = pair.repeats
        pairs = [(p.image, p.caption, p.repeats) for p in scan.pairs]
        trigger = _trigger_of(folders, [p.caption for p in scan.pairs])
        sample = pairs[0][1] if pairs else ""
        return Dataset(self.workspace.relative(folder), pairs, folders, scan.skipped, len(train), len(held), trigger, sample)

    def _dataset_folder(self, relative: str) -> Path:
        folder = self.workspace.resolve(relative)
        if not folder.is_dir():
            raise WorkspaceError(f"{relative!r} is not a dataset folder in the workspace")
        return folder

    # -- training -------------------------------------------------------------------------------

    def train_config(self, form: TrainForm):
        """The form as a TrainConfig whose data and outputs lie in the workspace."""
        from studio.train import TrainConfig

        check_name(form.name)
        data = self._dataset_folder(form.dataset)
        knobs = dict(form.knobs)
        if knobs.get("collection"):  # eigenlora trains on a compressed collection of the workspace
            knobs["collection"] = str(self.workspace.resolve(str(knobs["collection"])))
        steps = form.steps or _family_default(form.family, "steps")
        return TrainConfig(
            base=self.studio.base, data=str(data), output_dir=str(self.run_folder(form.name)), family=form.family,
            adapter=knobs, name=form.name, steps=steps, learning_rate=form.learning_rate, batch_size=form.batch_size,
            resolution=form.resolution, trigger_word=form.trigger_word, validation_split=form.validation_split,
            sample_every=form.sample_every or steps, sample_prompts=[form.sample_prompt] if form.sample_prompt else [],
            checkpoint_every=form.checkpoint_every, export_format=form.export_format, export_rank=form.export_rank,
            seed=form.seed, caption_dropout=form.caption_dropout, tensorboard=False,
        )

    def train(self, form: TrainForm) -> Iterator[Event]:
        """`studio.verbs.train` on a workspace dataset; the exported LoRA joins the collection."""
        from studio.verbs import train as train_verb

        config = self.train_config(form)
        train_verb.check_configs([config])
        estimate = train_verb.estimate_memory(config)
        with self._job():
            if estimate is not None:
                yield Message(f"{config.family} adapter: {estimate.trainable:,} trainable numbers "
                              f"(about {estimate.bytes / 2**20:.1f} MiB with gradients and AdamW state)")
            yield from self._joining(train_verb.train_runs([config], None, self.stop_event))

    def resume(self, run: str) -> Iterator[Event]:
        """Continue a stopped run from its last checkpoint (its loss history and samples are kept)."""
        from studio.train.config import load
        from studio.verbs import train as train_verb

        folder = self.run_folder(run)
        if not (folder / "config.toml").is_file():
            raise StudioError(f"no run named {run!r} in the workspace (runs/{run})")
        config = load(folder / "config.toml")
        with self._job():
            yield from self._joining(train_verb.train_runs([config], str(folder), self.stop_event))

    def stop(self) -> str:
        """Ask the running training loop to stop after this step (it saves a checkpoint)."""
        if not self.running.locked():
            return "no training is running"
        self.stop_event.set()
        return "stopping after the current step; a checkpoint is saved and the run can be resumed"

    def _job(self):
        """Exactly one training at a time; a fresh stop flag for it."""
        import contextlib

        @contextlib.contextmanager
        def job():
            if not self.running.acquire(blocking=False):
                raise StudioError("a training run is already going; stop it or wait for it to finish")
            self.stop_event = threading.Event()
            try:
                yield
            finally:
                self.running.release()
        return job()

    def _joining(self, events: Iterator[Event]) -> Iterator[Event]:
        """Pass events on; when the run is done, add its LoRA (or native file) to the collection."""
        for event in events:
            if not isinstance(event, Done):
                yield event
                continue
            for warning in event.result.warnings:
                yield Message(warning, "warning")
            result = event.result.runs[0].result
            joined = result.lora_path or (result.adapter_path if result.status == "done" else None)
            if joined is not None:
                line = self.studio.import_paths([Path(joined)])
                yield Message(f"{Path(joined).name} joined the collection: {line}")
            yield Done(result)

    # -- runs -----------------------------------------------------------------------------------

    def run_folder(self, name: str) -> Path:
        check_name(name)
        return self.workspace.folder("runs") / name

    def runs(self) -> list[Any]:
        """Every run of the workspace, newest first (`studio.train.runs.list_runs`)."""
        from studio.train.runs import list_runs

        return [run for run in list_runs(self.workspace.folder("runs")) if self.workspace.contains(run.folder)]

    def run(self, name: str) -> RunView:
        """One run's info, loss history and samples (read from its folder: also after a restart)."""
        from studio.train.runs import loss_history, run_info

        folder = self.run_folder(name)
        if not (folder / "config.toml").is_file():
            raise StudioError(f"no run named {name!r} in the workspace (runs/{name})")
        info = run_info(folder)
        history = loss_history(folder)
        samples = [(path, _sample_label(path)) for path in info.samples]
        return RunView(info, history["loss"], history["val_loss"], samples)

    def export_run(self, form: ExportRunForm) -> tuple[Path, Any]:
        """A run's best or final adapter as a standard LoRA in ``exports/`` (`studio.verbs.export`),
        added to the collection; the file and the export's result (its error stated)."""
        from studio.app.services import free_file
        from studio.verbs import export as export_verb

        view = self.run(form.run)
        source = view.info.best_path if form.checkpoint == "best" else view.info.adapter_path
        if source is None:
            raise StudioError(f"run {form.run!r} has no {form.checkpoint} adapter yet"
                              + (" (it saves one at its first validation)" if form.checkpoint == "best" else " (it has not finished)"))
        output = free_file(self.workspace.folder("exports") / f"{form.run}.{form.checkpoint}.safetensors")
        result = export_verb.run(export_verb.ExportRequest(str(source), str(output), form.format, base=self.studio.tree_base()))
        self.studio.import_paths([result.path])
        return result.path, result


def _family_default(family: str, what: str) -> Any:
    from studio.adapters import registry

    return getattr(registry.family(family).defaults, what)


def _refuse_existing(target: Path) -> None:
    if target.exists():
        raise WorkspaceError(f"{target.name} exists already in the dataset; nothing was moved")


def _folder_text(name: str, repeats: int) -> str:
    """"5_mychar: 5 repeats, trigger word `mychar`" (kohya's N_name), "top folder: 1 repeat"."""
    text = f"{name or 'top folder'}: {repeats} repeat{'s' if repeats != 1 else ''}"
    match = REPEAT_FOLDER.match(name)
    return text + (f", trigger word `{match.group(2)}`" if match else "")


def _trigger_of(folders: dict[str, int], captions: list[str]) -> str:
    """The dataset's trigger word (put before every caption): the name part the kohya folders
    share, else a first caption tag most captions share; '' when there is none (folders with
    different names keep their own words, which their captions carry)."""
    names = {match.group(2) for match in map(REPEAT_FOLDER.match, folders) if match}
    if len(names) == 1 and "" not in folders:
        return names.pop()
    firsts = Counter(caption.split(",")[0].strip() for caption in captions if caption.strip())
    if firsts:
        tag, count = firsts.most_common(1)[0]
        if count >= TRIGGER_SHARE * len(captions):
            return tag
    return ""


def _sample_label(path: Path) -> str:
    """'base (no adapter), seed 0' or 'step 30, seed 0' from a sample file's name."""
    parts = path.stem.split("-")
    seed = parts[-1].removeprefix("seed")
    if parts[0] == "base":
        return f"base (no adapter), seed {seed}"
    return f"step {int(parts[1])}, seed {seed}" if len(parts) > 1 and parts[1].isdigit() else path.stem
