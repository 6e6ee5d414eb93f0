"""Choosing the object-store backend from configuration, in one place for gateway and workers."""

from __future__ import annotations

from pathlib import Path

from storage.object_store import DEFAULT_URL_EXPIRY_SECONDS, LocalObjectStore, ObjectStore
from storage.s3 import S3ObjectStore, S3Settings

BACKENDS = ("local", "s3")


def make_object_store(
    backend: str,
    *,
    local_root: Path,
    local_base_url: str,
    s3: S3Settings | None = None,
    local_signing_key: bytes | None = None,
    local_url_expiry_seconds: int = DEFAULT_URL_EXPIRY_SECONDS,
) -> ObjectStore:
    """`local` is the embedded default; `s3` needs `s3` settings (endpoint, credentials, bucket)."""
    if backend == "local":
        return LocalObjectStore(
            local_root, local_base_url, signing_key=local_signing_key, url_expiry_seconds=local_url_expiry_seconds
        )
    if backend == "s3":
        if s3 is None:
            raise ValueError("object store backend 's3' needs S3 settings (endpoint, credentials, bucket)")
        return S3ObjectStore(s3, gateway_files_url=f"{local_base_url.rstrip('/')}/files" if local_base_url else "")
    raise ValueError(f"object store backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
