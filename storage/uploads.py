"""Taking a caller's file into the object store: type from the bytes, size capped, never whole in memory.

The declared content type and file name come from the caller, so the type stored is the
one the first bytes prove when they prove one. Chunks are spooled to an unnamed temp file
(on the data volume when the caller passes one) and handed to the store only once the
upload is complete and within limits, so a refused upload leaves no object behind.

`Uploads` holds the limits and picks the key (under the uploading tenant's folder) for every
way in: the gRPC StorageService.Upload and fal's HTTP storage routes (gateway/fal_storage.py).
Its `UploadBudget` bounds what uploads hold on this gateway before their bytes are stored: the
spools open at once (each an open file, so many tiny uploads cannot use up the descriptors the
gateway needs for everything else), in all and per tenant, and a tenant's bytes, stored ones
included (`tenant_max_upload_bytes`). Bytes are charged as they arrive, so uploads racing each
other cannot pass a limit together.
"""

from __future__ import annotations

import asyncio
import math
import re
import tempfile
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
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


class UploadQuotaExceeded(Exception):
    """Over a limit of what uploads may hold (open spools, a tenant's bytes): nothing was stored; the gateway
    answers RESOURCE_EXHAUSTED / HTTP 429 naming `limit`, like its other quotas."""

    def __init__(self, message: str, *, limit: str, subject: str, retry_after_seconds: float) -> None:
        super().__init__(message)
        self.limit = limit
        self.subject = subject
        self.retry_after_seconds = retry_after_seconds


# A tenant's stored upload bytes are measured again (listing its uploads) at most this often; what this
# gateway stores in between is added as it goes.
STORED_BYTES_TTL_SECONDS = 30.0
# What a caller over an upload quota is told to wait: spools free within seconds, stored bytes when files expire.
SPOOL_RETRY_SECONDS = 5.0
BYTES_RETRY_SECONDS = 60.0


@dataclass
class _TenantUse:
    spools: int = 0
    # Bytes received and not stored yet (spooled, or parts of a multipart upload waiting for `complete`).
    pending: int = 0
    stored: int = 0
    measured_at: float = -math.inf


class UploadBudget:
    """What uploads hold on this gateway, within its limits (0: none). Used from the event loop only.

    `stored_bytes(tenant)` lists the tenant's stored uploads (a blocking call, run in a thread). With several
    gateways, each counts what it is receiving itself, so a tenant can pass its byte quota by what is in
    flight on the others at that moment.
    """

    def __init__(
        self,
        *,
        max_spools: int = 0,
        tenant_max_spools: int = 0,
        tenant_max_bytes: int = 0,
        stored_bytes: Callable[[str], int] | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_refused: Callable[[str, str, str], None] = lambda *_: None,
    ) -> None:
        """`on_refused(tenant, limit, subject)` is told of each refusal as it is made (the gateway's metrics)."""
        if tenant_max_bytes and stored_bytes is None:
            raise ValueError("a tenant byte quota needs a way to measure stored bytes")
        self.max_spools = max_spools
        self.tenant_max_spools = tenant_max_spools
        self.tenant_max_bytes = tenant_max_bytes
        self._stored_bytes = stored_bytes
        self._clock = clock
        self._on_refused = on_refused
        self.open_spools = 0
        self._tenants: dict[str, _TenantUse] = {}

    async def admit(self, tenant: str) -> None:
        """Before a body is read: the tenant's stored bytes measured when stale, refused when already at quota."""
        if not self.tenant_max_bytes:
            return
        assert self._stored_bytes is not None
        use = self._use(tenant)
        if self._clock() - use.measured_at > STORED_BYTES_TTL_SECONDS:
            stored = await asyncio.to_thread(self._stored_bytes, tenant)
            use = self._use(tenant)
            use.stored, use.measured_at = stored, self._clock()
        if use.stored + use.pending >= self.tenant_max_bytes:
            raise self._over_bytes(tenant)

    @contextmanager
    def spool(self, tenant: str) -> Iterator[None]:
        """One spool open (a file receiving bytes) while inside."""
        use = self._use(tenant)
        if self.max_spools and self.open_spools >= self.max_spools:
            raise self._refusal(
                tenant,
                f"this gateway is receiving {self.open_spools} uploads at once, its limit; retry shortly",
                limit="max_upload_spools",
                subject="gateway",
                retry_after_seconds=SPOOL_RETRY_SECONDS,
            )
        if self.tenant_max_spools and use.spools >= self.tenant_max_spools:
            raise self._refusal(
                tenant,
                f"tenant {tenant!r} is sending {use.spools} uploads (or parts) at once, its limit; retry when one is done",
                limit="tenant_max_upload_spools",
                subject=f"tenant:{tenant}",
                retry_after_seconds=SPOOL_RETRY_SECONDS,
            )
        self.open_spools += 1
        use.spools += 1
        try:
            yield
        finally:
            self.open_spools -= 1
            use.spools -= 1
            self._forget_idle(tenant, use)

    def charge(self, tenant: str, size: int) -> None:
        use = self._use(tenant)
        if self.tenant_max_bytes and use.stored + use.pending + size > self.tenant_max_bytes:
            raise self._over_bytes(tenant)
        use.pending += size

    def refund(self, tenant: str, size: int) -> None:
        use = self._use(tenant)
        use.pending -= size
        self._forget_idle(tenant, use)

    def stored(self, tenant: str, size: int) -> None:
        self._use(tenant).stored += size

    def forget_stored(self) -> None:
        """Uploads were deleted (retention): every tenant's stored bytes are measured again at its next upload,
        so a tenant that was at its quota can upload again at once rather than when the measure goes stale."""
        for use in self._tenants.values():
            use.measured_at = -math.inf

    def _use(self, tenant: str) -> _TenantUse:
        return self._tenants.setdefault(tenant, _TenantUse())

    def _forget_idle(self, tenant: str, use: _TenantUse) -> None:
        """Without a byte quota nothing of an idle tenant is worth keeping."""
        if not self.tenant_max_bytes and not use.spools and not use.pending:
            self._tenants.pop(tenant, None)

    def _over_bytes(self, tenant: str) -> UploadQuotaExceeded:
        return self._refusal(
            tenant,
            f"tenant {tenant!r} has {self.tenant_max_bytes} bytes of uploads stored or arriving, its limit; "
            "uploads expire under the retention setting",
            limit="tenant_max_upload_bytes",
            subject=f"tenant:{tenant}",
            retry_after_seconds=BYTES_RETRY_SECONDS,
        )

    def _refusal(
        self, tenant: str, message: str, *, limit: str, subject: str, retry_after_seconds: float
    ) -> UploadQuotaExceeded:
        """The refusal to raise, reported to `on_refused` as it is made."""
        self._on_refused(tenant, limit, subject)
        return UploadQuotaExceeded(message, limit=limit, subject=subject, retry_after_seconds=retry_after_seconds)


class Reservation:
    """The bytes one upload holds before it is stored, charged as they arrive against the upload's cap and its
    tenant's quota. The parts of a multipart upload share one, so parts sent at once cannot pass the cap
    together; once closed (stored, refused or expired) it takes no more bytes."""

    def __init__(self, budget: UploadBudget, tenant: str, max_bytes: int) -> None:
        self._budget = budget
        self.tenant = tenant
        self.max_bytes = max_bytes
        self.size = 0
        self.closed = False

    def charge(self, size: int) -> None:
        if self.closed:
            raise UploadRefused("the upload was completed, refused or has expired")
        if self.size + size > self.max_bytes:
            raise UploadTooLarge(f"the upload is larger than {self.max_bytes} bytes")
        self._budget.charge(self.tenant, size)
        self.size += size

    def refund(self, size: int) -> None:
        if self.closed:
            return
        self.size -= size
        self._budget.refund(self.tenant, size)

    def close(self) -> None:
        self.refund(self.size)
        self.closed = True


def safe_file_name(file_name: str) -> str:
    """The caller's file name as one plain key part (its last path segment), or a random one."""
    # A key part starts with a letter or digit (object_store.check_key): `-rf.png` is stored as `rf.png`.
    base = _UNSAFE.sub("_", file_name.rsplit("/", 1)[-1]).lstrip("._-")[:100]
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
        reservation: Reservation | None = None,
        on_stored: Callable[[int], None] | None = None,
        release: Callable[[], None] | None = None,
    ) -> None:
        self._store = store
        self._key = key
        self._reservation = reservation
        # Called from `abort`, which callers run where the budget lives (the event loop), not from `commit`,
        # which may run in a thread.
        self._on_stored = on_stored
        self._release = release
        self._stored_size: int | None = None
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
        if self._reservation is not None:
            self._reservation.charge(len(chunk))
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
            stored = self._store.put_stream(self._key, self._spool, self.size, self._content_type)
        finally:
            self._spool.close()
        self._stored_size = stored.size
        return stored

    def abort(self) -> None:
        """Closes the spool and gives back what the writer held (after `commit` too: then the bytes count as stored)."""
        self._spool.close()
        release, self._release = self._release, None
        if release is None:
            return
        if self._stored_size is not None and self._on_stored is not None:
            self._on_stored(self._stored_size)
        release()

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
        budget: UploadBudget | None = None,
    ) -> None:
        self.store = store
        self.max_bytes = max_bytes
        self.allowed_content_types = allowed_content_types
        self.spool_dir = spool_dir
        self.budget = budget or UploadBudget()
        if spool_dir is not None:
            spool_dir.mkdir(parents=True, exist_ok=True)

    async def admit(self, tenant: str) -> None:
        """Before taking a body from `tenant` (see UploadBudget.admit)."""
        await self.budget.admit(tenant)

    def new_key(self, tenant: str, file_name: str) -> str:
        return upload_key(tenant, safe_file_name(file_name))

    def writer(self, key: str, declared_content_type: str = "", *, tenant: str, charged: bool = True) -> UploadWriter:
        """A writer holding one of the budget's spools until `abort`; `charged` False for bytes already charged
        elsewhere (a multipart upload's parts, copied into one file)."""
        held = ExitStack()
        held.enter_context(self.budget.spool(tenant))
        try:
            reservation = None
            if charged:
                reservation = Reservation(self.budget, tenant, self.max_bytes)
                held.callback(reservation.close)
            return UploadWriter(
                self.store,
                key,
                max_bytes=self.max_bytes,
                declared_content_type=declared_content_type,
                allowed_content_types=self.allowed_content_types,
                spool_dir=self.spool_dir,
                reservation=reservation,
                on_stored=lambda size: self.budget.stored(tenant, size),
                release=held.close,
            )
        except BaseException:
            held.close()
            raise
