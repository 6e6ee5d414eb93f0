"""An S3-protocol object store (MinIO, AWS S3, Ceph RGW, SeaweedFS, Garage) through the `minio` SDK.

Only plain S3 calls are used so that any of those servers works with a configuration
change. Result URLs are presigned GETs with an explicit expiry (optionally signed with
separate read-only credentials and for the host callers reach), or plain URLs under a
public base when the operator serves the bucket through a CDN or a public-read policy.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from datetime import timedelta
from functools import cached_property
from typing import BinaryIO
from urllib.parse import urlsplit

import certifi
import urllib3
from minio import Minio
from minio.deleteobjects import DeleteObject
from minio.error import S3Error

from storage.object_store import InvalidKey, ObjectNotFound, StoredObject, check_key, folder_key, key_under

# Longest lifetime S3 SigV4 allows for a presigned URL.
MAX_PRESIGN_EXPIRY_SECONDS = 7 * 24 * 3600
# Part size for streams of unknown length (S3's minimum is 5 MiB).
UNKNOWN_LENGTH_PART_BYTES = 16 * 1024 * 1024
_PROBE_NAME = "probe"


@dataclass(frozen=True)
class S3Settings:
    """Where the bucket is and how result URLs are made.

    `endpoint` is `host[:port]` as the workers and gateway reach it (scheme comes from
    `secure`). `presign_endpoint` is a full base URL (`https://minio.example.com`) for
    when callers reach the server under another name than the cluster does: presigned
    URLs are signed for one host. `key_prefix` puts every object under one folder of a
    shared bucket. `public_base_url` points at the bucket's root.
    """

    endpoint: str
    access_key: str
    secret_key: str
    bucket: str = "loraserve"
    region: str = "us-east-1"
    secure: bool = True
    key_prefix: str = ""
    presign_expiry_seconds: int = 3600
    public_base_url: str = ""
    presign_endpoint: str = ""
    presign_access_key: str = ""
    presign_secret_key: str = ""
    timeout_seconds: float = 60.0

    def __post_init__(self) -> None:
        # Each message names the setting (`s3_` + the field) an operator gave.
        if not self.endpoint or "://" in self.endpoint or "/" in self.endpoint:
            raise ValueError(f"s3_endpoint must be host[:port] without a scheme or path, got {self.endpoint!r}")
        if self.key_prefix:
            try:
                check_key(self.key_prefix.strip("/"))
            except InvalidKey as exc:
                raise InvalidKey(f"s3_key_prefix: {exc}") from None
        if not 1 <= self.presign_expiry_seconds <= MAX_PRESIGN_EXPIRY_SECONDS:
            raise ValueError(
                f"s3_presign_expiry_seconds must be between 1 and {MAX_PRESIGN_EXPIRY_SECONDS}, "
                f"got {self.presign_expiry_seconds}"
            )
        if self.presign_endpoint and urlsplit(self.presign_endpoint).scheme not in {"http", "https"}:
            raise ValueError(f"s3_presign_endpoint must be an http(s) URL, got {self.presign_endpoint!r}")
        if bool(self.presign_access_key) != bool(self.presign_secret_key):
            raise ValueError("s3_presign_access_key and s3_presign_secret_key must be set together")


class S3ObjectStore:
    """Objects in one bucket under an optional prefix; the bucket is created when missing.

    `gateway_files_url` (`{public_url}/files`) is where the gateway names keys without a presigned
    URL (`unsigned_url`: fal's v3 multipart `access_url`, which cannot carry a query); such URLs
    are recognised as this store's, so they work as inputs, and are re-signed in results.
    """

    def __init__(self, settings: S3Settings, *, gateway_files_url: str = "") -> None:
        self.settings = settings
        self.gateway_files_url = gateway_files_url.rstrip("/")
        self.bucket = settings.bucket
        self._prefix = settings.key_prefix.strip("/") + "/" if settings.key_prefix.strip("/") else ""
        self._http = _pool(settings.timeout_seconds)
        self._client = Minio(
            settings.endpoint,
            access_key=settings.access_key,
            secret_key=settings.secret_key,
            secure=settings.secure,
            region=settings.region,
            http_client=self._http,
        )
        self._presigner = self._make_presigner()
        self._ensure_bucket()

    def object_name(self, key: str) -> str:
        """The full S3 name; `check_key` refuses `..`, empty parts and absolute keys, so no key leaves the prefix."""
        return self._prefix + check_key(key)

    def put(self, key: str, data: bytes, content_type: str) -> StoredObject:
        return self.put_stream(key, io.BytesIO(data), len(data), content_type)

    def put_stream(self, key: str, readable: BinaryIO, length: int, content_type: str) -> StoredObject:
        """`length` -1 streams a source of unknown size as a multipart upload, never buffering it whole."""
        part_size = UNKNOWN_LENGTH_PART_BYTES if length < 0 else 0
        self._client.put_object(
            self.bucket, self.object_name(key), readable, length, content_type=content_type, part_size=part_size
        )
        size = length if length >= 0 else self._client.stat_object(self.bucket, self.object_name(key)).size or 0
        return StoredObject(key=key, url=self.url(key), size=size, content_type=content_type)

    def exists(self, key: str) -> bool:
        try:
            self._client.stat_object(self.bucket, self.object_name(key))
        except S3Error as exc:
            if exc.code in {"NoSuchKey", "NoSuchObject", "NotFound"}:
                return False
            raise
        return True

    def get(self, key: str) -> bytes:
        try:
            response = self._client.get_object(self.bucket, self.object_name(key))
        except S3Error as exc:
            if exc.code in {"NoSuchKey", "NoSuchObject"}:
                raise ObjectNotFound(f"no stored object {key!r}") from None
            raise
        try:
            data: bytes = response.read()
            return data
        finally:
            response.close()
            response.release_conn()

    def url(self, key: str, expires_in_seconds: float | None = None) -> str:
        name = self.object_name(key)
        if self.settings.public_base_url:
            return f"{self.settings.public_base_url.rstrip('/')}/{name}"
        lifetime = self.settings.presign_expiry_seconds if expires_in_seconds is None else expires_in_seconds
        return str(
            self._presigner.presigned_get_object(
                self.bucket, name, expires=timedelta(seconds=min(lifetime, MAX_PRESIGN_EXPIRY_SECONDS))
            )
        )

    def unsigned_url(self, key: str) -> str:
        """The gateway's name for the key when it has one (see the class), else the object's URL without a signature."""
        if self.gateway_files_url:
            return f"{self.gateway_files_url}/{check_key(key)}"
        return f"{self._url_bases[0]}/{self.object_name(key)}"

    def key_for_url(self, url: str) -> str | None:
        """Recognises every URL form this store hands out, whatever their signature or expiry."""
        for base in self._url_bases:
            key = key_under(url, f"{base}/{self._prefix}".rstrip("/"))
            if key is not None:
                return key
        if self.gateway_files_url:
            return key_under(url, self.gateway_files_url)
        return None

    @cached_property
    def _url_bases(self) -> list[str]:
        """Derived from a real presigned URL so path-style and virtual-host-style hosts both match."""
        probe = self._presigner.presigned_get_object(self.bucket, _PROBE_NAME, expires=timedelta(seconds=1))
        parts = urlsplit(probe)
        bases = [f"{parts.scheme}://{parts.netloc}{parts.path[: -len(_PROBE_NAME)]}".rstrip("/")]
        if self.settings.public_base_url:
            bases.append(self.settings.public_base_url.rstrip("/"))
        return bases

    def _make_presigner(self) -> Minio:
        """Presigning is offline (the region is set), so a second client costs no round trip."""
        settings = self.settings
        if not settings.presign_endpoint and not settings.presign_access_key:
            return self._client
        endpoint, secure = settings.endpoint, settings.secure
        if settings.presign_endpoint:
            parts = urlsplit(settings.presign_endpoint)
            endpoint, secure = parts.netloc, parts.scheme == "https"
        return Minio(
            endpoint,
            access_key=settings.presign_access_key or settings.access_key,
            secret_key=settings.presign_secret_key or settings.secret_key,
            secure=secure,
            region=settings.region,
            http_client=self._http,
        )

    def _ensure_bucket(self) -> None:
        if self._client.bucket_exists(self.bucket):
            return
        try:
            self._client.make_bucket(self.bucket, location=self.settings.region)
        except S3Error as exc:
            # Another replica created it between our check and our call.
            if exc.code != "BucketAlreadyOwnedByYou":
                raise

    def delete_prefix(self, prefix: str) -> int:
        """Deletes every object under the folder `prefix` names (`outputs/<id>/`); returns how many were listed.

        Deleting what is already gone is no error (S3's DeleteObjects says so too).
        """
        folder = self.object_name(folder_key(prefix)) + "/"
        names = [
            obj.object_name
            for obj in self._client.list_objects(self.bucket, prefix=folder, recursive=True)
            if obj.object_name
        ]
        failures = list(self._client.remove_objects(self.bucket, [DeleteObject(name) for name in names]))
        if failures:
            first = failures[0]
            raise OSError(f"could not delete {len(failures)} object(s) under {folder!r}: {first.code} {first.message}")
        return len(names)

    def usage(self, prefix: str) -> int:
        folder = self.object_name(folder_key(prefix)) + "/"
        return sum(obj.size or 0 for obj in self._client.list_objects(self.bucket, prefix=folder, recursive=True))

    def delete_uploads_before(self, before: float) -> int:
        """Listed tenant by tenant (`tenants/<t>/uploads/`), so the outputs are never listed."""
        names: list[str] = []
        for tenant in self._client.list_objects(self.bucket, prefix=f"{self._prefix}tenants/"):
            if not tenant.is_dir or not tenant.object_name:
                continue
            names += [
                obj.object_name
                for obj in self._client.list_objects(self.bucket, prefix=f"{tenant.object_name}uploads/", recursive=True)
                if obj.object_name and obj.last_modified is not None and obj.last_modified.timestamp() < before
            ]
        failures = list(self._client.remove_objects(self.bucket, [DeleteObject(name) for name in names]))
        if failures:
            first = failures[0]
            raise OSError(f"could not delete {len(failures)} expired upload(s): {first.code} {first.message}")
        return len(names)


def _pool(timeout_seconds: float) -> urllib3.PoolManager:
    """minio's default waits 5 minutes per connect; a wrong endpoint should fail in seconds."""
    return urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=min(10.0, timeout_seconds), read=timeout_seconds),
        maxsize=10,
        cert_reqs="CERT_REQUIRED",
        ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        retries=urllib3.Retry(total=3, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
    )
