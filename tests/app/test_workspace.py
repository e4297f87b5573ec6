"""The workspace refuses every path that could leave it, and extracts zips safely (no server)."""

from __future__ import annotations

import io
import os
import zipfile

import pytest

from studio.app.workspace import Workspace, WorkspaceError, ZipLimits, extract_dataset_zip, safe_file_name


@pytest.fixture
def workspace(tmp_path) -> Workspace:
    return Workspace.create(tmp_path / "ws")


@pytest.mark.parametrize("bad", ["../x", "adapters/../../x", "/etc/passwd", "..", "C:\\Windows", "\\\\server\\share", "a\\..\\..\\b", ""])
def test_paths_leaving_the_workspace_are_refused(workspace, bad):
    with pytest.raises(WorkspaceError):
        workspace.resolve(bad, must_exist=False)


def test_links_out_of_the_workspace_are_refused(workspace, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, workspace.root / "link")
    with pytest.raises(WorkspaceError, match="outside the workspace"):
        workspace.resolve("link")


def test_paths_inside_resolve(workspace):
    assert workspace.resolve("adapters") == workspace.root / "adapters"
    with pytest.raises(WorkspaceError, match="no such file"):
        workspace.resolve("missing")


@pytest.mark.parametrize("name,expected", [("../../evil.safetensors", "evil.safetensors"), ("C:\\x\\a b.safetensors", "a_b.safetensors"), (".hidden", "hidden")])
def test_upload_names_are_made_safe(name, expected):
    assert safe_file_name(name) == expected


def _zip(tmp_path, members: dict[str, bytes]):
    path = tmp_path / "data.zip"
    with zipfile.ZipFile(path, "w") as bundle:
        for name, data in members.items():
            bundle.writestr(name, data)
    return path


def test_zip_extracts_images_and_captions_flat(tmp_path):
    from PIL import Image

    png = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(png, format="PNG")
    archive = _zip(tmp_path, {"set/a.png": png.getvalue(), "set/a.txt": b"a red square", "run.sh": b"rm -rf /"})
    extracted = extract_dataset_zip(archive, tmp_path / "out")
    assert sorted(p.name for p in extracted.files) == ["a.png", "a.txt"] and extracted.folders == {}
    assert not (tmp_path / "out" / "run.sh").exists()


@pytest.mark.parametrize("member", ["../evil.txt", "/abs/evil.txt", "a/../../evil.txt"])
def test_zip_with_traversal_is_refused(tmp_path, member):
    with pytest.raises(WorkspaceError, match="points outside"):
        extract_dataset_zip(_zip(tmp_path, {member: b"x"}), tmp_path / "out")
    assert not (tmp_path / "evil.txt").exists()


def test_zip_caps(tmp_path):
    archive = _zip(tmp_path, {f"{i}.txt": b"x" * 100 for i in range(5)})
    with pytest.raises(WorkspaceError, match="more than the cap"):
        extract_dataset_zip(archive, tmp_path / "a", ZipLimits(max_members=4))
    with pytest.raises(WorkspaceError, match="over the cap"):
        extract_dataset_zip(archive, tmp_path / "b", ZipLimits(max_member_bytes=50))
    with pytest.raises(WorkspaceError, match="uncompressed, over the cap"):
        extract_dataset_zip(archive, tmp_path / "c", ZipLimits(max_total_bytes=400))


def test_not_a_zip(tmp_path):
    path = tmp_path / "x.zip"
    path.write_bytes(b"not a zip")
    with pytest.raises(WorkspaceError, match="not a readable zip"):
        extract_dataset_zip(path, tmp_path / "out")
