"""The app's workspace: the one folder it reads user data from and serves files out of.

Every path a browser or API client names is a path *relative to the workspace*; ``../``,
absolute paths, drive letters and symlinks leading outside are refused with a clear message
(RELIABILITY 15). Uploaded zips are extracted member by member with caps on count and size, so
a zip bomb or a ``../../etc/passwd`` member never touches the disk outside the workspace.
"""

from __future__ import annotations

import re
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from studio.errors import StudioError

SAFE_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")
DATASET_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".txt")


class WorkspaceError(StudioError):
    """A path or upload the workspace refuses (outside it, too big, a bad name)."""


@dataclass(frozen=True)
class ZipLimits:
    """Caps on an uploaded dataset zip (checked before anything is written)."""

    max_members: int = 2_000
    max_member_bytes: int = 32 << 20
    max_total_bytes: int = 512 << 20


@dataclass(frozen=True)
class Workspace:
    """A folder with fixed subfolders; see the module docstring."""

    root: Path

    @classmethod
    def create(cls, root: str | Path) -> "Workspace":
        """Make the workspace and its subfolders; the root is resolved once, here."""
        workspace = cls(Path(root).expanduser().resolve())
        for sub in ("adapters", "datasets", "compressed", "exports", "runs", "outputs", "bases", "cache"):
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

    def store_upload(self, upload: str | Path, subfolder: str) -> Path:
        """Copy an uploaded temp file into ``subfolder`` under a safe version of its own name."""
        source = Path(upload)
        target = self.folder(subfolder) / safe_file_name(source.name)
        if source.resolve() != target.resolve():
            shutil.copyfile(source, target)
        return target


def safe_file_name(name: str) -> str:
    """A file name with anything that could be a path or odd character replaced by '_'."""
    base = PureWindowsPath(PurePosixPath(name).name).name
    cleaned = re.sub(r"[^A-Za-z0-9_.\-]", "_", base).lstrip("._-")
    if not cleaned or not SAFE_FILE_NAME.fullmatch(cleaned):
        raise WorkspaceError(f"file name {name!r} cannot be used (letters, digits, '_', '-', '.' only)")
    return cleaned


def extract_dataset_zip(archive: str | Path, target: Path, limits: ZipLimits = ZipLimits()) -> list[Path]:
    """Extract the images and captions of a zip into ``target`` (flat), refusing unsafe members.

    Members with absolute paths or ``..`` parts are refused outright (the whole zip: it was made
    to attack); members that are not images or ``.txt`` captions are skipped; the member count,
    each member's size and the total are capped before a byte is written.
    """
    try:
        bundle = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as error:
        raise WorkspaceError(f"{Path(archive).name}: not a readable zip file ({error})") from error
    with bundle:
        members = [m for m in bundle.infolist() if not m.is_dir()]
        _check_members(Path(archive).name, members, limits)
        target.mkdir(parents=True, exist_ok=True)
        written = []
        for member in members:
            name = PurePosixPath(member.filename.replace("\\", "/")).name
            if name.startswith(".") or not name.lower().endswith(DATASET_SUFFIXES):
                continue
            path = target / safe_file_name(name)
            with bundle.open(member) as source, path.open("wb") as sink:
                _copy_capped(source, sink, limits.max_member_bytes, member.filename)
            written.append(path)
    if not written:
        raise WorkspaceError(f"{Path(archive).name}: holds no images or .txt captions")
    return written


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
