"""The app's workspace: the one folder it reads user data from, serves files out of, and keeps its
state in, so that a restart finds everything again.

Every path a browser or API client names is a path *relative to the workspace*; ``../``,
absolute paths, drive letters and symlinks leading outside are refused with a clear message
(RELIABILITY 15), and a folder's listing leaves out (and names) links that lead outside. An
upload never replaces a different file of the same name: it is stored under a new name and the
message says so. Uploaded zips are extracted member by member with caps on count and size, so
a zip bomb or a ``../../etc/passwd`` member never touches the disk outside the workspace; kohya
``N_name/`` repeat folders are kept (repeats and trigger word). ``state.json`` remembers the base,
the imported files and the compressed collections.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

from studio.errors import StudioError
from studio.fileio import write_text

SAFE_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")
DATASET_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".txt")
REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")  # kohya: 5_noir style -> 5 repeats, trigger "noir style"
SUBFOLDERS = ("adapters", "datasets", "compressed", "exports", "runs", "outputs", "bases", "cache")
STATE_FILE = "state.json"
STATE_VERSION = 1
MAX_SAME_NAME = 1000
HASH_BLOCK = 1 << 20


class WorkspaceError(StudioError):
    """A path or upload the workspace refuses (outside it, too big, a bad name)."""


@dataclass(frozen=True)
class ZipLimits:
    """Caps on an uploaded dataset zip (checked before anything is written)."""

    max_members: int = 2_000
    max_member_bytes: int = 32 << 20
    max_total_bytes: int = 512 << 20


@dataclass
class State:
    """What the app restores at start: the base, the adapter files, the compressed collections.

    Paths inside the workspace are stored relative to it; the zoo's files (server configuration)
    absolute."""

    base: str | None = None
    sources: list[str] = field(default_factory=list)
    collections: list[str] = field(default_factory=list)
    version: int = STATE_VERSION


@dataclass
class Stored:
    """An upload stored in the workspace, and what happened to its name."""

    path: Path
    note: str = ""


@dataclass
class Listing:
    """The files of a folder inside the workspace, and those left out (links leading outside)."""

    files: list[Path]
    refused: list[tuple[Path, str]] = field(default_factory=list)


@dataclass(frozen=True)
class Workspace:
    """A folder with fixed subfolders; see the module docstring."""

    root: Path

    @classmethod
    def create(cls, root: str | Path) -> "Workspace":
        """Make the workspace and its subfolders; the root is resolved once, here."""
        workspace = cls(Path(root).expanduser().resolve())
        for sub in SUBFOLDERS:
            (workspace.root / sub).mkdir(parents=True, exist_ok=True)
        return workspace

    def folder(self, name: str) -> Path:
        """One of the fixed subfolders (``adapters``, ``datasets``, ...)."""
        return self.root / name

    def resolve(self, relative: str, must_exist: bool = True) -> Path:
        """A user-given path inside the workspace; anything that could leave it is refused."""
        text = (relative or "").strip()
        if not text:
            raise WorkspaceError("no path given: name a folder or file inside the workspace")
        if PurePosixPath(text).is_absolute() or PureWindowsPath(text).is_absolute() or PureWindowsPath(text).drive:
            raise WorkspaceError(f"{text!r}: absolute paths are not accepted; give a path inside the workspace {self.root}")
        if ".." in re.split(r"[\\/]", text):
            raise WorkspaceError(f"{text!r}: '..' is not accepted; give a path inside the workspace {self.root}")
        path = (self.root / text).resolve()
        if not path.is_relative_to(self.root):
            raise WorkspaceError(f"{text!r} leads outside the workspace {self.root} (through a link); refused")
        if must_exist and not path.exists():
            raise WorkspaceError(f"{text!r}: no such file or folder in the workspace {self.root}")
        return path

    def contains(self, path: str | Path) -> bool:
        """Whether a server-side path lies inside the workspace (after resolving links)."""
        return Path(path).resolve().is_relative_to(self.root)

    def relative(self, path: str | Path) -> str:
        """A workspace path as the user sees it (relative, forward slashes)."""
        return Path(path).resolve().relative_to(self.root).as_posix()

    def listing(self, folder: Path, suffixes: tuple[str, ...]) -> Listing:
        """The files directly in ``folder`` with one of ``suffixes``; a link leading out of the
        workspace is left out unread and named in ``refused``."""
        found = Listing([])
        for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in suffixes):
            if not self.contains(path):
                found.refused.append((path, f"{self.relative_name(path)}: a link leading outside the workspace; not read"))
            elif path.is_file():
                found.files.append(path)
        return found

    def relative_name(self, path: Path) -> str:
        """A path inside the workspace as the user typed it, without following links."""
        return path.absolute().relative_to(self.root).as_posix() if path.absolute().is_relative_to(self.root) else path.name

    def store_upload(self, upload: str | Path, subfolder: str) -> Stored:
        """Copy an uploaded temp file into ``subfolder`` under a safe version of its own name; a
        different file of that name already there is never replaced (the upload gets ``-1``, ...)."""
        source = Path(upload)
        name = safe_file_name(source.name)
        target = self.folder(subfolder) / name
        if target.exists() and target.resolve() == source.resolve():
            return Stored(target)
        if target.exists() and same_bytes(source, target):
            return Stored(target, f"{name} is already in the workspace (same bytes); not copied again")
        free = _free_name(target)
        shutil.copyfile(source, free)
        note = "" if free == target else f"a different file named {name} is already in the workspace; the upload is stored as {free.name}"
        return Stored(free, note)

    # -- state --------------------------------------------------------------------------------

    def read_state(self) -> State | None:
        """The saved state, or None for a new workspace (an unreadable state file is an error)."""
        path = self.root / STATE_FILE
        if not path.exists():
            return None
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
            return State(base=values.get("base"), sources=[str(s) for s in values.get("sources", [])],
                         collections=[str(c) for c in values.get("collections", [])])
        except (OSError, ValueError, TypeError, AttributeError) as error:
            raise WorkspaceError(f"{path}: the app's saved state cannot be read ({error}); move it away to start afresh") from error

    def write_state(self, state: State) -> None:
        write_text(self.root / STATE_FILE, json.dumps(asdict(state), indent=1))

    def stored_path(self, path: Path) -> str:
        """How state.json names a file: relative inside the workspace, else absolute."""
        return self.relative(path) if self.contains(path) else str(Path(path).resolve())

    def restored_path(self, text: str) -> Path:
        """A path from state.json back as a path (relative ones inside the workspace)."""
        path = Path(text)
        return path if path.is_absolute() else self.root / path


def safe_file_name(name: str) -> str:
    """A file name with anything that could be a path or odd character replaced by '_'."""
    base = PureWindowsPath(PurePosixPath(name).name).name
    cleaned = re.sub(r"[^A-Za-z0-9_.\-]", "_", base).lstrip("._-")
    if not cleaned or not SAFE_FILE_NAME.fullmatch(cleaned):
        raise WorkspaceError(f"file name {name!r} cannot be used (letters, digits, '_', '-', '.' only)")
    return cleaned


def same_bytes(first: Path, second: Path) -> bool:
    """Whether two files hold the same bytes (size first, then SHA-256)."""
    if first.stat().st_size != second.stat().st_size:
        return False
    return _sha256(first) == _sha256(second)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(HASH_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def _free_name(target: Path) -> Path:
    """``target``, or ``stem-1.suffix``, ``stem-2.suffix``, ... : the first name not taken."""
    if not target.exists():
        return target
    stem, suffix = _split_suffix(target.name)
    for n in range(1, MAX_SAME_NAME):
        candidate = target.with_name(f"{stem}-{n}{suffix}")
        if not candidate.exists():
            return candidate
    raise WorkspaceError(f"{target.name}: {MAX_SAME_NAME} files of that name are in the workspace already; rename the upload")


def _split_suffix(name: str) -> tuple[str, str]:
    """('style', '.safetensors'), ('noir.lora', '.safetensors'): only the last suffix moves."""
    stem, dot, suffix = name.rpartition(".")
    return (stem, dot + suffix) if stem else (name, "")


# ---------------------------------------------------------------- dataset zips


@dataclass
class Extracted:
    """What a dataset zip became: the files written and the kohya repeat folders (name -> repeats)."""

    files: list[Path]
    folders: dict[str, int]


def extract_dataset_zip(archive: str | Path, target: Path, limits: ZipLimits = ZipLimits(), repeats: int = 1,
                        trigger: str = "") -> Extracted:
    """Extract the images and captions of a zip into the new folder ``target``, refusing unsafe members.

    Members inside a kohya ``N_name/`` folder (at any depth) keep that folder, so its repeats and
    trigger word survive; the others go to the top (or, with ``repeats`` > 1 or a ``trigger``,
    into a ``repeats_trigger/`` folder of their own). Members with absolute paths or ``..`` parts
    are refused outright (the whole zip: it was made to attack); members that are not images or
    ``.txt`` captions are skipped; the member count, each member's size and the total are capped
    before a byte is written; a second member of one name in one folder is refused. The files
    are written into a hidden folder beside ``target`` and renamed into place when all is well.
    """
    if target.exists():
        raise WorkspaceError(f"{target.name}: a dataset of that name exists already; choose another name")
    try:
        bundle = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as error:
        raise WorkspaceError(f"{Path(archive).name}: not a readable zip file ({error})") from error
    flat = f"{repeats}_{safe_folder_name(trigger or target.name)}" if repeats > 1 or trigger else ""
    work = target.with_name(f".{target.name}.partial")
    shutil.rmtree(work, ignore_errors=True)
    try:
        with bundle:
            members = [m for m in bundle.infolist() if not m.is_dir()]
            _check_members(Path(archive).name, members, limits)
            written, folders = _extract(bundle, members, work, flat, limits, Path(archive).name)
        if not written:
            raise WorkspaceError(f"{Path(archive).name}: holds no images or .txt captions")
        work.rename(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return Extracted([target / p.relative_to(work) for p in written], folders)


def _extract(bundle: zipfile.ZipFile, members: list[zipfile.ZipInfo], work: Path, flat: str, limits: ZipLimits,
             archive: str) -> tuple[list[Path], dict[str, int]]:
    work.mkdir(parents=True)
    written, folders = [], {}
    for member in members:
        place = _place(member.filename, flat)
        if place is None:
            continue
        folder, name = place
        path = work / folder / name if folder else work / name
        if path.exists():
            raise WorkspaceError(f"{archive}: two members would both be {path.relative_to(work)}; zip refused")
        path.parent.mkdir(parents=True, exist_ok=True)
        with bundle.open(member) as source, path.open("wb") as sink:
            _copy_capped(source, sink, limits.max_member_bytes, member.filename)
        written.append(path)
        if folder:
            folders[folder] = int(REPEAT_FOLDER.match(folder).group(1))
    return written, folders


def _place(member: str, flat: str) -> tuple[str, str] | None:
    """(kohya folder or '', file name) of a zip member, or None to skip it."""
    parts = [p for p in PurePosixPath(member.replace("\\", "/")).parts if p not in ("", ".")]
    name = parts[-1] if parts else ""
    if not name or name.startswith(".") or not name.lower().endswith(DATASET_SUFFIXES):
        return None
    kohya = [p for p in parts[:-1] if REPEAT_FOLDER.match(p) and int(REPEAT_FOLDER.match(p).group(1)) > 0]
    folder = safe_folder_name(kohya[-1]) if kohya else flat
    return folder, safe_file_name(name)


def safe_folder_name(name: str) -> str:
    """A folder name with odd characters replaced by '_' (spaces kept: kohya's ``5_noir style``)."""
    cleaned = re.sub(r"[^A-Za-z0-9_. \-]", "_", name).strip(" .")
    if not cleaned:
        raise WorkspaceError(f"folder name {name!r} cannot be used")
    return cleaned[:128]


def _check_members(archive: str, members: list[zipfile.ZipInfo], limits: ZipLimits) -> None:
    if len(members) > limits.max_members:
        raise WorkspaceError(f"{archive}: {len(members)} files, more than the cap of {limits.max_members}")
    total = 0
    for member in members:
        name = member.filename.replace("\\", "/")
        if name.startswith("/") or ".." in name.split("/") or PureWindowsPath(member.filename).drive:
            raise WorkspaceError(f"{archive}: member {member.filename!r} points outside the folder; zip refused")
        if member.file_size > limits.max_member_bytes:
            raise WorkspaceError(f"{archive}: member {member.filename!r} is {member.file_size:,} bytes, over the cap of {limits.max_member_bytes:,}")
        total += member.file_size
    if total > limits.max_total_bytes:
        raise WorkspaceError(f"{archive}: {total:,} bytes uncompressed, over the cap of {limits.max_total_bytes:,}")


def _copy_capped(source, sink, cap: int, name: str) -> None:
    """Copy in blocks and stop at the cap (the zip's declared sizes could lie)."""
    copied = 0
    for block in iter(lambda: source.read(1 << 20), b""):
        copied += len(block)
        if copied > cap:
            raise WorkspaceError(f"member {name!r} grew past the cap of {cap:,} bytes while extracting; refused")
        sink.write(block)
