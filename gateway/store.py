"""RequestStore: the queue and history of requests, behind one interface with two engines.

Everything a caller can ask about a request — its place in the queue, its logs, its
progress, its result — is read from here, so any gateway answers the same and a
restarted one picks up what was waiting. SQLite (`gateway/store_sqlite.py`) is the
embedded default for one gateway; PostgreSQL (`gateway/store_postgres.py`) lets any
number of gateways share one queue.

A running request is held under a lease: `claim` hands it to this gateway with a fresh
token, the owner renews the lease while the worker call runs, and every write the run
makes (progress, result, requeue) names the token. When the owner dies its lease runs
out and `take_back` returns the request to the queue (or fails it once it has used its
attempts), so a late result from a lost owner never overwrites the new run's.
"""

from __future__ import annotations

import functools
import os
import socket
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

from loraserve.errors import ErrorType
from loraserve.v1 import flux_pb2, types_pb2, worker_pb2

if TYPE_CHECKING:
    from core.config import Settings


class State(StrEnum):
    IN_QUEUE = "IN_QUEUE"
    IN_PROGRESS = "IN_PROGRESS"
    COMPLETED = "COMPLETED"
    CANCELLED = "CANCELLED"


FINAL_STATES = (State.COMPLETED, State.CANCELLED)


# What the queue keeps of a request's input: fal-ai/lora's GenerateInput, or a fal-ai/flux-lora FluxInput
# wrapped so that the two are told apart (RequestRecord.flux_input).
QueuedInput: TypeAlias = types_pb2.GenerateInput | worker_pb2.QueuedFluxInput


@dataclass(frozen=True)
class RequestRecord:
    seq: int
    id: str
    state: State
    # Kept serialized: a status stream reads a record on every change and never needs these parsed.
    raw_input: bytes
    seed: int
    model_key: str
    created_at: float
    started_at: float | None
    finished_at: float | None
    attempts: int
    step: int
    total_steps: int
    raw_output: bytes | None
    error: types_pb2.RequestError | None
    inference_seconds: float | None
    # The gateway running it and the token of that run (both empty unless IN_PROGRESS).
    owner: str = ""
    lease_token: str = ""
    # A waiting request not started by then fails (fal's `start_timeout`); None: no limit.
    start_deadline: float | None = None
    # Requests waiting ahead of it, read with the record by `get` (one round trip for GetStatus).
    queue_position: int | None = field(default=None, compare=False)
    # Whose it is (the tenant of the API key that submitted it; "" without auth): nobody else sees it.
    tenant: str = ""
    # When its result, logs and files were deleted (retention_seconds after it finished); None: still kept.
    expired_at: float | None = None
    # 0 normal, 1 low (fal's `X-Fal-Queue-Priority: low` runs only when no normal request waits).
    priority: int = 0
    # Its place in the fair order between tenants (self-clocked fair queueing: the queue's clock or
    # the tenant's last tag, whichever is later, plus 1 / the tenant's weight). Waiting requests
    # start in (priority, fair_tag, seq) order, and queue positions count in that order.
    fair_tag: float = 0.0
    # Where its result is POSTed once it ends (fal's `fal_webhook`); "" for none.
    webhook_url: str = ""
    # Back in the queue after a failed attempt: no gateway claims it before then (epoch seconds, the
    # store's clock); None: no backoff.
    not_before: float | None = None
    # The W3C `traceparent` of its submit span (core/tracing.py): its dispatches, on any gateway, continue
    # that trace. "" when tracing was off.
    trace_context: str = ""

    @functools.cached_property
    def input(self) -> types_pb2.GenerateInput:
        return types_pb2.GenerateInput.FromString(self.raw_input)

    @functools.cached_property
    def flux_input(self) -> flux_pb2.FluxInput | None:
        """The input of a fal-ai/flux-lora request; None for a fal-ai/lora one (worker.proto's QueuedFluxInput)."""
        queued = worker_pb2.QueuedFluxInput.FromString(self.raw_input)
        return queued.input if queued.HasField("input") else None

    @functools.cached_property
    def output(self) -> types_pb2.GenerateOutput | None:
        return None if self.raw_output is None else types_pb2.GenerateOutput.FromString(self.raw_output)

    @property
    def order(self) -> tuple[int, float, int]:
        return (self.priority, self.fair_tag, self.seq)

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES


@dataclass(frozen=True)
class LogRecord:
    seq: int
    entry: types_pb2.LogEntry


@dataclass(frozen=True)
class Preview:
    """A running request's latest live preview (gateway/previews.py)."""

    # Grows with every preview of the request, whichever gateway wrote it: a stream sends what is newer.
    version: int
    step: int
    total: int
    jpeg: bytes


@dataclass(frozen=True)
class ApiKey:
    """An API key as stored: only a digest of its secret, never the secret."""

    id: str
    tenant: str
    name: str
    secret_sha256: str
    created_at: float
    revoked_at: float | None = None


@dataclass(frozen=True)
class WebhookDelivery:
    """A request's webhook: made when the request ends (in the same transaction), attempted until delivered
    or given up. `claim_token` names the sender attempting it now; `body` is fixed at the first attempt."""

    request_id: str
    tenant: str
    url: str
    body: bytes | None
    attempts: int
    next_attempt_at: float
    created_at: float
    claim_token: str = ""
    last_status: int | None = None
    last_error: str = ""
    delivered_at: float | None = None
    given_up_at: float | None = None


@dataclass(frozen=True)
class TakenBack:
    """Requests whose owner's lease ran out: back in the queue, or failed after their last attempt."""

    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.requeued or self.failed)


class StoreUnavailable(Exception):
    """The store's database cannot be reached; the caller may retry later."""


class TenantFull(Exception):
    """`add` refused a new request: its tenant already has `max_waiting` requests waiting."""

    def __init__(self, waiting: int) -> None:
        super().__init__(f"{waiting} requests waiting")
        self.waiting = waiting


def lost_owner_error(attempts: int) -> types_pb2.RequestError:
    return types_pb2.RequestError(
        type=ErrorType.WORKER_FAILED,
        message=f"the request was running when its worker or gateway was lost, {attempts} time(s);"
        " it is not run again (max_attempts)",
    )


def start_timeout_error() -> types_pb2.RequestError:
    return types_pb2.RequestError(
        type=ErrorType.START_TIMEOUT, message="the request was not started within its start_timeout; it did not run"
    )


CANCELLED_BY_CALLER = types_pb2.RequestError(type=ErrorType.CANCELLED, message="cancelled by the caller")


class RequestStore(Protocol):
    """What the gateway needs of a store; both engines pass the same tests (tests/unit/test_unit_store.py)."""

    # This gateway's name in leases; unique per process.
    owner: str
    lease_seconds: float

    async def add(
        self,
        inp: QueuedInput,
        *,
        seed: int,
        model_key: str,
        client_request_id: str = "",
        start_timeout_seconds: float = 0.0,
        tenant: str = "",
        priority: int = 0,
        weight: float = 1.0,
        webhook_url: str = "",
        max_waiting: int = 0,
        trace_context: str = "",
    ) -> tuple[RequestRecord, bool]:
        """Queues a request durably, in fair order among tenants (`weight`: the tenant's share); returns
        (record, created). A client_request_id the tenant used before returns that request instead.
        `max_waiting` > 0: TenantFull when the tenant already has that many waiting, counted in the
        transaction that inserts, so concurrent Submits through any number of gateways cannot overshoot.
        With a `webhook_url`, whatever ends the request also creates its WebhookDelivery, in one transaction."""
        ...

    async def tenant_activity(self, tenant: str) -> tuple[int, int]:
        """The tenant's (waiting, running) requests, for its quotas."""
        ...

    async def get(self, request_id: str) -> RequestRecord | None: ...

    async def queue_position(self, record: RequestRecord) -> int:
        """Requests waiting ahead of this one in start order (as read with the record, when `get` read it).
        Neither engine counts rows for it: both keep the waiting requests' order in memory (a binary search)."""
        ...

    async def waiting_count(self) -> int: ...

    def known_queue_depth(self) -> int:
        """The queue depth without a query (for a metrics scrape): exact for SQLite, recent for PostgreSQL."""
        ...

    async def reindex(self) -> None:
        """Reads the queue's order from the table again, after rows were written around the store (a bulk load)."""
        ...

    async def waiting(self, limit: int) -> list[RequestRecord]:
        """The head of the queue in start order, leaving out requests still backing off after a failed attempt."""
        ...

    async def next_retry_in(self) -> float | None:
        """Seconds until the first request backing off may start again (None: none is backing off), so a
        gateway wakes for a backoff another gateway began."""
        ...

    async def claim(self, request_id: str) -> RequestRecord | None:
        """IN_QUEUE → IN_PROGRESS under a new lease held by this gateway (one attempt more); None when
        another gateway took it, it is no longer waiting, or it is still backing off."""
        ...

    async def renew(self, leases: Mapping[str, str]) -> set[str]:
        """Extends the leases {request id: token}; returns the ids this gateway still holds."""
        ...

    async def requeue(
        self, request_id: str, token: str, *, refund_attempt: bool = False, delay_seconds: float = 0.0
    ) -> bool:
        """Puts a run back in its original place; `refund_attempt` when the call never reached a worker.
        No gateway claims it for `delay_seconds` (its retry backoff)."""
        ...

    async def recover(self, max_attempts: int) -> TakenBack:
        """At start: requests whose owner is gone go back to the queue (or fail after `max_attempts`)."""
        ...

    async def take_back(self, max_attempts: int) -> TakenBack:
        """Requests whose lease ran out (their owner died) go back to the queue, or fail after `max_attempts`."""
        ...

    async def expire_start_deadlines(self) -> list[str]:
        """Fails waiting requests whose start_timeout has passed; returns their ids."""
        ...

    async def set_progress(
        self, request_id: str, token: str, step: int, total: int, preview_jpeg: bytes = b""
    ) -> None:
        """Records the run's step; a `preview_jpeg` replaces the request's latest preview in the same write."""
        ...

    async def preview(self, request_id: str, after_version: int = 0) -> Preview | None:
        """The request's latest preview if newer than `after_version`: read only by streams that asked for
        previews, so other status reads never carry its bytes. Kept after the request ends, until
        `drop_previews` or expiry."""
        ...

    async def drop_previews(self, finished_before: float) -> int:
        """Drops the previews of requests that finished before `finished_before` (epoch seconds); returns how many."""
        ...

    async def complete(
        self, request_id: str, token: str, output: types_pb2.GenerateOutput, inference_seconds: float
    ) -> bool: ...

    async def fail(self, request_id: str, error: types_pb2.RequestError, token: str | None = None) -> bool:
        """Ends a waiting or running request with an error (state COMPLETED, as fal reports it); with a
        token, only while that run still holds the request."""
        ...

    async def cancel(self, request_id: str) -> bool: ...

    async def add_log(self, request_id: str, entry: types_pb2.LogEntry) -> None: ...

    async def logs(self, request_id: str, after_seq: int = 0) -> list[LogRecord]: ...

    async def add_key(self, key: ApiKey) -> None: ...

    async def key(self, key_id: str) -> ApiKey | None: ...

    async def keys(self) -> list[ApiKey]: ...

    async def revoke_key(self, key_id: str) -> bool: ...

    async def listen(self, on_change: Callable[[str, bool], None]) -> None:
        """Calls `on_change(request_id, moved_queue)` for changes other gateways make (nothing to do for one gateway)."""
        ...

    async def close(self) -> None: ...

    def on_webhook_due(self, callback: Callable[[], None]) -> None:
        """`callback` runs after a commit of this store that created a webhook delivery (to wake the sender)."""
        ...

    async def claim_webhooks(
        self, limit: int, claim_seconds: float, *, per_tenant: int = 0, sending: Mapping[str, int] | None = None
    ) -> list[WebhookDelivery]:
        """Due deliveries (not delivered, not given up, next attempt passed, no live claim), claimed for
        `claim_seconds` under a new token each: one sender at a time attempts a delivery. Taken in turns
        across tenants (every tenant's oldest first, then their second oldest...); with `per_tenant`, a
        tenant with `sending[tenant]` attempts in flight gets at most `per_tenant` minus those."""
        ...

    async def set_webhook_body(self, request_id: str, token: str, body: bytes) -> bytes | None:
        """Fixes the body every attempt sends (the first one set wins); returns the stored body, None when
        the claim was lost."""
        ...

    async def webhook_attempted(
        self,
        request_id: str,
        token: str,
        *,
        status: int | None,
        error: str,
        delivered: bool,
        retry_in_seconds: float | None,
    ) -> bool:
        """Records an attempt and releases the claim: delivered, due again in `retry_in_seconds`, or (None)
        given up. False when the claim was lost (nothing recorded)."""
        ...

    async def webhook(self, request_id: str) -> WebhookDelivery | None: ...

    async def expirable(self, before: float, limit: int) -> list[RequestRecord]:
        """Finished requests not expired yet that finished before `before` (epoch seconds), oldest first."""
        ...

    async def expire(self, request_ids: Sequence[str]) -> list[str]:
        """Marks finished requests expired, dropping their input, output, logs, preview and client_request_id
        (which the tenant may then use again); returns the ids it changed. Their files are the caller's to delete."""
        ...


def new_owner_name() -> str:
    """Unique per gateway process, readable in the table: host, pid and a random part."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


async def open_store(settings: Settings, *, admin: bool = False) -> RequestStore:
    """SQLite in the data dir (locked to this gateway) unless `store_url` names a PostgreSQL database.

    `admin` opens it beside a running gateway (for `loraserve keys`): no data-dir lock, no dispatching.
    """
    if settings.store_url:
        from gateway.store_postgres import PostgresStore

        return await PostgresStore.open(settings.store_url, lease_seconds=settings.lease_seconds)
    from gateway.store_sqlite import SqliteStore

    return SqliteStore(settings.store_path, lease_seconds=settings.lease_seconds, admin=admin)


def record_from_row(row: Any) -> RequestRecord:
    """A row of `requests` from either engine (sqlite3.Row or a psycopg dict row)."""
    error = None
    if row["error_type"] is not None:
        error = types_pb2.RequestError(
            type=row["error_type"], message=row["error_message"] or "", field=row["error_field"] or ""
        )
    return RequestRecord(
        seq=int(row["seq"]),
        id=row["id"],
        state=State(row["state"]),
        raw_input=bytes(row["input"]),
        seed=int(row["seed"]),
        model_key=row["model_key"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        attempts=int(row["attempts"]),
        step=int(row["step"]),
        total_steps=int(row["total_steps"]),
        raw_output=None if row["output"] is None else bytes(row["output"]),
        error=error,
        inference_seconds=row["inference_seconds"],
        owner=row["owner"] or "",
        lease_token=row["lease_token"] or "",
        start_deadline=row["start_deadline"],
        queue_position=_optional_int(row, "queue_position"),
        tenant=row["tenant"] if "tenant" in row.keys() else "",
        expired_at=row["expired_at"] if "expired_at" in row.keys() else None,
        priority=int(row["priority"]) if "priority" in row.keys() else 0,
        fair_tag=float(row["fair_tag"]) if "fair_tag" in row.keys() else 0.0,
        webhook_url=row["webhook_url"] if "webhook_url" in row.keys() else "",
        not_before=row["not_before"] if "not_before" in row.keys() else None,
        trace_context=row["trace_context"] if "trace_context" in row.keys() else "",
    )


def webhook_from_row(row: Any) -> WebhookDelivery:
    return WebhookDelivery(
        request_id=row["request_id"],
        tenant=row["tenant"],
        url=row["url"],
        body=None if row["body"] is None else bytes(row["body"]),
        attempts=int(row["attempts"]),
        next_attempt_at=row["next_attempt_at"],
        created_at=row["created_at"],
        claim_token=row["claim_token"] or "",
        last_status=row["last_status"],
        last_error=row["last_error"] or "",
        delivered_at=row["delivered_at"],
        given_up_at=row["given_up_at"],
    )


# Due deliveries in turns across tenants: `turn` 1 is each tenant's oldest, 2 its second oldest...
DUE_WEBHOOKS_IN_TURNS = (
    "SELECT request_id, tenant FROM (SELECT request_id, tenant, next_attempt_at,"
    " ROW_NUMBER() OVER (PARTITION BY tenant ORDER BY next_attempt_at) AS turn FROM webhook_deliveries"
    " WHERE delivered_at IS NULL AND given_up_at IS NULL AND next_attempt_at <= {now}"
    " AND (claim_expires_at IS NULL OR claim_expires_at < {now})) AS due ORDER BY turn, next_attempt_at LIMIT {limit}"
)


def webhook_candidates(limit: int, per_tenant: int, sending: Mapping[str, int] | None) -> int:
    """How many rows of DUE_WEBHOOKS_IN_TURNS to read so that `limit` of them fit `webhooks_with_room`:
    each attempt in flight can push at most one row of its tenant out."""
    return limit + (sum(sending.values()) if per_tenant and sending else 0)


def webhooks_with_room(
    rows: Sequence[Any], limit: int, per_tenant: int, sending: Mapping[str, int] | None
) -> list[str]:
    """The request ids of `rows` (in turns) to claim: at most `limit`, and with `per_tenant` no tenant
    beyond that many attempts in flight."""
    taken: dict[str, int] = dict(sending or {})
    chosen: list[str] = []
    for row in rows:
        if len(chosen) >= limit:
            break
        if per_tenant and taken.get(row["tenant"], 0) >= per_tenant:
            continue
        taken[row["tenant"]] = taken.get(row["tenant"], 0) + 1
        chosen.append(row["request_id"])
    return chosen


def key_from_row(row: Any) -> ApiKey:
    return ApiKey(
        id=row["id"],
        tenant=row["tenant"],
        name=row["name"],
        secret_sha256=row["secret_sha256"],
        created_at=row["created_at"],
        revoked_at=row["revoked_at"],
    )


def _optional_int(row: Any, column: str) -> int | None:
    return int(row[column]) if column in row.keys() and row[column] is not None else None
