"""storage.object_store: key checks and the local-folder store."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from storage.object_store import InvalidKey, LocalObjectStore, StoredObject, check_key, random_name

BASE = "http://127.0.0.1:8080"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "files"


@pytest.fixture
def store(root: Path) -> LocalObjectStore:
    return LocalObjectStore(root, BASE + "/")


def all_files(directory: Path) -> list[str]:
    """Every file under `directory`, hidden ones included (but the stored content types), relative and sorted."""
    return sorted(
        str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file() and not p.name.endswith(".type")
    )


@pytest.mark.parametrize(
    ("key", "data", "content_type"),
    [
        ("a.png", b"\x89PNG...", "image/png"),
        ("requests/1f2e-3d/z9RV14K95DvU.jpeg", b"jpeg-bytes", "image/jpeg"),
        ("uploads/x_y-z.bin", b"", "application/octet-stream"),
    ],
)
def test_put_writes_file_and_returns_url(
    store: LocalObjectStore, root: Path, key: str, data: bytes, content_type: str
) -> None:
    stored = store.put(key, data, content_type)
    assert stored == StoredObject(key=key, url=stored.url, size=len(data), content_type=content_type)
    assert stored.url.startswith(f"{BASE}/files/{key}?expires=")
    assert (root / key).read_bytes() == data
    assert store.key_for_url(store.url(key)) == key
    assert store.content_type(key) == content_type
    assert store.path(key) == (root / key).resolve()
    assert all_files(root) == [key]


def test_put_overwrites_and_leaves_no_temp_file(store: LocalObjectStore, root: Path) -> None:
    store.put("dir/a.txt", b"first", "text/plain")
    store.put("dir/a.txt", b"second, longer", "text/plain")
    store.put("dir/b.txt", b"b", "text/plain")
    assert (root / "dir/a.txt").read_bytes() == b"second, longer"
    assert all_files(root) == ["dir/a.txt", "dir/b.txt"]


def test_failed_replace_keeps_the_old_content(
    store: LocalObjectStore, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.put("a.txt", b"old", "text/plain")

    def failing_replace(src: str, dst: str) -> None:
        raise OSError("disk went away")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk went away"):
        store.put("a.txt", b"new", "text/plain")
    monkeypatch.undo()
    assert (root / "a.txt").read_bytes() == b"old"


def test_failed_put_leaves_no_temp_file(store: LocalObjectStore, root: Path) -> None:
    (root / "taken" / "child").mkdir(parents=True)  # a folder where the file should go: replace fails
    with pytest.raises(OSError):
        store.put("taken", b"data", "text/plain")
    assert [p.name for p in root.iterdir() if p.name.startswith(".tmp-")] == []


BAD_KEYS = [
    "",
    "..",
    "../escape.png",
    "a/../../escape.png",
    "a/..",
    "/etc/passwd",
    "//server/share",
    "a//b.png",
    "a/",
    "/",
    ".hidden",
    "dir/.hidden",
    ".tmp-abc",
    "./a.png",
    "a\\..\\b.png",
    "with space.png",
    "tab\tname",
    "ünïcode.png",
    "-dash-first.png",
    "_under.png",
    "x" * 201,
    "a/" + "y" * 201,
    "nul\x00.png",
]


@pytest.mark.parametrize("key", BAD_KEYS, ids=repr)
def test_bad_keys_are_refused(store: LocalObjectStore, root: Path, key: str) -> None:
    with pytest.raises(InvalidKey):
        check_key(key)
    with pytest.raises(InvalidKey):
        store.put(key, b"data", "text/plain")
    with pytest.raises(InvalidKey):
        store.url(key)
    with pytest.raises(InvalidKey):
        store.path(key)
    assert all_files(root) == []
    assert not (root.parent / "escape.png").exists()


def test_invalid_key_is_a_value_error() -> None:
    assert issubclass(InvalidKey, ValueError)


@pytest.mark.parametrize("key", ["a", "A.b", "0", "x" * 200, "a/b/c/d.e", "file.tar.gz", "a_b-c.d"])
def test_good_keys_are_kept_as_given(key: str) -> None:
    assert check_key(key) == key


def test_symlink_out_of_the_store_is_refused(store: LocalObjectStore, root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(InvalidKey, match="escapes"):
        store.put("link/x.png", b"data", "image/png")
    assert list(outside.iterdir()) == []


def test_root_is_created_and_base_url_trimmed(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "a" / "b", "https://cdn.example.com/base///")
    assert (tmp_path / "a" / "b").is_dir()
    assert store.url("k.png").startswith("https://cdn.example.com/base/files/k.png?expires=")


def test_random_name() -> None:
    names = {random_name(".png") for _ in range(200)}
    assert len(names) == 200
    for name in names:
        assert re.fullmatch(r"[A-Za-z0-9]{12}\.png", name)
        check_key(name)
    assert len(random_name(length=20)) == 20
