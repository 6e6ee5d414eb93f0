"""fal's storage upload routes on the gateway's HTTP port (spec/fal-queue-protocol.md §2.7, §3.6, §6.4).

fal's clients upload a file before naming it in a request; a caller that points fal's REST and
CDN URLs at the gateway (or uses the JS `proxyUrl`) gets these routes:

* Python `fal-client`, v3 CDN: `POST /storage/auth/token` (a `Key`) gives a short-lived token
  bound to the tenant; `POST /files/upload` (raw body, `Authorization: Bearer <token>`) stores
  a file; `POST /files/upload/multipart`, `PUT {access_url}/multipart/{id}/{n}` (answered with an
  `ETag`) and `POST …/complete` store a large one.
* Python's "fal" fallback and JS: `POST /storage/upload/initiate` (a `Key`) gives an `upload_url`
  the caller then `PUT`s the bytes to, with or without credentials (JS sends none): the URL
  itself is the capability, signed over the object's key (under the tenant's folder) and an
  expiry, like an S3 presigned PUT. `POST /storage/upload/initiate-multipart` gives a part URL
  (`PUT …/{n}` answered with JSON `{partNumber, etag}`, then `POST …/complete`).

Every way in ends in the same `storage.uploads.Uploads` as the gRPC StorageService.Upload: the
same size cap (413 past it) and type check from the bytes (415 for a refused type), the same
budget (spools open at once, the tenant's bytes: 429 past it), the key under the uploader's
tenant's folder, so only that tenant's requests can use the file as an input.

Tokens, upload URLs and multipart uploads name the key they were minted under, and stop working
when it is revoked (as the key itself does, within KEY_CACHE_SECONDS).

A multipart upload's parts wait in files of this gateway's spool folder until `complete` (or until
it expires), each open only while its bytes arrive, so parts cost no descriptors between requests:
at most MAX_PARTS parts, every one but the last at least `upload_min_part_bytes`, together at most
`max_upload_bytes` (one reservation charged as bytes arrive, whichever part they belong to),
MAX_OPEN_MULTIPART uploads at once (MAX_OPEN_MULTIPART_PER_TENANT per tenant), each for
MULTIPART_SECONDS; a sweeper drops expired ones every SWEEP_SECONDS. Several gateways behind one
address need session affinity for multipart uploads; single-part uploads work on any gateway that
shares the signing secret (derived from `worker_shared_secret`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import hashlib
import hmac
import json
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from aiohttp import web

from gateway.auth import ANONYMOUS, Authenticator
from gateway.errors import ServiceError, Unauthenticated, to_http
from gateway.http_json import read_json
from gateway.periodic import Periodic
from gateway.store import StoreUnavailable
from core.config import Settings
from loraserve.request.violations import InvalidInput
from storage.object_store import InvalidKey, check_key, load_or_create_secret, signature_matches
from storage.uploads import (
    Reservation,
    UploadQuotaExceeded,
    UploadRefused,
    Uploads,
    UploadTooLarge,
    UploadTypeRefused,
    UploadWriter,
)

TOKEN_SECONDS = 3600
UPLOAD_URL_SECONDS = 3600
MULTIPART_SECONDS = 3600
MAX_PARTS = 10_000
MAX_OPEN_MULTIPART = 64
MAX_OPEN_MULTIPART_PER_TENANT = 8
# S3's minimum for every part but the last; fal's clients send 10 MiB parts.
DEFAULT_MIN_PART_BYTES = 5 * 1024 * 1024
SWEEP_SECONDS = 60.0
READ_CHUNK_BYTES = 1 << 20
TOKEN_TYPE = "Bearer"
# Where the signing secret is made when the operator sets no worker secret (the embedded default).
SECRET_FILE = "fal-storage.key"
DEFAULT_FILE_NAME = "upload.bin"

PublicBase = Callable[[web.Request], str]


def signing_secret(settings: Settings) -> bytes:
    """Shared by every gateway that shares the worker secret, so any of them accepts the others' upload URLs."""
    root = settings.worker_shared_secret.encode() or load_or_create_secret(settings.data_dir / SECRET_FILE)
    return hmac.new(root, b"loraserve fal storage v1", hashlib.sha256).digest()


def request_base(request: web.Request) -> str:
    """The scheme and host the caller used (aiohttp's, which a forwarded-headers middleware may have set)."""
    return f"{request.scheme}://{request.host}"


class StorageHttpError(Exception):
    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers or {}


@dataclasses.dataclass
class _Part:
    size: int
    etag: str


@dataclasses.dataclass
class _Multipart:
    tenant: str
    # The key it was started under ("" for the anonymous tenant): revoking the key ends the upload.
    key_id: str
    key: str
    declared_content_type: str
    expires_at: float
    # Holds a file per part (`<n>`), open only while that part's bytes arrive.
    folder: Path
    reservation: Reservation
    parts: dict[int, _Part] = dataclasses.field(default_factory=dict)

    def part_path(self, number: int) -> Path:
        return self.folder / str(number)

    def close(self) -> None:
        """Deletes the parts and gives their bytes back; parts still arriving find the upload closed."""
        self.parts.clear()
        self.reservation.close()
        shutil.rmtree(self.folder, ignore_errors=True)


class MultipartSweeper(Periodic):
    name = "multipart upload sweep"

    def __init__(
        self, storage: FalStorage, on_error: Callable[[BaseException], None], period_seconds: float = SWEEP_SECONDS
    ) -> None:
        super().__init__(period_seconds, on_error)
        self._storage = storage

    async def run_once(self) -> int:
        return await self._storage.sweep()


class FalStorage:
    def __init__(
        self,
        uploads: Uploads,
        auth: Authenticator,
        *,
        secret: bytes,
        public_base: PublicBase = request_base,
        min_part_bytes: int = DEFAULT_MIN_PART_BYTES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._uploads = uploads
        self._auth = auth
        self._secret = secret
        self._public_base = public_base
        self._min_part_bytes = min_part_bytes
        self._clock = clock
        self._multipart: dict[str, _Multipart] = {}
        self.parts_dir = (uploads.spool_dir or Path(tempfile.gettempdir())) / "multipart"
        self.parts_dir.mkdir(parents=True, exist_ok=True)

    # --- fal's v3 CDN (Python fal-client) ---------------------------------------------------------

    async def auth_token(self, request: web.Request) -> web.Response:
        tenant, key_id = await self._key_caller(request)
        expires = int(self._clock()) + TOKEN_SECONDS
        claims = {"t": tenant, "k": key_id, "e": expires}
        body = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
        return _json(
            {
                "token": f"{body}.{self._sign('token', body)}",
                "token_type": TOKEN_TYPE,
                "base_url": self._public_base(request),
                "expires_at": datetime.fromtimestamp(expires, UTC).isoformat(),
            }
        )

    async def cdn_upload(self, request: web.Request) -> web.Response:
        tenant, _ = await self._cdn_caller(request)
        key = self._uploads.new_key(tenant, request.headers.get("X-Fal-File-Name", DEFAULT_FILE_NAME))
        stored = await self._receive(request, key, tenant, request.headers.get("Content-Type", ""))
        return _json({"access_url": stored})

    async def cdn_multipart_create(self, request: web.Request) -> web.Response:
        tenant, key_id = await self._cdn_caller(request)
        key = self._uploads.new_key(tenant, request.headers.get("X-Fal-File-Name", DEFAULT_FILE_NAME))
        upload_id = self._open_multipart(tenant, key_id, key, request.headers.get("Content-Type", ""))
        # fal's client sends the parts to `{access_url}/multipart/…` and returns `access_url` itself, so it
        # can carry no query (no signature): a URL that names the key as its tenant's input, nothing more.
        return _json({"access_url": self._uploads.store.unsigned_url(key), "uploadId": upload_id})

    async def cdn_multipart_part(self, request: web.Request) -> web.Response:
        upload = await self._multipart_for(request.match_info["upload_id"], request.match_info["key"])
        return await self._receive_part(request, upload)

    async def cdn_multipart_complete(self, request: web.Request) -> web.Response:
        await self._multipart_for(request.match_info["upload_id"], request.match_info["key"])
        return await self._complete(request)

    # --- initiate + PUT (JS, and Python's "fal" fallback) -------------------------------------------

    async def initiate(self, request: web.Request) -> web.Response:
        tenant, key_id = await self._key_caller(request)
        file_name, content_type = await _initiate_body(request)
        key = self._uploads.new_key(tenant, file_name)
        expires = int(self._clock()) + UPLOAD_URL_SECONDS
        upload_url = (
            f"{self._public_base(request)}/storage/upload/put/{key}"
            f"?expires={expires}&kid={quote(key_id, safe='')}&signature={self._sign('put', key, str(expires), key_id)}"
            f"&content_type={quote(content_type, safe='')}"
        )
        return _json({"upload_url": upload_url, "file_url": self._uploads.store.url(key)})

    async def put(self, request: web.Request) -> web.Response:
        key, expires = request.match_info["key"], request.query.get("expires", "")
        signature, key_id = request.query.get("signature", ""), request.query.get("kid", "")
        if (
            not (expires.isascii() and expires.isdigit())
            or int(expires) < self._clock()
            or not signature_matches(self._sign("put", key, expires, key_id), signature)
        ):
            raise StorageHttpError(403, "the upload URL is not signed by this service or has expired")
        tenant = await self._minted_tenant(key_id, 403, "upload URL")
        declared = request.headers.get("Content-Type") or request.query.get("content_type", "")
        return _json({"file_url": await self._receive(request, key, tenant, declared)})

    async def initiate_multipart(self, request: web.Request) -> web.Response:
        tenant, key_id = await self._key_caller(request)
        file_name, content_type = await _initiate_body(request)
        key = self._uploads.new_key(tenant, file_name)
        upload_id = self._open_multipart(tenant, key_id, key, content_type)
        return _json(
            {
                "upload_url": f"{self._public_base(request)}/storage/upload/multipart/{upload_id}",
                "file_url": self._uploads.store.url(key),
            }
        )

    async def multipart_part(self, request: web.Request) -> web.Response:
        return await self._receive_part(request, await self._multipart_for(request.match_info["upload_id"]))

    async def multipart_complete(self, request: web.Request) -> web.Response:
        await self._multipart_for(request.match_info["upload_id"])
        return await self._complete(request)

    async def sweep(self) -> int:
        """Drops expired multipart uploads (here, where the budget lives) and, in a thread, part folders no
        upload of this gateway owns that are older than an upload lives (left by a gateway that stopped);
        returns how many went."""
        dropped = self._drop_expired()
        live = {upload.folder.name for upload in self._multipart.values()}
        return dropped + await asyncio.to_thread(self._drop_leftovers, live)

    def _drop_leftovers(self, live: set[str]) -> int:
        dropped = 0
        oldest = time.time() - MULTIPART_SECONDS
        for folder in self.parts_dir.iterdir():
            try:
                stale = folder.name not in live and folder.stat().st_mtime < oldest
            except FileNotFoundError:
                continue
            if stale:
                shutil.rmtree(folder, ignore_errors=True)
                dropped += 1
        return dropped

    # --- the parts ------------------------------------------------------------------------------

    async def _key_caller(self, request: web.Request) -> tuple[str, str]:
        try:
            return await self._auth.caller_of_header(request.headers.get("Authorization"))
        except Unauthenticated as exc:
            raise StorageHttpError(401, exc.message) from None

    async def _minted_tenant(self, key_id: str, status: int, what: str) -> str:
        """The tenant a credential minted under `key_id` acts for, while that key is in force; "" (no key)
        is the anonymous tenant, only on a gateway that takes calls without keys."""
        if not key_id:
            if self._auth.required:
                raise StorageHttpError(status, f"the {what} is not one this service issued")
            return ANONYMOUS
        try:
            return await self._auth.key_tenant(key_id)
        except Unauthenticated as exc:
            raise StorageHttpError(status, f"the {what} no longer works: {exc.message}") from None

    async def _cdn_caller(self, request: web.Request) -> tuple[str, str]:
        """A token from `auth_token` (what fal's CDN takes), or a `Key` like every other route."""
        scheme, _, credentials = request.headers.get("Authorization", "").strip().partition(" ")
        if scheme.lower() != TOKEN_TYPE.lower():
            return await self._key_caller(request)
        body, _, signature = credentials.strip().partition(".")
        if not (body.isascii() and signature_matches(self._sign("token", body), signature)):
            raise StorageHttpError(401, "the upload token is not one this service issued")
        try:
            claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        except (ValueError, binascii.Error):
            raise StorageHttpError(401, "the upload token is not one this service issued") from None
        if int(claims["e"]) < self._clock():
            raise StorageHttpError(401, "the upload token has expired; ask /storage/auth/token for a new one")
        key_id = str(claims.get("k", ""))
        tenant = await self._minted_tenant(key_id, 401, "upload token")
        if tenant != claims["t"]:
            raise StorageHttpError(401, "the upload token is not one this service issued")
        return tenant, key_id

    def _sign(self, purpose: str, *parts: str) -> str:
        return hmac.new(self._secret, "\n".join((purpose, *parts)).encode(), hashlib.sha256).hexdigest()

    async def _receive(self, request: web.Request, key: str, tenant: str, declared_content_type: str) -> str:
        """The body into the store under `key`, through the same writer (caps, type check) as gRPC uploads."""
        try:
            check_key(key)
        except InvalidKey:
            raise StorageHttpError(404, "no such upload") from None
        await self._uploads.admit(tenant)
        with self._uploads.writer(key, declared_content_type, tenant=tenant) as writer:
            await self._stream_into(request, writer.write)
            stored = await asyncio.to_thread(writer.commit)
        return stored.url

    async def _stream_into(self, request: web.Request, write: Callable[[bytes], object]) -> int:
        if request.content_length is not None and request.content_length > self._uploads.max_bytes:
            raise UploadTooLarge(f"the upload is larger than {self._uploads.max_bytes} bytes")
        size = 0
        async for chunk in request.content.iter_chunked(READ_CHUNK_BYTES):
            size += len(chunk)
            write(chunk)
        return size

    def _open_multipart(self, tenant: str, key_id: str, key: str, declared_content_type: str) -> str:
        self._drop_expired()
        if len(self._multipart) >= MAX_OPEN_MULTIPART or (
            sum(1 for upload in self._multipart.values() if upload.tenant == tenant) >= MAX_OPEN_MULTIPART_PER_TENANT
        ):
            raise StorageHttpError(
                429, "too many multipart uploads in progress; finish one first", {"Retry-After": "10"}
            )
        upload_id = secrets.token_urlsafe(24)
        folder = self.parts_dir / secrets.token_hex(16)
        folder.mkdir()
        self._multipart[upload_id] = _Multipart(
            tenant=tenant,
            key_id=key_id,
            key=key,
            declared_content_type=declared_content_type,
            expires_at=self._clock() + MULTIPART_SECONDS,
            folder=folder,
            reservation=Reservation(self._uploads.budget, tenant, self._uploads.max_bytes),
        )
        return upload_id

    def _drop_expired(self) -> int:
        now = self._clock()
        expired = [upload_id for upload_id, upload in list(self._multipart.items()) if upload.expires_at < now]
        for upload_id in expired:
            upload = self._multipart.pop(upload_id, None)
            if upload is not None:
                upload.close()
        return len(expired)

    async def _multipart_for(self, upload_id: str, key: str | None = None) -> _Multipart:
        """The live upload, while the key it was started under is in force (revoking the key ends it)."""
        self._drop_expired()
        upload = self._multipart.get(upload_id)
        if upload is None or (key is not None and upload.key != key):
            raise StorageHttpError(404, "no such multipart upload (never started, completed, or expired)")
        if upload.key_id:
            await self._minted_tenant(upload.key_id, 403, "multipart upload")
        return upload

    async def _receive_part(self, request: web.Request, upload: _Multipart) -> web.Response:
        raw = request.match_info["part"]
        if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_PARTS:
            raise StorageHttpError(400, f"a part number is an integer from 1 to {MAX_PARTS}")
        number, upload_id = int(raw), request.match_info["upload_id"]
        await self._uploads.admit(upload.tenant)
        if self._multipart.get(upload_id) is not upload:
            raise StorageHttpError(404, "no such multipart upload (never started, completed, or expired)")
        digest = hashlib.sha256()
        charged = 0

        with self._uploads.budget.spool(upload.tenant):
            previous = upload.parts.pop(number, None)
            if previous is not None:
                # Sent again: the old bytes stop counting as the new ones start (kept when refused a spool).
                upload.reservation.refund(previous.size)
                upload.part_path(number).unlink(missing_ok=True)
            fd, spooled = tempfile.mkstemp(dir=upload.folder, prefix=f".{number}-")
            landed = False
            try:
                with os.fdopen(fd, "wb") as spool:

                    def write(chunk: bytes) -> None:
                        nonlocal charged
                        upload.reservation.charge(len(chunk))
                        charged += len(chunk)
                        digest.update(chunk)
                        spool.write(chunk)

                    size = await self._stream_into(request, write)
                if self._multipart.get(upload_id) is not upload:
                    raise StorageHttpError(404, "no such multipart upload (never started, completed, or expired)")
                self._check_short_part(upload, number, size)
                replaced = upload.parts.pop(number, None)  # the same part, sent at once and landed first
                if replaced is not None:
                    upload.reservation.refund(replaced.size)
                os.replace(spooled, upload.part_path(number))
                landed = True
            finally:
                if not landed:
                    Path(spooled).unlink(missing_ok=True)
                    upload.reservation.refund(charged)
        etag = digest.hexdigest()[:32]
        upload.parts[number] = _Part(size=size, etag=etag)
        return _json({"partNumber": number, "etag": etag}, headers={"ETag": f'"{etag}"'})

    def _check_short_part(self, upload: _Multipart, number: int, size: int) -> None:
        """Only the last part may be shorter than the minimum, so at most one short part is kept at a time:
        a flood of tiny parts is refused as it comes, not at `complete`."""
        if size >= self._min_part_bytes:
            return
        for other, part in upload.parts.items():
            if other != number and part.size < self._min_part_bytes:
                raise StorageHttpError(
                    400,
                    f"part {number} has {size} bytes and part {other} has {part.size}: every part but the last "
                    f"must have at least {self._min_part_bytes} bytes",
                )

    async def _complete(self, request: web.Request) -> web.Response:
        """The listed parts, in order, through one writer; once the writer has its spool the upload is gone
        afterwards, whatever happens. A gateway receiving its limit of uploads refuses before that (429), and
        the upload waits for the caller's retry."""
        upload_id = request.match_info["upload_id"]
        listed = _listed_parts(await read_json(request))
        upload = self._multipart.get(upload_id)
        if upload is None:
            raise StorageHttpError(404, "no such multipart upload (never started, completed, or expired)")
        # The parts' bytes are charged already: the writer holds a spool, no second share of the quota.
        with self._uploads.writer(
            upload.key, upload.declared_content_type, tenant=upload.tenant, charged=False
        ) as writer:
            del self._multipart[upload_id]
            try:
                for number, etag in listed:
                    part = upload.parts.get(number)
                    if part is None or (etag and etag.strip('"') != part.etag):
                        raise StorageHttpError(400, f"part {number} was not uploaded (or its etag differs)")
                if not listed:
                    raise UploadRefused("the upload is empty")
                for number, _ in listed[:-1]:
                    if upload.parts[number].size < self._min_part_bytes:
                        raise StorageHttpError(
                            400,
                            f"part {number} has {upload.parts[number].size} bytes: every part but the last must "
                            f"have at least {self._min_part_bytes} bytes",
                        )
                numbers = [number for number, _ in listed]
                stored = await asyncio.to_thread(_assemble, upload, numbers, writer)
            finally:
                upload.close()
        return _json({"access_url": stored, "file_url": stored})


def _assemble(upload: _Multipart, numbers: list[int], writer: UploadWriter) -> str:
    for number in numbers:
        with upload.part_path(number).open("rb") as part:
            while chunk := part.read(READ_CHUNK_BYTES):
                writer.write(chunk)
    return writer.commit().url


def add_storage_routes(app: web.Application, storage: FalStorage) -> None:
    """The routes at the root of the HTTP port; add them before any catch-all route."""
    routes: list[tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]]]] = [
        ("POST", "/storage/auth/token", storage.auth_token),
        ("POST", "/files/upload", storage.cdn_upload),
        ("POST", "/files/upload/multipart", storage.cdn_multipart_create),
        ("PUT", "/files/{key:.+}/multipart/{upload_id}/{part}", storage.cdn_multipart_part),
        ("POST", "/files/{key:.+}/multipart/{upload_id}/complete", storage.cdn_multipart_complete),
        ("POST", "/storage/upload/initiate", storage.initiate),
        ("PUT", "/storage/upload/put/{key:.+}", storage.put),
        ("POST", "/storage/upload/initiate-multipart", storage.initiate_multipart),
        ("PUT", "/storage/upload/multipart/{upload_id}/{part}", storage.multipart_part),
        ("POST", "/storage/upload/multipart/{upload_id}/complete", storage.multipart_complete),
    ]
    for method, path, handler in routes:
        app.router.add_route(method, path, _answering_json(handler))
        app.router.add_route(method, path + "/", _answering_json(handler))


def _answering_json(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """Every refusal as fal's JSON `{"detail": …}` with its status; nothing else escapes as text."""

    async def handle(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except StorageHttpError as exc:
            return _json({"detail": exc.detail}, status=exc.status, headers=exc.headers)
        except UploadTooLarge as exc:
            return _json({"detail": str(exc)}, status=413)
        except UploadTypeRefused as exc:
            return _json({"detail": str(exc)}, status=415)
        except UploadRefused as exc:
            return _json({"detail": str(exc)}, status=400)
        except (ServiceError, InvalidInput, StoreUnavailable, UploadQuotaExceeded) as exc:
            # As the queue routes answer them (gateway/errors.py): a body that is not JSON 422, a store outage 503,
            # nothing changed; over an upload quota 429 with Retry-After, like the other quotas.
            answer = to_http(exc)
            return _json(answer.body, status=answer.status, headers=answer.headers)

    return handle


def _json(body: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(body, status=status, headers=headers)


async def _initiate_body(request: web.Request) -> tuple[str, str]:
    body = await read_json(request)
    if not isinstance(body, dict):
        raise StorageHttpError(422, "the body must be a JSON object with file_name and content_type")
    file_name, content_type = body.get("file_name") or DEFAULT_FILE_NAME, body.get("content_type") or ""
    if not isinstance(file_name, str) or not isinstance(content_type, str):
        raise StorageHttpError(422, "file_name and content_type must be strings")
    return file_name, content_type


def _listed_parts(body: Any) -> list[tuple[int, str]]:
    parts = body.get("parts") if isinstance(body, dict) else None
    if not isinstance(parts, list) or len(parts) > MAX_PARTS:
        raise StorageHttpError(422, f'the body must be {{"parts": [{{"partNumber", "etag"}}, …]}}, at most {MAX_PARTS}')
    listed: list[tuple[int, str]] = []
    for part in parts:
        number = part.get("partNumber") if isinstance(part, dict) else None
        if not isinstance(number, int) or isinstance(number, bool):
            raise StorageHttpError(422, "every part needs an integer partNumber")
        listed.append((number, str(part.get("etag") or "")))
    numbers = [number for number, _ in listed]
    if numbers != sorted(set(numbers)):
        raise StorageHttpError(422, "parts must be listed once each, in ascending partNumber order")
    return listed
