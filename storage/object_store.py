"""The object-store interface and the local-folder store (the embedded default).

Keys are relative, slash-separated and checked so that none can escape the store's
root; two requests never collide because keys carry the request id or a random part.
"""

from __future__ import annotations

import io
import os
import re
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol
from urllib.parse import urlsplit

_KEY_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
COPY_CHUNK_BYTES = 1 << 20


class InvalidKey(ValueError):
    pass


class ObjectNotFound(LookupError):
    """Raised by `get` for a well-formed key that holds nothing, the same for every backend."""


@dataclass(frozen=True)
class StoredObject:
    key: str
    url: str
    size: int
    content_type: str


class ObjectStore(Protocol):
    def put(self, key: str, data: bytes, content_type: str) -> StoredObject: ...

    def put_stream(self, key: str, readable: BinaryIO, length: int, content_type: str) -> StoredObject: ...

    def get(self, key: str) -> bytes: ...

    def url(self, key: str) -> str: ...

    def key_for_url(self, url: str) -> str | None: ...


def check_key(key: str) -> str:
    parts = key.split("/")
    if not parts or any(not _KEY_PART.match(part) for part in parts):
        raise InvalidKey(f"object key {key!r} is not a relative path of plain names")
    return key


def random_name(suffix: str = "", length: int = 12) -> str:
    """fal-style generated file names, e.g. `z9RV14K95DvU.png`."""
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    return "".join(secrets.choice(alphabet) for _ in range(length)) + suffix


def key_under(url: str, base: str) -> str | None:
    """The key a URL names below `base`, ignoring query and fragment (signatures, cache busters)."""
    parts = urlsplit(url)
    bare = f"{parts.scheme}://{parts.netloc}{parts.path}"
    prefix = base.rstrip("/") + "/"
    if not bare.startswith(prefix):
        return None
    try:
        return check_key(bare[len(prefix) :])
    except InvalidKey:
        return None


class LocalObjectStore:
    """Files under a folder, served by the gateway's HTTP port at `{base_url}/files/{key}`."""

    def __init__(self, root: Path, base_url: str) -> None:
        self.root = root.resolve()
        self.base_url = base_url.rstrip("/")
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        path = (self.root / check_key(key)).resolve()
        if not path.is_relative_to(self.root):
            raise InvalidKey(f"object key {key!r} escapes the store")
        return path

    def put(self, key: str, data: bytes, content_type: str) -> StoredObject:
        return self.put_stream(key, io.BytesIO(data), len(data), content_type)

    def put_stream(self, key: str, readable: BinaryIO, length: int, content_type: str) -> StoredObject:
        """Copies in chunks to a temp file beside the target, so readers never see a partial file.

        `length` -1 reads to the end (as the S3 store allows); otherwise exactly `length`
        bytes must come, so a short source is an error rather than a truncated object.
        """
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        size = 0
        try:
            with os.fdopen(fd, "wb") as handle:
                while length < 0 or size < length:
                    want = COPY_CHUNK_BYTES if length < 0 else min(COPY_CHUNK_BYTES, length - size)
                    chunk = readable.read(want)
                    if not chunk:
                        break
                    handle.write(chunk)
                    size += len(chunk)
            if length >= 0 and size != length:
                raise ValueError(f"object {key!r}: expected {length} bytes, the source ended after {size}")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return StoredObject(key=key, url=self.url(key), size=size, content_type=content_type)

    def get(self, key: str) -> bytes:
        try:
            return self.path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(f"no stored object {key!r}") from None

    def url(self, key: str) -> str:
        return f"{self.base_url}/files/{check_key(key)}"

    def key_for_url(self, url: str) -> str | None:
        return key_under(url, f"{self.base_url}/files")
