"""What the app's buttons call: the studio's verbs (`studio.verbs`) over one workspace and one base.

Nothing here imports gradio and nothing here holds studio logic: loading is
`studio.collection.load_collection`, compression (and the exports of every compressed adapter)
`studio.verbs.compress`, style datasets `studio.verbs.dataset`, training `studio.verbs.train`,
generation `studio.verbs.generate` (the same checks and caps as `studio generate`). This module
only keeps the server-side state those calls share (the base, its engine, the collection) and
turns a form (names, workspace paths) into a verb's request after checking what a web client may
name: adapters by registered name only, files inside the workspace only.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

from studio.collection import AdapterInfo, expand_paths, load_collection
from studio.engine import Engine, GeneratedImage, GenerateRequest, check_name, get_engine
from studio.errors import BaseNotFoundError, ConfigError, StudioError
from studio.events import Done, Event, Message
from studio.app.workspace import Workspace, WorkspaceError, extract_dataset_zip
from studio.verbs import compress as compress_verb
from studio.verbs import dataset as dataset_verb
from studio.verbs import generate as generate_verb
from studio.verbs import train as train_verb
from studio.verbs.generate import SERVING_MAX_SECONDS, Limits

BaseKind = Literal["world", "folder", "file", "hub"]
GenerateMode = Literal["mix", "per_image", "grid"]
COMPRESSED_SUFFIX = ".eigen"


@dataclass
class AppConfig:
    """How the app starts: its base, workspace, the zoo imported at start, limits."""

    base: str = "world"
    workspace: Path = Path("runs/studio-workspace")
    zoo: Path | None = None  # None: the world's loras when base is world
    device: str | None = None
    dtype: str = "auto"
    max_file_size: int = 256 << 20
    preload: bool = True
    limits: Limits = field(default_factory=lambda: Limits(max_seconds=SERVING_MAX_SECONDS))  # generation caps: the server's, not a client's


@dataclass
class CompressForm:
    """The Subspace tab's form: K per layer or an energy threshold, and the export layout."""

    k: int | None = None
    energy: float | None = None
    augment: int = 0
    export_format: Literal["kohya", "diffusers"] = "kohya"


@dataclass
class TrainForm:
    """The Train tab's form; becomes a `studio.train.TrainConfig` in the workspace."""

    name: str
    dataset: str  # workspace-relative folder
    family: str = "lora"
    knobs: dict[str, Any] = field(default_factory=dict)
    steps: int = 50
    learning_rate: float = 1e-4
    batch_size: int = 1
    resolution: int = 0
    trigger_word: str = ""
    sample_every: int = 0
    sample_prompt: str = ""
    checkpoint_every: int = 0
    seed: int = 0


@dataclass
class GenerateForm:
    """The Generate tab's form: adapters by registered name, with optional weights."""

    prompt: str
    adapters: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    mode: GenerateMode = "mix"
    negative_prompt: str = ""
    strength: float = 1.0
    seed: int = 0
    steps: int = 20
    guidance: float | None = None
    batch: int = 1
    width: int | None = None
    height: int | None = None
    scheduler: str | None = None


@dataclass
class Generated:
    """Saved PNGs (parameters inside each) and their parameter texts."""

    paths: list[Path]
    infotexts: list[str]
    sizes: list[tuple[int, int]]
    seconds: float


class Studio:
    """The app's server-side state, shared by every browser tab and API client.

    One lock guards the state; the engine's own lock serializes every switch-and-generate on
    its pipeline, and the queue runs one long job (compress, train) at a time.
    """

    def __init__(self, config: AppConfig):
        self.config = config
        self.workspace = Workspace.create(config.workspace)
        self.lock = threading.RLock()
        self.base: str = config.base
        self.engine: Engine | None = None
        self.base_error: str | None = None
        self.sources: list[Path] = []
        self.infos: list[AdapterInfo] = []
        self.adapters: dict[str, Any] = {}
        self.compressed: compress_verb.CompressOutcome | None = None
        self.stop_event = threading.Event()

    # -- base -------------------------------------------------------------------------------

    def start(self) -> None:
        """Load the configured base and import the zoo (the embedded world's, by default)."""
        if not self.config.preload:
            return
        try:
            self.load_base(self.config.base)
        except StudioError as error:
            self.base_error = str(error)
        zoo = self.zoo_folder()
        if zoo is not None and zoo.is_dir() and any(zoo.glob("*.safetensors")):
            self.import_zoo()

    def zoo_folder(self) -> Path | None:
        """The folder the 'import the zoo' button reads (server configuration, not user input)."""
        if self.config.zoo is not None:
            return Path(self.config.zoo)
        from studio.bases import world_dir

        return world_dir() / "loras" if self.base == "world" else None

    def load_base(self, base: str) -> str:
        """Make BASE the live pipeline; the collection is re-checked against it."""
        engine = get_engine(base, self.config.device, self.config.dtype)
        with self.lock:
            self.base, self.engine, self.base_error = base, engine, None
            if self.sources:
                self._reload()
        return base

    def pick_base(self, kind: BaseKind, value: str = "") -> str:
        """The Base picker: the world, a folder or file inside the workspace, or a hub id."""
        return self.load_base(resolve_base(self.workspace, kind, value))

    def require_engine(self) -> Engine:
        if self.engine is None:
            raise StudioError(f"no base is loaded ({self.base_error or 'pick one in the Base tab'})")
        return self.engine

    # -- collection -------------------------------------------------------------------------

    def import_files(self, uploads: list[str | Path]) -> list[AdapterInfo]:
        """Copy uploaded adapter files into the workspace and add them to the collection."""
        stored = [self.workspace.store_upload(upload, "adapters") for upload in uploads]
        return self._add(stored)

    def import_folder(self, relative: str) -> list[AdapterInfo]:
        """Add the adapter files of a folder inside the workspace."""
        return self._add(expand_paths([self.workspace.resolve(relative)]))

    def import_zoo(self) -> list[AdapterInfo]:
        """Add the configured zoo's files (the embedded world's LoRAs)."""
        zoo = self.zoo_folder()
        if zoo is None or not zoo.is_dir():
            raise StudioError(f"no zoo to import: {zoo or 'the base is not the world'} is missing")
        return self._add(expand_paths([zoo]))

    def remove(self, name: str) -> list[AdapterInfo]:
        """Take one adapter (by name) out of the collection."""
        check_name(name)
        with self.lock:
            paths = [Path(i.path) for i in self.infos if i.name == name]
            if not paths:
                raise StudioError(f"no adapter named {name!r} in the collection")
            self.sources = [p for p in self.sources if p not in paths]
            self._reload()
            return self.infos

    def _add(self, files: list[Path]) -> list[AdapterInfo]:
        with self.lock:
            known = {p.resolve() for p in self.sources}
            self.sources += [f for f in files if f.resolve() not in known]
            self._reload()
            return self.infos

    def _reload(self) -> None:
        """Load every source against the live base; register the good ones in the engine."""
        engine = self.engine
        if not self.sources:
            self.infos, new = [], {}
        else:
            collection = load_collection(self.sources, base=_tree_base(self.base, engine))
            self.infos, new = collection.infos, dict(collection.adapters)
            for info in self.infos:
                if info.error is None and info.name in new:
                    try:
                        check_name(info.name)
                    except StudioError as error:
                        info.error, _ = str(error), new.pop(info.name)
        if engine is not None:
            for name in set(self.adapters) - set(new):
                engine.unregister(name)
            for name, adapter in new.items():
                engine.register(name, adapter)
        self.adapters = new

    def names(self) -> list[str]:
        """Every adapter name generation accepts (collection, compressed copies)."""
        return self.engine.names() if self.engine is not None else sorted(self.adapters)

    # -- subspace ---------------------------------------------------------------------------

    def compress(self, form: CompressForm) -> Iterator[Event]:
        """`studio.verbs.compress` on the collection in memory, every adapter exported back as a LoRA."""
        from studio.subspace import held_sources

        with self.lock:
            adapters = list(self.adapters.values())
        if not adapters:
            raise StudioError("the collection is empty: import adapters first")
        yield Message(f"compressing {len(adapters)} adapters ({_size_text(form)})")
        request = compress_verb.CompressRequest(
            paths=[], output=str(self.workspace.folder("compressed") / "collection.safetensors"), k=form.k, energy=form.energy,
            augment=form.augment, base=self.base, export_dir=str(self.workspace.folder("exports")),
            export_format=form.export_format)
        outcome = None
        for event in compress_verb.run(request, sources=held_sources(adapters)):
            if isinstance(event, Done):
                outcome = event.result
            else:
                yield event
        for warning in outcome.warnings:
            yield Message(warning, "warning")
        self._register_compressed(outcome.result.collection)
        self.compressed = outcome
        yield Done(outcome)

    def _register_compressed(self, collection) -> None:
        """Each compressed adapter joins generation as ``NAME.eigen`` (to compare with its original)."""
        engine = self.engine
        if engine is None:
            return
        for name in collection.names:
            engine.register(f"{name}{COMPRESSED_SUFFIX}", collection.adapter(name))

    def base_label(self) -> str:
        return compress_verb.base_label(self.base)

    # -- train ------------------------------------------------------------------------------

    def style_dataset(self, style: str, count: int = 16, seed: int = 0, size: int = 64) -> Path:
        """A world style's images and captions as a dataset folder in the workspace (`studio.verbs.dataset`)."""
        check_name(style)
        target = self.workspace.folder("datasets") / f"world-{style}"
        return dataset_verb.run(dataset_verb.DatasetRequest(style, str(target), count, seed, size)).folder

    def upload_dataset(self, archive: str | Path, name: str) -> Path:
        """Extract an uploaded zip of images + captions (safely) as a dataset folder."""
        check_name(name)
        target = self.workspace.folder("datasets") / name
        extract_dataset_zip(archive, target)
        return target

    def train(self, form: TrainForm) -> Iterator[Event]:
        """`studio.verbs.train` on a workspace dataset; the exported LoRA joins the collection."""
        config = self.train_config(form)
        self.stop_event = threading.Event()
        yield from self._joining(train_verb.train_runs([config], None, self.stop_event))

    def resume(self, name: str) -> Iterator[Event]:
        """Continue a stopped run from its last checkpoint (its saved config must still hold)."""
        from studio.train import load_config

        out = self.run_folder(name)
        if not (out / "config.toml").exists():
            raise StudioError(f"no run named {name!r} to resume in the workspace")
        self.stop_event = threading.Event()
        yield from self._joining(train_verb.train_runs([load_config(out / "config.toml")], str(out), self.stop_event))

    def stop(self) -> str:
        """Ask the running training loop to stop after this step (it saves a checkpoint)."""
        self.stop_event.set()
        return "stopping after the current step; a checkpoint is saved"

    def run_folder(self, name: str) -> Path:
        check_name(name)
        return self.workspace.folder("runs") / name

    def train_config(self, form: TrainForm):
        """The form as a TrainConfig whose data and outputs lie in the workspace."""
        from studio.train import TrainConfig

        data = self.workspace.resolve(form.dataset)
        if not data.is_dir():
            raise WorkspaceError(f"{form.dataset!r} is not a dataset folder in the workspace")
        knobs = dict(form.knobs)
        if knobs.get("collection"):  # eigenlora trains on a compressed collection of the workspace
            knobs["collection"] = str(self.workspace.resolve(str(knobs["collection"])))
        return TrainConfig(
            base=self.base, data=str(data), output_dir=str(self.run_folder(form.name)), family=form.family,
            adapter=knobs, name=form.name, steps=form.steps, learning_rate=form.learning_rate,
            batch_size=form.batch_size, resolution=form.resolution, trigger_word=form.trigger_word,
            sample_every=form.sample_every, sample_prompts=[form.sample_prompt] if form.sample_prompt else [],
            checkpoint_every=form.checkpoint_every, seed=form.seed, tensorboard=False,
        )

    def _joining(self, events: Iterator[Event]) -> Iterator[Event]:
        """Pass events on; when the run is done, add its exported LoRA to the collection and end
        with the run's `TrainResult`."""
        for event in events:
            if not isinstance(event, Done):
                yield event
                continue
            for warning in event.result.warnings:
                yield Message(warning, "warning")
            result = event.result.runs[0].result
            if result.lora_path is not None:
                self._add([Path(result.lora_path)])
                yield Message(f"{Path(result.lora_path).name} joined the collection")
            yield Done(result)

    # -- generate ---------------------------------------------------------------------------

    def switch(self, name: str, strength: float = 1.0) -> float:
        """Merge one registered adapter (or 'none') into the live weights; the seconds it took."""
        engine = self.require_engine()
        spec = _spec(name, strength) if name != "none" else "none"
        if name != "none" and name not in engine.names():
            raise StudioError(f"no adapter named {name!r} in the collection")
        started = time.perf_counter()
        engine.activate(spec)
        return time.perf_counter() - started

    def generate(self, form: GenerateForm) -> Generated:
        """Images (or one grid) saved as PNGs with their parameters, in the workspace
        (`studio.verbs.generate`: its checks, caps and memory estimate)."""
        engine = self.require_engine()
        done = generate_verb.run(self.request(form), engine, names=set(engine.names()))
        paths = self._save(done.images)
        return Generated(paths, [i.infotext for i in done.images], [i.image.size for i in done.images], done.seconds)

    def request(self, form: GenerateForm) -> GenerateRequest:
        """The form as a GenerateRequest over registered names (names that are paths refused)."""
        weights = list(form.weights) + [1.0] * (len(form.adapters) - len(form.weights))
        specs = [_spec(name, weight) if name != "none" else "none" for name, weight in zip(form.adapters, weights)]
        batch = len(specs) if form.mode == "per_image" else form.batch
        return GenerateRequest(
            prompt=form.prompt, base=self.base, negative_prompt=form.negative_prompt, adapters=specs,
            per_image=form.mode == "per_image", grid=form.mode == "grid", seed=form.seed, steps=form.steps,
            guidance=form.guidance, width=form.width, height=form.height, scheduler=form.scheduler, batch=batch,
            scale=form.strength, limits=self.config.limits,
        )

    def _save(self, images: list[GeneratedImage]) -> list[Path]:
        folder = self.workspace.folder("outputs")
        stamp = time.strftime("%Y%m%d-%H%M%S") + f"-{time.perf_counter_ns() % 1_000_000:06d}"
        return [image.save(folder / f"{stamp}-{i}.png") for i, image in enumerate(images)]

    def gallery(self, limit: int = 48) -> list[Path]:
        """The newest PNGs of the workspace's outputs."""
        pngs = sorted(self.workspace.folder("outputs").glob("*.png"), key=os.path.getmtime, reverse=True)
        return pngs[:limit]


# ---------------------------------------------------------------- helpers composing verbs


def resolve_base(workspace: Workspace, kind: BaseKind, value: str = "") -> str:
    """A BASE string from the picker: paths must lie in the workspace; hub ids need a network."""
    from studio.bases import is_offline, is_hub_id

    if kind == "world":
        return "world"
    if kind in ("folder", "file"):
        path = workspace.resolve(value)
        if kind == "folder" and not (path / "model_index.json").is_file():
            raise BaseNotFoundError(f"{value!r}: not a diffusers pipeline folder (no model_index.json)")
        if kind == "file" and (not path.is_file() or path.suffix != ".safetensors"):
            raise BaseNotFoundError(f"{value!r}: give a .safetensors checkpoint file (pickles are refused)")
        return str(path)
    if kind == "hub":
        if not is_hub_id(value.strip()):
            raise BaseNotFoundError(f"{value!r} is not a hub id (org/name)")
        if is_offline():
            raise BaseNotFoundError(f"{value!r}: the studio is offline (HF_HUB_OFFLINE); hub ids need a network")
        return value.strip()
    raise ConfigError(f"unknown base kind {kind!r}: world, folder, file or hub")


def world_styles() -> list[str]:
    """Names of the world's styles (for the Train tab's picker)."""
    return dataset_verb.world_styles()


FAMILY_LEARNING_RATES = {"lora": 1e-3, "superlora": 1e-2, "unilora": 2e-2, "eigenlora": 1e-2}  # as pipelines/quality.toml
WORKSPACE_COLLECTION = "compressed/collection.safetensors"


def family_defaults(family: str) -> dict[str, Any]:
    """A family's knobs with their defaults, as its config dataclass declares them (eigenlora:
    the workspace's compressed collection)."""
    from studio.adapters import registry

    defaults = {}
    for item in dataclasses.fields(registry.family(family).config_class):
        if item.default is not dataclasses.MISSING:
            defaults[item.name] = item.default
        elif item.default_factory is not dataclasses.MISSING:
            defaults[item.name] = item.default_factory()
    if "collection" in defaults:
        defaults["collection"] = WORKSPACE_COLLECTION
    return {key: list(value) if isinstance(value, tuple) else value for key, value in defaults.items()}


def family_learning_rate(family: str) -> float:
    """A learning rate that trains the family well on the world (pipelines/quality.toml)."""
    return FAMILY_LEARNING_RATES.get(family, 1e-3)


def families() -> list[str]:
    from studio.adapters import registry

    return sorted(registry.families())


def _spec(name: str, weight: float) -> str:
    """A registered name as a SPEC; names that could be paths are refused here."""
    return f"{check_name(name)}:{float(weight):g}"


def _tree_base(base: str, engine: Engine | None):
    """What to check adapters against: the base's tree (the live pipeline's for hub ids)."""
    from studio.bases import is_hub_id

    if engine is not None and is_hub_id(base):
        return None
    return base


def _size_text(form: CompressForm) -> str:
    return f"K = {form.k}" if form.k is not None else f"energy {form.energy}"
