"""Taking a caller's file into the object store: type from the bytes, size capped, never whole in memory.

The declared content type and file name come from the caller, so the type stored is the
one the first bytes prove when they prove one. Chunks are spooled to an unnamed temp file
(on the data volume when the caller passes one) and handed to the store only once the
upload is complete and within limits, so a refused upload leaves no object behind.

`Uploads` holds the limits and picks the key (under the uploading tenant's folder) for every
way in: the gRPC StorageService.Upload and fal's HTTP storage routes (gateway/fal_storage.py).
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Collection
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Self

from storage.object_store import ObjectStore, StoredObject, random_name, upload_key
from storage.sniff import SAFETENSORS_CONTENT_TYPE, SNIFF_BYTES, sniff_content_type

OCTET_STREAM = "application/octet-stream"
DEFAULT_ALLOWED_CONTENT_TYPES = frozenset(
    {"image/png", "image/jpeg", "image/webp", "image/gif", SAFETENSORS_CONTENT_TYPE, "application/json"}
)
_MIME = re.compile(r"^[a-z0-9][a-z0-9!#$&^_.+-]*/[a-z0-9][a-z0-9!#$&^_.+-]*$")
# Declared types the sniffer can confirm; a claim the bytes contradict is not believed.
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_SNIFFABLE = frozenset(
    {"image/png", "image/jpeg", "image/webp", "image/gif", SAFETENSORS_CONTENT_TYPE, "application/json"}
)


class UploadRefused(ValueError):
    """The upload breaks a limit; the message says which, for an INVALID_ARGUMENT to the caller."""


class UploadTooLarge(UploadRefused):
    """Larger than `max_upload_bytes` (HTTP 413)."""


class UploadTypeRefused(UploadRefused):
    """Of a type the operator does not accept (HTTP 415)."""


def safe_file_name(file_name: str) -> str:
    """The caller's file name as one plain key part (its last path segment), or a random one."""
    base = _UNSAFE.sub("_", file_name.rsplit("/", 1)[-1]).lstrip("._")[:100]
    return base or random_name()


def detect_content_type(first_bytes: bytes, declared: str = "") -> str:
    """What the bytes prove; else the declared type, unless it is one the bytes should have proven."""
    sniffed = sniff_content_type(first_bytes)
    if sniffed is not None:
        return sniffed
    claimed = declared.split(";", 1)[0].strip().lower()
    if not _MIME.match(claimed) or claimed in _SNIFFABLE or claimed.startswith("image/"):
        return OCTET_STREAM
    return claimed


def check_allowed_content_type(content_type: str, allowed: Collection[str]) -> None:
    """`allowed` holds exact types or `type/*` wildcards; an empty collection allows everything."""
    if not allowed or content_type in allowed or f"{content_type.split('/', 1)[0]}/*" in allowed:
        return
    raise UploadTypeRefused(f"files of type {content_type} are not accepted (accepted: {', '.join(sorted(allowed))})")


class UploadWriter:
    """Receives an upload chunk by chunk; `commit` stores it, leaving early or `abort` drops it.

    The type is checked as soon as enough bytes arrived to tell, so a refused type
    costs the caller one chunk, not the whole file.
    """

    def __init__(
        self,
        store: ObjectStore,
        key: str,
        *,
        max_bytes: int,
        declared_content_type: str = "",
        allowed_content_types: Collection[str] = DEFAULT_ALLOWED_CONTENT_TYPES,
        spool_dir: Path | None = None,
    ) -> None:
        self._store = store
        self._key = key
        self._max_bytes = max_bytes
        self._declared = declared_content_type
        self._allowed = allowed_content_types
        # Closed by commit/abort/__exit__: the writer outlives any one block of the caller.
        self._spool: BinaryIO = tempfile.TemporaryFile(dir=spool_dir)  # noqa: SIM115
        self._head = b""
        self._content_type: str | None = None
        self.size = 0

    @property
    def content_type(self) -> str:
        """Known once the first bytes have been seen (or at commit for a tiny file)."""
        return self._content_type or detect_content_type(self._head, self._declared)

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self._max_bytes:
            raise UploadTooLarge(f"the upload is larger than {self._max_bytes} bytes")
        if self._content_type is None and len(self._head) < SNIFF_BYTES:
            self._head += chunk[: SNIFF_BYTES - len(self._head)]
            if len(self._head) >= SNIFF_BYTES:
                self._settle_type()
        self._spool.write(chunk)

    def commit(self) -> StoredObject:
        if self.size == 0:
            raise UploadRefused("the upload is empty")
        if self._content_type is None:
            self._settle_type()
        assert self._content_type is not None
        self._spool.seek(0)
        try:
            return self._store.put_stream(self._key, self._spool, self.size, self._content_type)
        finally:
            self.abort()

    def abort(self) -> None:
        self._spool.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.abort()

    def _settle_type(self) -> None:
        content_type = detect_content_type(self._head, self._declared)
        check_allowed_content_type(content_type, self._allowed)
        self._content_type = content_type


class Uploads:
    """Where callers' files go in and under which limits, the same for every route that takes one."""

    def __init__(
        self,
        store: ObjectStore,
        *,
        max_bytes: int,
        allowed_content_types: Collection[str] = DEFAULT_ALLOWED_CONTENT_TYPES,
        spool_dir: Path | None = None,
    ) -> None:
        self.store = store
        self.max_bytes = max_bytes
        self.allowed_content_types = allowed_content_types
        self.spool_dir = spool_dir
        if spool_dir is not None:
            spool_dir.mkdir(parents=True, exist_ok=True)

    def new_key(self, tenant: str, file_name: str) -> str:
        return upload_key(tenant, safe_file_name(file_name))

    def writer(self, key: str, declared_content_type: str = "") -> UploadWriter:
        return UploadWriter(
            self.store,
            key,
            max_bytes=self.max_bytes,
            declared_content_type=declared_content_type,
            allowed_content_types=self.allowed_content_types,
            spool_dir=self.spool_dir,
        )
