"""Quotas and overload answers: what one tenant may hold of a shared service, and what the gateway holds at all.

Per tenant: requests waiting, requests running (enforced at dispatch: a tenant at its limit
waits while others run), submits per second (a token bucket per gateway), open status streams
(per gateway), and a weight, its share of the starts in the fair order (gateway/store.py). For the
gateway: the queue's size and the open status streams. Over a limit the answer is RESOURCE_EXHAUSTED
with RetryInfo and a QuotaFailure naming the limit, at once and before anything is written: nothing
already accepted is dropped. Defaults come from settings; `tenant_limits` overrides them per tenant.
Every refusal is reported, by tenant, to `on_refused` (the gateway's metrics); the upload quotas'
(storage.uploads.UploadBudget) report to the same callback.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from typing import Any

from gateway.auth import ANONYMOUS, check_tenant_name
from gateway.errors import ResourceExhausted
from gateway.store import RequestRecord, RequestStore
from core.config import Settings

# Told of each refusal: (the refused tenant, the limit, the subject as the QuotaFailure names it).
OnRefused = Callable[[str, str, str], None]

# How long a caller over a count limit (waiting, queue, streams) is told to wait before trying again.
COUNT_RETRY_SECONDS = 5.0


@dataclass(frozen=True)
class TenantLimits:
    weight: float = 1.0
    max_waiting: int = 0
    max_running: int = 0
    submits_per_second: float = 0.0
    max_open_streams: int = 0


def parse_tenant_limits(settings: Settings) -> tuple[TenantLimits, dict[str, TenantLimits]]:
    """The default limits and the per-tenant ones; a bad `tenant_limits` is refused at start, by name."""
    default = TenantLimits(
        max_waiting=settings.tenant_max_waiting,
        max_running=settings.tenant_max_running,
        submits_per_second=settings.tenant_submits_per_second,
        max_open_streams=settings.tenant_max_open_streams,
    )
    if not settings.tenant_limits.strip():
        return default, {}
    allowed = {f.name: f.type for f in fields(TenantLimits)}
    try:
        raw = json.loads(settings.tenant_limits)
        if not isinstance(raw, dict):
            raise ValueError("it must be a JSON object of tenant → limits")
        per_tenant = {}
        for tenant, limits in raw.items():
            if tenant != ANONYMOUS:
                check_tenant_name(tenant)
            unknown = set(limits) - set(allowed)
            if unknown:
                raise ValueError(f"tenant {tenant!r}: unknown limit(s) {sorted(unknown)}; known: {sorted(allowed)}")
            values: dict[str, Any] = {
                k: float(v) if k in ("weight", "submits_per_second") else int(v) for k, v in limits.items()
            }
            merged = replace(default, **values)
            if merged.weight <= 0:
                raise ValueError(f"tenant {tenant!r}: weight must be more than 0, got {merged.weight}")
            per_tenant[str(tenant)] = merged
    except (ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"setting `tenant_limits` (LORASERVE_TENANT_LIMITS): {exc}") from None
    return default, per_tenant


class Quotas:
    def __init__(self, settings: Settings, store: RequestStore, on_refused: OnRefused = lambda *_: None) -> None:
        self._store = store
        self._on_refused = on_refused
        self._default, self._per_tenant = parse_tenant_limits(settings)
        self._max_queue = settings.max_queue_size
        self._max_streams = settings.max_open_streams
        self.open_streams = 0
        self._tenant_streams: dict[str, int] = {}
        # Token buckets: tenant → (tokens, last refill, monotonic seconds).
        self._buckets: dict[str, tuple[float, float]] = {}

    def limits(self, tenant: str) -> TenantLimits:
        return self._per_tenant.get(tenant, self._default)

    @property
    def limits_running(self) -> bool:
        return bool(self._default.max_running or any(t.max_running for t in self._per_tenant.values()))

    async def admit(self, tenant: str) -> None:
        """Before a Submit writes anything: RESOURCE_EXHAUSTED when the tenant or the gateway is full."""
        limits = self.limits(tenant)
        if limits.submits_per_second > 0:
            self._take_token(tenant, limits.submits_per_second)
        if self._max_queue and self._store.known_queue_depth() >= self._max_queue:
            raise self._refusal(
                tenant,
                f"the queue is full ({self._max_queue} waiting); retry later",
                limit="max_queue_size",
                subject="gateway",
                retry_after_seconds=COUNT_RETRY_SECONDS,
            )
        if limits.max_waiting:
            # The answer without a write for a tenant known to be full; `store.add(max_waiting=)` holds the
            # limit exactly, whatever Submits race past this check on this or other gateways.
            waiting, _ = await self._store.tenant_activity(tenant)
            if waiting >= limits.max_waiting:
                raise self.tenant_full(tenant, waiting)

    def tenant_full(self, tenant: str, waiting: int) -> ResourceExhausted:
        return self._refusal(
            tenant,
            f"tenant {tenant!r} already has {waiting} requests waiting, its limit; retry when some have run",
            limit="max_waiting",
            subject=f"tenant:{tenant}",
            retry_after_seconds=COUNT_RETRY_SECONDS,
        )

    def _refusal(
        self, tenant: str, message: str, *, limit: str, subject: str, retry_after_seconds: float
    ) -> ResourceExhausted:
        """The refusal to raise, reported to `on_refused` as it is made."""
        self._on_refused(tenant, limit, subject)
        return ResourceExhausted(message, limit=limit, subject=subject, retry_after_seconds=retry_after_seconds)

    def _take_token(self, tenant: str, rate: float) -> None:
        now = time.monotonic()
        burst = max(1.0, rate)
        tokens, last = self._buckets.get(tenant, (burst, now))
        tokens = min(burst, tokens + (now - last) * rate)
        if tokens < 1.0:
            self._buckets[tenant] = (tokens, now)
            raise self._refusal(
                tenant,
                f"tenant {tenant!r} submits more than {rate:g} requests per second",
                limit="submits_per_second",
                subject=f"tenant:{tenant}",
                retry_after_seconds=(1.0 - tokens) / rate,
            )
        self._buckets[tenant] = (tokens - 1.0, now)

    async def may_run(self, record: RequestRecord) -> bool:
        """At dispatch: a tenant at its running limit waits (others' requests go first)."""
        limit = self.limits(record.tenant).max_running
        if not limit:
            return True
        _, running = await self._store.tenant_activity(record.tenant)
        return running < limit

    def tenant_streams(self, tenant: str) -> int:
        return self._tenant_streams.get(tenant, 0)

    @contextmanager
    def stream(self, tenant: str) -> Iterator[None]:
        """One open status stream, within the tenant's limit and the gateway's."""
        held = self.tenant_streams(tenant)
        limit = self.limits(tenant).max_open_streams
        if limit and held >= limit:
            raise self._refusal(
                tenant,
                f"tenant {tenant!r} has {held} status streams open on this gateway, its limit; close one,"
                " poll GetStatus or retry",
                limit="max_open_streams",
                subject=f"tenant:{tenant}",
                retry_after_seconds=COUNT_RETRY_SECONDS,
            )
        if self._max_streams and self.open_streams >= self._max_streams:
            raise self._refusal(
                tenant,
                f"this gateway has {self.open_streams} status streams open, its limit; poll GetStatus or retry",
                limit="max_open_streams",
                subject="gateway",
                retry_after_seconds=COUNT_RETRY_SECONDS,
            )
        self.open_streams += 1
        self._tenant_streams[tenant] = held + 1
        try:
            yield
        finally:
            self.open_streams -= 1
            left = self._tenant_streams.pop(tenant, 0) - 1
            if left > 0:
                self._tenant_streams[tenant] = left

