"""The object-store interface and the local-folder store (the embedded default).

Keys are relative, slash-separated and checked so that none can escape the store's
root; two requests never collide because keys carry the request id or a random part.

Every caller's file lives under its tenant's folder (`tenants/<digest of the tenant>/uploads/…`
and `…/outputs/<request id>/…`), so whose a file is can be read from its key alone: a worker
uses another tenant's file as an input only as it would a file that does not exist
(storage/tenant_files.py).

The local store's URLs are signed and expire like S3's presigned ones (HMAC-SHA256 of key and
expiry), so a URL that leaked into a log or a chat stops working, and knowing a key is not
enough to read a file. Each object's content type is kept beside it (a dot file, which no key
can name), so the file server sends the type the bytes proved at upload, never one guessed from
a caller's file name.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol
from urllib.parse import urlsplit

_KEY_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
COPY_CHUNK_BYTES = 1 << 20
DEFAULT_URL_EXPIRY_SECONDS = 3600
SIGNING_KEY_BYTES = 32


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

    def exists(self, key: str) -> bool: ...

    def put_stream(self, key: str, readable: BinaryIO, length: int, content_type: str) -> StoredObject: ...

    def get(self, key: str) -> bytes: ...

    def url(self, key: str, expires_in_seconds: float | None = None) -> str:
        """A URL that reads the object, valid for `expires_in_seconds` (None: the store's setting)."""
        ...

    def unsigned_url(self, key: str) -> str: ...

    def key_for_url(self, url: str) -> str | None: ...

    def delete_prefix(self, prefix: str) -> int: ...

    def usage(self, prefix: str) -> int:
        """Bytes of the objects under the folder `prefix` names."""
        ...

    def delete_uploads_before(self, before: float) -> int:
        """Deletes the uploads (every tenant's) stored before `before` (epoch seconds); returns how many."""
        ...


def check_key(key: str) -> str:
    parts = key.split("/")
    if not parts or any(not _KEY_PART.match(part) for part in parts):
        raise InvalidKey(f"object key {key!r} is not a relative path of plain names")
    return key


def tenant_folder(tenant: str) -> str:
    """The folder of a tenant's files: a digest, so keys and URLs neither show nor are shaped by tenant names."""
    return f"tenants/{hashlib.sha256(tenant.encode()).hexdigest()[:32]}"


def owned_by(key: str, tenant: str) -> bool:
    return key.startswith(tenant_folder(tenant) + "/")


def upload_key(tenant: str, file_name: str) -> str:
    """A fresh key for an upload: a random folder per upload, so equal names never collide."""
    return f"{tenant_folder(tenant)}/uploads/{secrets.token_hex(16)}/{check_key(file_name)}"


def uploads_prefix(tenant: str) -> str:
    """The folder of a tenant's uploads, whose bytes its upload quota counts."""
    return f"{tenant_folder(tenant)}/uploads/"


def output_prefix(tenant: str, request_id: str) -> str:
    """The folder of a request's outputs (the worker writes them, retention deletes the folder)."""
    return f"{tenant_folder(tenant)}/outputs/{request_id}/"


_NAME_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def random_name(suffix: str = "", length: int = 12) -> str:
    """fal-style generated file names, e.g. `z9RV14K95DvU.png`."""
    return "".join(secrets.choice(_NAME_ALPHABET) for _ in range(length)) + suffix


def output_name(request_id: str, which: str, suffix: str = "", length: int = 12) -> str:
    """A fal-style name fixed by the request and which of its outputs it is (`image-0`, `debug_latents`):
    every attempt of a request writes the same keys, so a request run twice leaves one set of files."""
    digest = hashlib.sha256(f"{request_id}/{which}".encode()).digest()
    return "".join(_NAME_ALPHABET[b % len(_NAME_ALPHABET)] for b in digest[:length]) + suffix


def signature_matches(expected: str, presented: str) -> bool:
    """Whether `presented` is the signature `expected` (hex): in constant time, and False for text that is not
    ASCII, which compare_digest refuses with a TypeError (no signature this service makes has any)."""
    return presented.isascii() and hmac.compare_digest(expected, presented)


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


def load_or_create_secret(path: Path, make: Callable[[], bytes] | None = None) -> bytes:
    """A secret kept in `path` (random bytes unless `make` says how), made by whichever process comes
    first; the others read that one.

    Written to a temp file (0600) and linked into place, so no reader ever sees a partial secret.
    """
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(make() if make is not None else secrets.token_bytes(SIGNING_KEY_BYTES))
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
    finally:
        os.unlink(tmp)
    return path.read_bytes()


class LocalObjectStore:
    """Files under a folder, served by the gateway's HTTP port at `{base_url}/files/{key}?expires=…&signature=…`.

    Processes that hand out or check URLs for the same folder (gateway, workers) must share
    `signing_key`; without one, URLs verify only in this process.
    """

    def __init__(
        self,
        root: Path,
        base_url: str,
        *,
        signing_key: bytes | None = None,
        url_expiry_seconds: int = DEFAULT_URL_EXPIRY_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if url_expiry_seconds < 1:
            raise ValueError(f"file URL expiry must be at least 1 second, got {url_expiry_seconds}")
        self.root = root.resolve()
        self.base_url = base_url.rstrip("/")
        self.root.mkdir(parents=True, exist_ok=True)
        self._signing_key = signing_key or secrets.token_bytes(SIGNING_KEY_BYTES)
        self.url_expiry_seconds = url_expiry_seconds
        self.clock = clock

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
        # After the data: a failed write leaves no type behind, and until this lands a reader sniffs.
        _write_atomically(_type_file(path), content_type.encode())
        return StoredObject(key=key, url=self.url(key), size=size, content_type=content_type)

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def get(self, key: str) -> bytes:
        try:
            return self.path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(f"no stored object {key!r}") from None

    def content_type(self, key: str) -> str | None:
        """The type stored with the object; None for objects written before types were kept."""
        try:
            return _type_file(self.path(key)).read_text().strip() or None
        except (FileNotFoundError, NotADirectoryError, UnicodeDecodeError):
            return None

    def url(self, key: str, expires_in_seconds: float | None = None) -> str:
        lifetime = self.url_expiry_seconds if expires_in_seconds is None else expires_in_seconds
        expires = int(self.clock() + lifetime)
        return f"{self.base_url}/files/{check_key(key)}?expires={expires}&signature={self._sign(key, expires)}"

    def unsigned_url(self, key: str) -> str:
        """Names the key as an input (of its tenant) but downloads nothing: for URLs that cannot carry a query."""
        return f"{self.base_url}/files/{check_key(key)}"

    def signature_valid(self, key: str, expires: str, signature: str) -> bool:
        """True for a URL this store (or one sharing its key) signed for `key` that has not expired yet."""
        if not (expires.isascii() and expires.isdigit()) or int(expires) < self.clock():
            return False
        return signature_matches(self._sign(key, int(expires)), signature)

    def key_for_url(self, url: str) -> str | None:
        """The key whatever the signature or expiry: results are re-signed from it when read."""
        return key_under(url, f"{self.base_url}/files")

    def _sign(self, key: str, expires: int) -> str:
        return hmac.new(self._signing_key, f"{key}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def delete_prefix(self, prefix: str) -> int:
        """Deletes the folder `prefix` names (`outputs/<id>/`) with every object in it; returns how many.

        Deleting what is already gone is no error: two gateways may sweep the same request.
        """
        folder = self.path(folder_key(prefix))
        if not folder.is_dir():
            return 0
        count = sum(1 for path in folder.rglob("*") if path.is_file() and not path.name.startswith("."))
        try:
            shutil.rmtree(folder)
        except FileNotFoundError:
            pass
        return count

    def usage(self, prefix: str) -> int:
        folder = self.path(folder_key(prefix))
        return sum(
            path.stat().st_size for path in _walk_files(folder) if not path.name.startswith(".")
        )

    def delete_uploads_before(self, before: float) -> int:
        """An upload's folder (`tenants/<t>/uploads/<random>/`) goes once its file is older than `before`."""
        count = 0
        tenants = self.root / "tenants"
        for uploads in (tenant / "uploads" for tenant in _subfolders(tenants)):
            for folder in _subfolders(uploads):
                try:
                    objects = [path for path in folder.iterdir() if not path.name.startswith(".")]
                    if max((path.stat().st_mtime for path in objects), default=folder.stat().st_mtime) >= before:
                        continue
                except FileNotFoundError:
                    continue
                shutil.rmtree(folder, ignore_errors=True)
                count += len(objects)
        return count


def _subfolders(folder: Path) -> list[Path]:
    try:
        return [path for path in folder.iterdir() if path.is_dir()]
    except (FileNotFoundError, NotADirectoryError):
        return []


def _walk_files(folder: Path) -> Iterator[Path]:
    """Files under `folder`, none if it is missing; files deleted meanwhile are skipped."""
    for directory, _, names in os.walk(folder):
        for name in names:
            path = Path(directory) / name
            if path.is_file():
                yield path


def _type_file(path: Path) -> Path:
    return path.with_name(f".{path.name}.type")


def _write_atomically(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def folder_key(prefix: str) -> str:
    """A prefix that names a whole folder, without its final slash: `outputs/a` must not take `outputs/ab`."""
    if not prefix.endswith("/"):
        raise InvalidKey(f"prefix {prefix!r} must name a folder (end with '/')")
    return check_key(prefix[:-1])
