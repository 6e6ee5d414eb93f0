"""The object-store interface and the local-folder store (the embedded default).

Keys are relative, slash-separated and checked so that none can escape the store's
root; two requests never collide because keys carry the request id or a random part.
"""

from __future__ import annotations

import os
import re
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

_KEY_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


class InvalidKey(ValueError):
    pass


@dataclass(frozen=True)
class StoredObject:
    key: str
    url: str
    size: int
    content_type: str


class ObjectStore(Protocol):
    def put(self, key: str, data: bytes, content_type: str) -> StoredObject: ...

    def url(self, key: str) -> str: ...


def check_key(key: str) -> str:
    parts = key.split("/")
    if not parts or any(not _KEY_PART.match(part) for part in parts):
        raise InvalidKey(f"object key {key!r} is not a relative path of plain names")
    return key


def random_name(suffix: str = "", length: int = 12) -> str:
    """fal-style generated file names, e.g. `z9RV14K95DvU.png`."""
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    return "".join(secrets.choice(alphabet) for _ in range(length)) + suffix


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
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
        return StoredObject(key=key, url=self.url(key), size=len(data), content_type=content_type)

    def url(self, key: str) -> str:
        return f"{self.base_url}/files/{check_key(key)}"
