"""What the app's buttons call: the studio's verbs (`studio.verbs`) over one workspace and one base.

Nothing here imports gradio and nothing here holds studio logic: reading files is
`studio.collection.load_collection` (through `studio.app.library`), compression `studio.verbs.compress`,
datasets and training `studio.app.training` (the dataset and train verbs), generation
`studio.app.generation` (the generate verb, through the engine's request batcher). This module
keeps the server-side state those calls share (the base, its engine, the collection), saves it in
the workspace (``state.json``) so that a restart finds it again, and turns a form into a verb's
request after checking what a web client may name: adapters by registered name only, files
inside the workspace only.
"""

from __future__ import annotations

import shutil
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from studio.adapters.base import AdapterBase
from studio.collection import ADAPTER_SUFFIXES
from studio.engine import Engine, check_name, get_engine
from studio.engine.batcher import BatcherConfig
from studio.errors import BaseNotFoundError, ConfigError, StudioError
from studio.events import Done, Event, Message
from studio.app.forms import BaseForm, CompressForm, FolderForm
from studio.app.library import KIND_MEMBER, Entry, Library, refused
from studio.app.workspace import State, Workspace, WorkspaceError
from studio.fileio import atomic_path, write_text
from studio.verbs import compress as compress_verb
from studio.verbs.generate import SERVING_MAX_SECONDS, Limits

COLLECTION_STEM = "collection"
REPORT_SUFFIX = ".report.json"


@dataclass
class AppConfig:
    """How the app starts: its base, workspace, the zoo imported into a new workspace, limits."""

    base: str | None = None  # None: the workspace's last base, else the world
    workspace: Path = Path("runs/studio-workspace")
    zoo: Path | None = None  # None: the world's loras when the base is the world
    device: str | None = None
    dtype: str = "auto"
    max_file_size: int = 256 << 20
    preload: bool = True
    limits: Limits = field(default_factory=lambda: Limits(max_seconds=SERVING_MAX_SECONDS))  # generation caps: the server's, not a client's
    batcher: BatcherConfig | None = None  # how the engine gathers concurrent clients' requests (None: its defaults)


@dataclass
class Report:
    """What an action did, in lines a user reads (the collection's summary shows them)."""

    lines: list[str] = field(default_factory=list)


class Removed(AdapterBase):
    """What a removed adapter's name maps to in the engine: using it is a clear error. Names are
    never unregistered while the app runs, so a name can never fall through to a file."""

    def __init__(self, name: str):
        self.name = name

    def layers(self) -> list[str]:
        raise StudioError(f"adapter {self.name!r} was removed from the collection; pick another")

    def delta(self, layer: str):
        raise StudioError(f"adapter {self.name!r} was removed from the collection; pick another")


class Studio:
    """The app's server-side state, shared by every browser tab and API client.

    One lock guards the state; the engine's own lock serializes its pipeline; the queue runs one
    long job (compress, train) at a time.
    """

    def __init__(self, config: AppConfig):
        from studio.app.generation import Generation
        from studio.app.training import Training

        self.config = config
        self.workspace = Workspace.create(config.workspace)
        self.lock = threading.RLock()
        self.base: str = config.base or "world"
        self.engine: Engine | None = None
        self.base_error: str | None = None
        self.library = Library()
        self.compressed: dict[str, Any] | None = None  # the last compress's report (as `studio compress --json`)
        self.notes: list[str] = []  # what the start restored or left out
        self.training = Training(self)
        self.generation = Generation(self)

    # -- start and state ------------------------------------------------------------------------

    def start(self) -> None:
        """Restore the workspace (base, files, collections) or, for a new one, import the zoo."""
        if not self.config.preload:
            return
        try:
            state = self.workspace.read_state()
        except StudioError as error:
            state, self.notes = None, [str(error)]
        self.base = self.config.base or (state.base if state else None) or "world"
        try:
            self.load_base(self.base, save=False)
        except StudioError as error:
            self.base_error = str(error)
        if state is None:
            zoo = self.zoo_folder()
            if zoo is not None and zoo.is_dir() and any(zoo.glob("*.safetensors")):
                self.import_zoo()
        else:
            self._restore(state)
        self.save_state()

    def _restore(self, state: State) -> None:
        with self.lock:
            for text in state.sources:
                path = self.workspace.restored_path(text)
                if self._restorable(path):
                    self.library.add_file(path, self.tree_base())
                else:
                    self.notes.append(f"{text}: no longer in the workspace; left out")
            for i, text in enumerate(state.collections):
                path = self.workspace.restored_path(text)
                if path.is_file() and self.workspace.contains(path):
                    self._add_collection(path, latest=i == len(state.collections) - 1 and path.stem.startswith(COLLECTION_STEM))
                else:
                    self.notes.append(f"{text}: no longer in the workspace; left out")
            self._register()
        self.compressed = self._saved_report()
        self.notes.append(f"restored {len(state.sources)} adapter files and {len(state.collections)} compressed collections")

    def _restorable(self, path: Path) -> bool:
        """A saved source comes back if it is still there, inside the workspace, the zoo or the
        world's LoRAs (imported while the world was the base, kept when another base is picked)."""
        from studio.bases import world_dir

        folders = [f for f in (self.zoo_folder(), world_dir() / "loras") if f is not None]
        inside = self.workspace.contains(path) or any(path.resolve().is_relative_to(f.resolve()) for f in folders)
        return inside and path.is_file()

    def save_state(self) -> None:
        with self.lock:
            collections = [p for p in self.library.collections if p != self.library.latest]
            if self.library.latest in self.library.collections:
                collections.append(self.library.latest)
            state = State(self.base, [self.workspace.stored_path(p) for p in self.library.files],
                          [self.workspace.stored_path(p) for p in collections])
        self.workspace.write_state(state)

    # -- base -----------------------------------------------------------------------------------

    def zoo_folder(self) -> Path | None:
        """The folder 'import the zoo' reads (server configuration, not user input)."""
        if self.config.zoo is not None:
            return Path(self.config.zoo)
        from studio.bases import world_dir

        return world_dir() / "loras" if self.base == "world" else None

    def load_base(self, base: str, save: bool = True) -> str:
        """Make BASE the live pipeline; the collection is read again against it."""
        engine = get_engine(base, self.config.device, self.config.dtype)
        engine.batcher(self.config.batcher)
        with self.lock:
            old = self.engine
            self.base, self.engine, self.base_error = base, engine, None
            if old is not None and old is not engine:
                for name in old.names():
                    old.register(name, Removed(name))
            self.library.reread(self.tree_base())
            self._register()
        if save:
            self.save_state()
        return base

    def pick_base(self, form: BaseForm) -> str:
        """The Base picker: the world, a folder or file inside the workspace, or a hub id."""
        return self.load_base(resolve_base(self.workspace, form.kind, form.value))

    def base_form(self) -> BaseForm:
        """The Base picker's values for the live base (so that a restart shows what it restored);
        a path outside the workspace (given on the command line) leaves the field empty."""
        from studio.bases import is_hub_id

        if self.base == "world":
            return BaseForm("world")
        path = Path(self.base)
        if path.exists():
            return BaseForm("file" if path.is_file() else "folder", self.workspace.relative(path) if self.workspace.contains(path) else "")
        return BaseForm("hub", self.base) if is_hub_id(self.base) else BaseForm("world")

    def require_engine(self) -> Engine:
        if self.engine is None:
            raise StudioError(f"no base is loaded ({self.base_error or 'pick one in the Base tab'})")
        return self.engine

    def tree_base(self) -> str | None:
        """What adapters are checked against: the base (None for hub ids: the reader's best guess)."""
        from studio.bases import is_hub_id

        return None if is_hub_id(self.base) else self.base

    def base_label(self) -> str:
        return compress_verb.base_label(self.base)

    def base_info(self) -> dict[str, Any]:
        """What the Base tab shows: the family, denoiser, guidance, native size, adapter components."""
        from studio.bases.conditioning import native_resolution

        engine = self.engine
        info = {"base": self.base_label(), "loaded": engine is not None, "error": self.base_error,
                "adapters": sum(1 for e in self.library.entries() if e.ok)}
        if engine is not None:
            info.update({"family": engine.base.label, "denoiser": engine.base.denoiser, "guidance": engine.guidance_mode,
                         "native size": native_resolution(engine.pipe), "adapter components": list(engine.base.adapter_components),
                         "device": str(engine.config.resolved_device()), "dtype": str(engine.config.resolved_dtype(engine.base.id))})
        return info

    def bases_in_workspace(self) -> list[str]:
        """Diffusers folders and .safetensors checkpoints under ``bases/`` (for the picker)."""
        found = []
        for path in sorted(self.workspace.folder("bases").iterdir()):
            if not self.workspace.contains(path):
                continue
            if (path / "model_index.json").is_file() or (path.is_file() and path.suffix == ".safetensors"):
                found.append(self.workspace.relative(path))
        return found

    def base_for(self, arch: str) -> BaseForm | None:
        """A base of the workspace for architecture ``arch`` (a refused file's "switch base"), else None."""
        from studio.bases import module_tree

        if arch == "world":
            return BaseForm("world")
        for relative in self.bases_in_workspace():
            try:
                if module_tree(str(self.workspace.root / relative)).arch == arch:
                    return BaseForm("folder" if (self.workspace.root / relative).is_dir() else "file", relative)
            except StudioError:
                continue
        return None

    # -- collection -----------------------------------------------------------------------------

    def _register(self) -> None:
        """Make the engine's names match the collection (removed names answer with an error)."""
        engine = self.engine
        if engine is None:
            return
        usable = self.library.usable()
        for name in set(engine.names()) - set(usable):
            engine.register(name, Removed(name))
        for name, adapter in usable.items():
            engine.register(name, adapter)

    def names(self) -> list[str]:
        """Every adapter name generation accepts (collection files and compressed members)."""
        return sorted(self.library.usable())

    def import_files(self, uploads: list[str | Path]) -> Report:
        """Copy uploaded files into the workspace: LoRAs and trained adapters into the collection,
        compressed collections as their members."""
        from studio.subspace import is_collection_file

        report = Report()
        with self.lock:
            for upload in uploads:
                source = Path(upload)
                if source.stat().st_size > self.config.max_file_size:
                    report.lines.append(f"{source.name}: {source.stat().st_size:,} bytes, over the cap of {self.config.max_file_size:,}; refused")
                    continue
                collection = is_collection_file(source)
                stored = self.workspace.store_upload(source, "compressed" if collection else "adapters")
                report.lines += [stored.note] if stored.note else []
                report.lines.append(self._add_collection(stored.path) if collection else said(self.library.add_file(stored.path, self.tree_base())))
            self._register()
        self.save_state()
        return report

    def import_paths(self, paths: list[Path]) -> str:
        """Add files the studio wrote into the workspace (a run's LoRA, an export); what they are."""
        with self.lock:
            lines = [said(self.library.add_file(path, self.tree_base())) for path in paths]
            self._register()
        self.save_state()
        return "; ".join(lines)

    def import_folder(self, form: FolderForm) -> Report:
        """Add the adapter files of a folder inside the workspace (links leading out are refused unread)."""
        from studio.subspace import is_collection_file

        folder = self.workspace.resolve(form.folder)
        if not folder.is_dir():
            raise WorkspaceError(f"{form.folder!r} is a file; name a folder (or upload the file)")
        listing = self.workspace.listing(folder, tuple(ADAPTER_SUFFIXES))
        if not listing.files and not listing.refused:
            raise WorkspaceError(f"{form.folder!r} holds no adapter files (.safetensors)")
        report = Report()
        with self.lock:
            for path, why in listing.refused:
                self.library.files[path.absolute()] = refused(path, why)
                report.lines.append(why)
            for path in listing.files:
                report.lines.append(self._add_collection(path) if is_collection_file(path) else said(self.library.add_file(path, self.tree_base())))
            self._register()
        self.save_state()
        return report

    def import_zoo(self) -> Report:
        """Add the configured zoo's files (the embedded world's LoRAs); says what was new."""
        zoo = self.zoo_folder()
        if zoo is None:
            raise StudioError("no zoo to import: the zoo is the embedded world's LoRAs and the base is not the world; "
                              "import a folder of the workspace instead")
        if not zoo.is_dir():
            raise StudioError(f"no zoo to import: the folder {zoo.name} is missing")
        files = sorted(p for p in zoo.iterdir() if p.is_file() and p.suffix.lower() in ADAPTER_SUFFIXES)
        with self.lock:
            known = set(self.library.files)
            for path in files:
                self.library.add_file(path, self.tree_base())
            self._register()
        self.save_state()
        added = sum(1 for p in files if p.absolute() not in known)
        return Report([f"the zoo ({zoo.name}, {len(files)} files): {added} added, {len(files) - added} already in the collection"])

    def remove(self, name: str) -> Report:
        """Take one adapter (by name) out of the collection (a compressed member: its whole collection)."""
        check_name(name)
        with self.lock:
            entry = self.library.remove(name)
            self._register()
        self.save_state()
        what = f"the compressed collection {entry.collection.name}" if entry.collection is not None else entry.name
        return Report([f"removed {what} from the collection (the file stays in the workspace)"])

    def entry(self, name: str) -> Entry:
        check_name(name)
        with self.lock:
            return self.library.find(name)

    def _add_collection(self, path: Path, latest: bool = False) -> str:
        try:
            members = self.library.add_collection(path, latest)
        except StudioError as error:
            self.library.files[path.absolute()] = refused(path, str(error))
            return f"{path.name}: refused: {error}"
        names = ", ".join(m.name for m in members[:3]) + (", ..." if len(members) > 3 else "")
        return f"{path.name}: a compressed collection of {len(members)} adapters; in Generate as {names}"

    # -- subspace ---------------------------------------------------------------------------

    def compress(self, form: CompressForm) -> Iterator[Event]:
        """`studio.verbs.compress` on the collection's LoRA files in memory; the members join as
        NAME.eigen, the report is kept beside the file, the download is one zip."""
        from studio.subspace import held_sources

        with self.lock:
            adapters = [e.adapter for e in self.library.files.values() if e.ok and e.kind != KIND_MEMBER]
        if not adapters:
            raise StudioError("the collection is empty: import adapters first")
        output = free_file(self.workspace.folder("compressed") / f"{COLLECTION_STEM}.safetensors")
        exports = self.workspace.folder("cache") / f".{output.stem}-exports"
        shutil.rmtree(exports, ignore_errors=True)
        yield Message(f"compressing {len(adapters)} adapters ({_size_text(form)}) into {output.name}")
        request = compress_verb.CompressRequest(
            paths=[], output=str(output), k=form.k if form.size_by == "k" else None, energy=form.energy if form.size_by == "energy" else None,
            augment=form.augment, base=self.base, export_dir=str(exports), export_format=form.export_format)
        outcome = None
        for event in compress_verb.run(request, sources=held_sources(adapters)):
            if isinstance(event, Done):
                outcome = event.result
            else:
                yield event
        summary = self._keep_compress(outcome, exports)
        for warning in outcome.warnings:
            yield Message(warning, "warning")
        yield Done(summary)

    def _keep_compress(self, outcome, exports: Path) -> dict[str, Any]:
        """Register the members, write the report and the zip, forget the previous app compress."""
        summary = compress_report(outcome)
        summary["zip"] = write_zip(outcome, summary, exports).name
        shutil.rmtree(exports, ignore_errors=True)
        write_text(outcome.path.with_name(outcome.path.stem + REPORT_SUFFIX), _json(summary))
        with self.lock:
            previous = self.library.latest
            if previous is not None and previous != outcome.path.absolute():
                self.library.collections.pop(previous, None)
            self._add_collection(outcome.path, latest=True)
            self._register()
            self.compressed = summary
        self.save_state()
        return summary

    def _saved_report(self) -> dict[str, Any] | None:
        """The report of the latest compress, from beside its file (after a restart)."""
        import json

        latest = self.library.latest
        path = latest.with_name(latest.stem + REPORT_SUFFIX) if latest is not None else None
        if path is None or not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None


# ---------------------------------------------------------------- helpers composing verbs


def said(entry: Entry) -> str:
    """One line saying what an imported file is, or why it was refused."""
    info = entry.info
    if not entry.ok:
        return f"{Path(info.path).name}: refused: {info.error}"
    said_notes = ("studio-trained", "reconstructed from")
    notes = "; ".join(n.replace("warning: ", "⚠ ", 1) for n in info.notes if n.startswith("warning: ") or any(w in n for w in said_notes))
    rank = info.rank if not isinstance(info.rank, list) else f"{min(info.rank)}..{max(info.rank)}"
    return f"{Path(info.path).name}: {entry.kind} `{info.name}` ({info.format}, rank {rank}, {info.layers} layers)" + (f"; {notes}" if notes else "")


def compress_report(outcome) -> dict[str, Any]:
    """The compress verb's JSON (as `studio compress --json`) without server paths."""
    summary = outcome.as_json()
    summary.pop("path", None)
    summary["collection"] = outcome.path.name
    summary["exports"] = [f"{Path(p).stem}.reconstructed.safetensors" for p in outcome.exports]
    return summary


def write_zip(outcome, summary: dict[str, Any], exports: Path) -> Path:
    """One download: the collection, its report and every adapter reconstructed from it, named
    ``reconstructions/NAME.reconstructed.safetensors`` (their headers say so and carry the error)."""
    target = outcome.path.with_suffix(".zip")
    with atomic_path(target) as tmp:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as bundle:
            bundle.write(outcome.path, outcome.path.name)
            bundle.writestr(f"{outcome.path.stem}{REPORT_SUFFIX}", _json(summary))
            for path in outcome.exports:
                bundle.write(path, f"reconstructions/{Path(path).stem}.reconstructed.safetensors")
    return target


def free_file(target: Path) -> Path:
    """``target`` or the first ``stem-N.suffix`` not taken (outputs never replace a file)."""
    from studio.app.workspace import _free_name

    return _free_name(target)


def _json(value: Any) -> str:
    import json

    return json.dumps(value, indent=1, default=str)


def resolve_base(workspace: Workspace, kind: str, value: str = "") -> str:
    """A BASE string from the picker: paths must lie in the workspace; hub ids need a network."""
    from studio.bases import is_hub_id, is_offline

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


def _size_text(form: CompressForm) -> str:
    return f"K = {form.k}" if form.size_by == "k" else f"energy {form.energy:g}"
