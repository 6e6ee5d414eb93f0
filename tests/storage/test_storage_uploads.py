"""Upload handling: the type comes from the bytes, limits hold while streaming, refusals leave nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from storage_testkit import png_bytes, safetensors_bytes

from storage.object_store import LocalObjectStore
from storage.uploads import (
    DEFAULT_ALLOWED_CONTENT_TYPES,
    UploadRefused,
    UploadWriter,
    check_allowed_content_type,
    detect_content_type,
)


@pytest.mark.parametrize(
    ("head", "declared", "expected"),
    [
        (png_bytes(), "text/plain", "image/png"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "", "image/jpeg"),
        (b"RIFF\x24\x00\x00\x00WEBPVP8 ", "", "image/webp"),
        (b"GIF89a\x01\x00\x01\x00", "image/png", "image/gif"),
        (safetensors_bytes()[:64], "application/octet-stream", "application/x-safetensors"),
        (b'  {"a": [1, 2, 3], "caf\xc3', "", "application/json"),
        (b"hello, world", "text/plain; charset=utf-8", "text/plain"),
        (b"<svg onload=alert(1)>", "image/svg+xml", "application/octet-stream"),
        (b"MZ\x90\x00not a png", "image/png", "application/octet-stream"),
        (b"\x00\x01", "not a type", "application/octet-stream"),
        (b"\x00\x01", "", "application/octet-stream"),
    ],
)
def test_detect_content_type(head: bytes, declared: str, expected: str) -> None:
    assert detect_content_type(head[:64], declared) == expected


def test_allowed_content_types_take_exact_types_and_wildcards() -> None:
    check_allowed_content_type("image/png", DEFAULT_ALLOWED_CONTENT_TYPES)
    check_allowed_content_type("image/avif", {"image/*"})
    check_allowed_content_type("text/plain", set())
    with pytest.raises(UploadRefused, match="files of type text/plain are not accepted"):
        check_allowed_content_type("text/plain", DEFAULT_ALLOWED_CONTENT_TYPES)


def _store(tmp_path: Path) -> LocalObjectStore:
    return LocalObjectStore(tmp_path / "files", "http://127.0.0.1:8080")


def _stored_files(store: LocalObjectStore) -> list[Path]:
    """The objects, not the content types kept beside them (dot files)."""
    return sorted(path for path in store.root.rglob("*") if path.is_file() and not path.name.startswith("."))


def test_chunks_are_stored_with_the_sniffed_type(tmp_path: Path) -> None:
    store = _store(tmp_path)
    data = safetensors_bytes()
    with UploadWriter(store, "uploads/a/lora.safetensors", max_bytes=len(data), spool_dir=tmp_path) as writer:
        for start in range(0, len(data), 1000):
            writer.write(data[start : start + 1000])
        stored = writer.commit()
    assert stored.content_type == "application/x-safetensors"
    assert stored.size == len(data) and stored.url.startswith("http://127.0.0.1:8080/files/uploads/a/lora.safetensors?")
    assert store.get("uploads/a/lora.safetensors") == data


def test_a_too_large_upload_is_refused_while_streaming(tmp_path: Path) -> None:
    store = _store(tmp_path)
    data = safetensors_bytes()
    with (
        pytest.raises(UploadRefused, match="larger than 2000 bytes"),
        UploadWriter(store, "uploads/b/lora.safetensors", max_bytes=2000) as writer,
    ):
        for start in range(0, len(data), 1000):
            writer.write(data[start : start + 1000])
    assert writer.size == 3000
    assert _stored_files(store) == []


def test_a_refused_type_is_refused_at_the_first_chunk(tmp_path: Path) -> None:
    store = _store(tmp_path)
    with (
        pytest.raises(UploadRefused, match="application/octet-stream are not accepted"),
        UploadWriter(store, "uploads/c/tool.exe", max_bytes=10_000, declared_content_type="image/png") as writer,
    ):
        writer.write(b"MZ\x90\x00" + b"\0" * 100)
    assert _stored_files(store) == []


def test_tiny_and_empty_uploads(tmp_path: Path) -> None:
    store = _store(tmp_path)
    with UploadWriter(store, "uploads/d/config.json", max_bytes=100) as writer:
        writer.write(b'{"rank": 4}')
        assert writer.commit().content_type == "application/json"
    with (
        pytest.raises(UploadRefused, match="the upload is empty"),
        UploadWriter(store, "uploads/e/x.png", max_bytes=100) as writer,
    ):
        writer.commit()
    assert _stored_files(store) == [store.path("uploads/d/config.json")]
