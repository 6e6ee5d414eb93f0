"""The PostgreSQL engine of the RequestStore: one queue for any number of gateways.

Dispatch claims a request with `FOR UPDATE SKIP LOCKED`, so two gateways never start the
same one; lease times come from the database's clock, so gateways with skewed clocks agree
on when a lease has run out. Every write announces the request's id on a NOTIFY channel in
its own transaction: each gateway LISTENs once and wakes its status streams and its
dispatcher, so a stream on gateway B follows a request that gateway A runs, and a Cancel
made on B reaches the worker call on A. The commit that acknowledges a Submit is
synchronous (PostgreSQL's default); progress and log lines commit asynchronously, since
losing the last few of them in a power cut costs nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, cast

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from gateway import migrations
from gateway.queue_index import QueueChange, QueueIndex
from gateway.store import (
    CANCELLED_BY_CALLER,
    DUE_WEBHOOKS_IN_TURNS,
    ApiKey,
    LogRecord,
    Preview,
    QueuedInput,
    RequestRecord,
    State,
    StoreUnavailable,
    TakenBack,
    TenantFull,
    WebhookDelivery,
    lost_owner_error,
    new_owner_name,
    key_from_row,
    record_from_row,
    start_timeout_error,
    webhook_candidates,
    webhook_from_row,
    webhooks_with_room,
)
from loraserve.v1 import types_pb2

log = logging.getLogger(__name__)

CHANNEL = "loraserve_requests"
# A second channel, so gateways of an older version ignore it: each change of the queue, for every
# gateway's QueueIndex (`<id> <moves> <1 waiting|0 not> <priority> <fair_tag> <seq>`).
QUEUE_CHANNEL = "loraserve_queue"
_QUEUE_MOVED = "queue"
# Serialises migrations of gateways that start at the same moment (any constant of our own).
MIGRATION_LOCK_KEY = 0x6C6F7261
# With hashtext(tenant): the lock a tenant's Submits take when its waiting requests are capped.
TENANT_LOCK_CLASS = 0x74656E74
_NOW = "extract(epoch from clock_timestamp())"
# A waiting request not backing off after a failed attempt (by the database's clock, like leases).
_READY = f"(not_before IS NULL OR not_before <= {_NOW})"
_REQUEUE_SET = (
    "state = 'IN_QUEUE', step = 0, total_steps = 0, owner = NULL, lease_token = NULL, lease_expires_at = NULL"
)
_FINISH_SET = (
    "state = %s, error_type = %s, error_message = %s, finished_at = %s, lease_token = NULL, lease_expires_at = NULL"
)
# What an UPDATE that ends requests returns for `_with_webhooks`.
_ENDED = "id, tenant, webhook_url"
_WEBHOOK_ENDED = "(delivered_at IS NOT NULL OR given_up_at IS NOT NULL)"


def _new_webhooks(ended: str, where: str = "TRUE") -> str:
    """The webhook deliveries of the ended requests in `ended` (a table or CTE with the `_ENDED` columns)."""
    return (
        "INSERT INTO webhook_deliveries (request_id, tenant, url, next_attempt_at, created_at)"
        f" SELECT id, tenant, webhook_url, {_NOW}, {_NOW} FROM {ended} WHERE {where} AND webhook_url <> ''"
        " ON CONFLICT (request_id) DO NOTHING"
    )


def _with_webhooks(update: str) -> str:
    """`update` (an UPDATE ending requests, RETURNING `_ENDED`) and the webhook deliveries of the requests it
    ended, in one statement; its rows are `id` and `hooks` (how many deliveries it made)."""
    return (
        f"WITH done AS ({update}), hooks AS ({_new_webhooks('done')} RETURNING request_id)"
        " SELECT id, (SELECT count(*) FROM hooks) AS hooks FROM done"
    )


class PostgresStore:
    def __init__(self, pool: AsyncConnectionPool, dsn: str, *, lease_seconds: float, owner: str) -> None:
        self._pool = pool
        self._dsn = dsn
        self.owner = owner
        self.lease_seconds = lease_seconds
        self._queue_depth = 0
        # The queue's order for positions without counting rows; trusted only while the listener is
        # connected (it hears every other gateway's changes), otherwise positions are counted.
        self._index = QueueIndex()
        self._index_live = False
        self._listener: asyncio.Task[None] | None = None
        self._webhook_due: Callable[[], None] = lambda: None

    @classmethod
    async def open(
        cls, dsn: str, *, lease_seconds: float = 30.0, owner: str = "", connect_timeout_seconds: float = 30.0
    ) -> PostgresStore:
        pool: AsyncConnectionPool = AsyncConnectionPool(
            dsn,
            min_size=2,
            max_size=10,
            open=False,
            kwargs={"autocommit": True, "row_factory": dict_row},
            # A connection broken by a database restart is found and replaced before it is handed out.
            check=AsyncConnectionPool.check_connection,
        )
        try:
            await pool.open(wait=True, timeout=connect_timeout_seconds)
        except PoolTimeout as exc:
            await pool.close()
            raise StoreUnavailable(f"cannot reach PostgreSQL at {_safe_dsn(dsn)}: {exc}") from exc
        store = cls(pool, dsn, lease_seconds=lease_seconds, owner=owner or new_owner_name())
        await store._migrate()
        await store.waiting_count()
        return store

    async def _migrate(self) -> None:
        async with self._conn() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
            await conn.execute(
                f"CREATE TABLE IF NOT EXISTS {migrations.MIGRATIONS_TABLE}"
                " (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at DOUBLE PRECISION NOT NULL)"
            )
            cur = await conn.execute(f"SELECT version FROM {migrations.MIGRATIONS_TABLE}")
            applied = {int(row["version"]) for row in await cur.fetchall()}
            for step in migrations.pending(applied, migrations.POSTGRES):
                await conn.execute(step.sql.encode())
                await conn.execute(
                    f"INSERT INTO {migrations.MIGRATIONS_TABLE} (version, name, applied_at) VALUES (%s, %s, %s)",
                    (step.version, step.name, time.time()),
                )

    async def applied_migrations(self) -> list[int]:
        rows = await self._fetch(f"SELECT version FROM {migrations.MIGRATIONS_TABLE} ORDER BY 1")
        return [int(row["version"]) for row in rows]

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        await self._pool.close()

    @contextlib.asynccontextmanager
    async def _conn(self) -> AsyncIterator[psycopg.AsyncConnection[dict[str, Any]]]:
        """A pooled connection; a database that cannot be reached is StoreUnavailable (gRPC UNAVAILABLE)."""
        try:
            async with self._pool.connection() as conn:
                yield cast("psycopg.AsyncConnection[dict[str, Any]]", conn)
        except (psycopg.OperationalError, PoolTimeout) as exc:
            raise StoreUnavailable(f"the request store (PostgreSQL) is unreachable: {exc}") from exc

    async def _fetch(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        async with self._conn() as conn:
            cur = await conn.execute(sql.encode(), params)
            return await cur.fetchall()

    async def _write(
        self,
        sql: str,
        params: tuple[Any, ...],
        *,
        durable: bool = True,
        moves_queue: bool = True,
        first: Callable[[psycopg.AsyncConnection[Any]], Awaitable[None]] | None = None,
    ) -> list[dict[str, Any]]:
        """One statement that RETURNs the ids it changed, and a NOTIFY for each, in one transaction.

        `durable=False` for progress and logs (asynchronous commit); `moves_queue=False` for changes
        that leave every queue position as it was (progress, logs, a result); `first` runs in the
        same transaction before the statement (a check that may raise, rolling it back).
        """
        async with self._conn() as conn, conn.transaction():
            if not durable:
                await conn.execute("SET LOCAL synchronous_commit = off")
            if first is not None:
                await first(conn)
            cur = await conn.execute(sql.encode(), params)
            rows = await cur.fetchall()
            changes = await _notify(conn, [row["id"] for row in rows], moves_queue=moves_queue)
        self._apply(changes)
        return rows

    def _apply(self, changes: list[QueueChange]) -> None:
        """After the commit that made them: this gateway's own queue changes, without waiting for their notification."""
        for change in changes:
            self._index.apply(change)

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
        if max_waiting and client_request_id:
            # A retry of a request the tenant already has is answered with it, full or not.
            existing = await self._fetch(
                "SELECT * FROM requests WHERE tenant = %s AND client_request_id = %s", (tenant, client_request_id)
            )
            if existing:
                return record_from_row(existing[0]), False

        async def room(conn: psycopg.AsyncConnection[Any]) -> None:
            """The tenant's Submits queue on one lock, so each counts the others' committed inserts."""
            await conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (TENANT_LOCK_CLASS, tenant))
            cur = await conn.execute("SELECT waiting AS n FROM queue_counts WHERE tenant = %s", (tenant,))
            row = await cur.fetchone()
            waiting = int(row["n"]) if row else 0
            if waiting >= max_waiting:
                raise TenantFull(waiting)

        now = time.time()
        rows = await self._write(
            "INSERT INTO requests (id, client_request_id, state, input, seed, model_key, created_at, start_deadline,"
            " tenant, priority, fair_tag, webhook_url, trace_context) VALUES (%s, %s, 'IN_QUEUE', %s, %s, %s, %s, %s,"
            " %s, %s, GREATEST((SELECT v FROM queue_clock WHERE id = 1), COALESCE((SELECT max(fair_tag) FROM requests"
            " WHERE tenant = %s AND state IN ('IN_QUEUE', 'IN_PROGRESS')), 0)) + %s, %s, %s)"
            " ON CONFLICT (tenant, client_request_id) DO NOTHING RETURNING *",
            (
                str(uuid.uuid4()),
                client_request_id or None,
                inp.SerializeToString(),
                seed,
                model_key,
                now,
                now + start_timeout_seconds if start_timeout_seconds > 0 else None,
                tenant,
                priority,
                tenant,
                1.0 / weight,
                webhook_url,
                trace_context,
            ),
            first=room if max_waiting else None,
        )
        if rows:
            self._queue_depth += 1
            return record_from_row(rows[0]), True
        existing = await self._fetch(
            "SELECT * FROM requests WHERE tenant = %s AND client_request_id = %s", (tenant, client_request_id)
        )
        return record_from_row(existing[0]), False

    async def get(self, request_id: str) -> RequestRecord | None:
        if self._index_live:
            rows = await self._fetch("SELECT * FROM requests WHERE id = %s", (request_id,))
            return record_from_row(rows[0]) if rows else None
        rows = await self._fetch(
            "SELECT r.*, CASE WHEN r.state = 'IN_QUEUE' THEN (SELECT count(*) FROM requests AS w"
            " WHERE w.state = 'IN_QUEUE' AND (w.priority, w.fair_tag, w.seq) < (r.priority, r.fair_tag, r.seq))"
            " END AS queue_position FROM requests AS r WHERE r.id = %s",
            (request_id,),
        )
        return record_from_row(rows[0]) if rows else None

    async def queue_position(self, record: RequestRecord) -> int:
        if record.queue_position is not None:
            return record.queue_position
        if self._index_live:
            return self._index.position(record.order)
        rows = await self._fetch(
            "SELECT count(*) AS n FROM requests WHERE state = 'IN_QUEUE' AND (priority, fair_tag, seq) < (%s, %s, %s)",
            record.order,
        )
        return int(rows[0]["n"])

    async def tenant_activity(self, tenant: str) -> tuple[int, int]:
        rows = await self._fetch("SELECT waiting, running FROM queue_counts WHERE tenant = %s", (tenant,))
        return (int(rows[0]["waiting"]), int(rows[0]["running"])) if rows else (0, 0)

    async def waiting_count(self) -> int:
        if self._index_live:
            self._queue_depth = len(self._index)
        else:
            rows = await self._fetch("SELECT COALESCE(sum(waiting), 0) AS n FROM queue_counts")
            self._queue_depth = int(rows[0]["n"])
        return self._queue_depth

    def known_queue_depth(self) -> int:
        return len(self._index) if self._index_live else self._queue_depth

    async def reindex(self) -> None:
        """Reads the queue's order from the table again (after rows were written around the store: a bulk load)."""
        self._index.begin_reload()
        try:
            rows = await self._fetch("SELECT id, moves, priority, fair_tag, seq FROM requests WHERE state = 'IN_QUEUE'")
        except BaseException:
            self._index.abandon_reload()
            raise
        self._index.finish_reload([_queue_change(row, waiting=True) for row in rows])

    async def waiting(self, limit: int) -> list[RequestRecord]:
        rows = await self._fetch(
            f"SELECT * FROM requests WHERE state = 'IN_QUEUE' AND {_READY} ORDER BY priority, fair_tag, seq LIMIT %s",
            (limit,),
        )
        return [record_from_row(row) for row in rows]

    async def next_retry_in(self) -> float | None:
        rows = await self._fetch(
            f"SELECT min(not_before) - {_NOW} AS wait FROM requests WHERE state = 'IN_QUEUE' AND not_before > {_NOW}"
        )
        wait = rows[0]["wait"]
        return None if wait is None else max(0.0, float(wait))

    async def claim(self, request_id: str) -> RequestRecord | None:
        rows = await self._write(
            "WITH run AS (UPDATE requests SET state = 'IN_PROGRESS', started_at = COALESCE(started_at, %s),"
            " attempts = attempts + 1, step = 0, total_steps = 0, owner = %s, lease_token = %s,"
            f" lease_expires_at = {_NOW} + %s, not_before = NULL WHERE id = (SELECT id FROM requests"
            f" WHERE id = %s AND state = 'IN_QUEUE' AND {_READY} FOR UPDATE SKIP LOCKED)"
            " RETURNING *), clock AS (UPDATE queue_clock SET v = GREATEST(v, (SELECT fair_tag FROM run))"
            " WHERE id = 1 AND EXISTS (SELECT 1 FROM run)) SELECT * FROM run",
            (time.time(), self.owner, uuid.uuid4().hex, self.lease_seconds, request_id),
        )
        return record_from_row(rows[0]) if rows else None

    async def renew(self, leases: Mapping[str, str]) -> set[str]:
        if not leases:
            return set()
        ids, tokens = list(leases), list(leases.values())
        async with self._conn() as conn:
            cur = await conn.execute(
                f"UPDATE requests AS r SET lease_expires_at = {_NOW} + %s"
                " FROM unnest(%s::text[], %s::text[]) AS held(id, token)"
                " WHERE r.id = held.id AND r.lease_token = held.token AND r.state = 'IN_PROGRESS' RETURNING r.id",
                (self.lease_seconds, ids, tokens),
            )
            return {row["id"] for row in await cur.fetchall()}

    async def requeue(
        self, request_id: str, token: str, *, refund_attempt: bool = False, delay_seconds: float = 0.0
    ) -> bool:
        rows = await self._write(
            f"UPDATE requests SET {_REQUEUE_SET}, attempts = attempts - %s,"
            f" not_before = CASE WHEN %s > 0 THEN {_NOW} + %s END"
            " WHERE id = %s AND lease_token = %s AND state = 'IN_PROGRESS' RETURNING id",
            (int(refund_attempt), delay_seconds, delay_seconds, request_id, token),
        )
        return bool(rows)

    async def recover(self, max_attempts: int) -> TakenBack:
        # Other gateways may be alive: only a run whose lease ran out has lost its owner.
        return await self.take_back(max_attempts)

    async def take_back(self, max_attempts: int) -> TakenBack:
        error = lost_owner_error(max_attempts)
        async with self._conn() as conn, conn.transaction():
            cur = await conn.execute(
                "SELECT id, attempts FROM requests WHERE state = 'IN_PROGRESS'"
                f" AND lease_expires_at < {_NOW} FOR UPDATE SKIP LOCKED"
            )
            lost = await cur.fetchall()
            failed = [row["id"] for row in lost if int(row["attempts"]) >= max_attempts]
            requeued = [row["id"] for row in lost if int(row["attempts"]) < max_attempts]
            hooks = 0
            if failed:
                await conn.execute(
                    f"UPDATE requests SET {_FINISH_SET} WHERE id = ANY(%s)",
                    (State.COMPLETED, error.type, error.message, time.time(), failed),
                )
                hooks = (await conn.execute(_new_webhooks("requests", "id = ANY(%s)"), (failed,))).rowcount
            if requeued:
                await conn.execute(f"UPDATE requests SET {_REQUEUE_SET} WHERE id = ANY(%s)", (requeued,))
            changes = await _notify(conn, failed + requeued)
        self._apply(changes)
        if hooks > 0:
            self._webhook_due()
        return TakenBack(requeued, failed)

    async def expire_start_deadlines(self) -> list[str]:
        error = start_timeout_error()
        rows = await self._ended(
            f"UPDATE requests SET {_FINISH_SET}"
            f" WHERE state = 'IN_QUEUE' AND start_deadline IS NOT NULL AND start_deadline < %s RETURNING {_ENDED}",
            (State.COMPLETED, error.type, error.message, time.time(), time.time()),
        )
        return [row["id"] for row in rows]

    async def set_progress(
        self, request_id: str, token: str, step: int, total: int, preview_jpeg: bytes = b""
    ) -> None:
        progress = (
            "UPDATE requests SET step = %s, total_steps = %s"
            " WHERE id = %s AND lease_token = %s AND state = 'IN_PROGRESS' RETURNING id"
        )
        params: tuple[Any, ...] = (step, total, request_id, token)
        if preview_jpeg:
            # One statement, one round trip: the preview is written only if the run still holds the request.
            progress = (
                f"WITH run AS ({progress}), shown AS (INSERT INTO previews (request_id, version, step, total_steps,"
                " jpeg) SELECT id, 1, %s, %s, %s FROM run ON CONFLICT (request_id) DO UPDATE SET"
                " version = previews.version + 1, step = EXCLUDED.step, total_steps = EXCLUDED.total_steps,"
                " jpeg = EXCLUDED.jpeg) SELECT id FROM run"
            )
            params += (step, total, preview_jpeg)
        await self._write(progress, params, durable=False, moves_queue=False)

    async def preview(self, request_id: str, after_version: int = 0) -> Preview | None:
        rows = await self._fetch(
            "SELECT version, step, total_steps, jpeg FROM previews WHERE request_id = %s AND version > %s",
            (request_id, after_version),
        )
        if not rows:
            return None
        row = rows[0]
        return Preview(int(row["version"]), int(row["step"]), int(row["total_steps"]), bytes(row["jpeg"]))

    async def complete(
        self, request_id: str, token: str, output: types_pb2.GenerateOutput, inference_seconds: float
    ) -> bool:
        rows = await self._ended(
            "UPDATE requests SET state = 'COMPLETED', output = %s, inference_seconds = %s, finished_at = %s,"
            " lease_token = NULL, lease_expires_at = NULL"
            f" WHERE id = %s AND lease_token = %s AND state = 'IN_PROGRESS' RETURNING {_ENDED}",
            (output.SerializeToString(), inference_seconds, time.time(), request_id, token),
            moves_queue=False,
        )
        return bool(rows)

    async def fail(self, request_id: str, error: types_pb2.RequestError, token: str | None = None) -> bool:
        return await self._finish(request_id, State.COMPLETED, error, token)

    async def cancel(self, request_id: str) -> bool:
        return await self._finish(request_id, State.CANCELLED, CANCELLED_BY_CALLER, None)

    async def _finish(
        self, request_id: str, state: State, error: types_pb2.RequestError, token: str | None
    ) -> bool:
        params: tuple[Any, ...] = (state, error.type, error.message, time.time(), error.field, request_id)
        if token is None:
            where = "id = %s AND state IN ('IN_QUEUE', 'IN_PROGRESS')"
        else:
            where = "id = %s AND lease_token = %s AND state = 'IN_PROGRESS'"
            params += (token,)
        rows = await self._ended(
            f"UPDATE requests SET {_FINISH_SET}, error_field = %s WHERE {where} RETURNING {_ENDED}", params
        )
        return bool(rows)

    async def _ended(self, update: str, params: tuple[Any, ...], *, moves_queue: bool = True) -> list[dict[str, Any]]:
        """`_write` of an UPDATE that ends requests, creating their webhook deliveries in the same transaction."""
        rows = await self._write(_with_webhooks(update), params, moves_queue=moves_queue)
        if any(row["hooks"] for row in rows):
            self._webhook_due()
        return rows

    def on_webhook_due(self, callback: Callable[[], None]) -> None:
        self._webhook_due = callback

    async def claim_webhooks(
        self, limit: int, claim_seconds: float, *, per_tenant: int = 0, sending: Mapping[str, int] | None = None
    ) -> list[WebhookDelivery]:
        due = await self._fetch(
            DUE_WEBHOOKS_IN_TURNS.format(now=_NOW, limit="%s"), (webhook_candidates(limit, per_tenant, sending),)
        )
        chosen = webhooks_with_room(due, limit, per_tenant, sending)
        if not chosen:
            return []
        rows = await self._fetch(
            f"UPDATE webhook_deliveries SET claim_token = gen_random_uuid()::text, claim_expires_at = {_NOW} + %s"
            " WHERE request_id = ANY(%s)"
            # Checked again on the row as it is now, should another sender have claimed it meanwhile.
            " AND delivered_at IS NULL AND given_up_at IS NULL"
            f" AND (claim_expires_at IS NULL OR claim_expires_at < {_NOW})"
            " RETURNING *",
            (claim_seconds, chosen),
        )
        return [webhook_from_row(row) for row in rows]

    async def set_webhook_body(self, request_id: str, token: str, body: bytes) -> bytes | None:
        rows = await self._fetch(
            "UPDATE webhook_deliveries SET body = COALESCE(body, %s) WHERE request_id = %s AND claim_token = %s"
            " RETURNING body",
            (body, request_id, token),
        )
        return bytes(rows[0]["body"]) if rows else None

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
        rows = await self._fetch(
            "UPDATE webhook_deliveries SET attempts = attempts + 1, last_status = %s, last_error = %s,"
            f" delivered_at = CASE WHEN %s THEN {_NOW} END, given_up_at = CASE WHEN %s THEN {_NOW} END,"
            f" next_attempt_at = {_NOW} + %s, claim_token = NULL, claim_expires_at = NULL"
            " WHERE request_id = %s AND claim_token = %s RETURNING request_id",
            (
                status,
                error or None,
                delivered,
                not delivered and retry_in_seconds is None,
                retry_in_seconds or 0.0,
                request_id,
                token,
            ),
        )
        return bool(rows)

    async def webhook(self, request_id: str) -> WebhookDelivery | None:
        rows = await self._fetch("SELECT * FROM webhook_deliveries WHERE request_id = %s", (request_id,))
        return webhook_from_row(rows[0]) if rows else None

    async def add_log(self, request_id: str, entry: types_pb2.LogEntry) -> None:
        await self._write(
            "INSERT INTO logs (request_id, message, level, source, timestamp) VALUES (%s, %s, %s, %s, %s)"
            " RETURNING request_id AS id",
            (request_id, entry.message, entry.level, entry.source, entry.timestamp),
            durable=False,
            moves_queue=False,
        )

    async def logs(self, request_id: str, after_seq: int = 0) -> list[LogRecord]:
        rows = await self._fetch(
            "SELECT * FROM logs WHERE request_id = %s AND seq > %s ORDER BY seq", (request_id, after_seq)
        )
        return [
            LogRecord(
                int(row["seq"]),
                types_pb2.LogEntry(
                    message=row["message"], level=row["level"], source=row["source"], timestamp=row["timestamp"]
                ),
            )
            for row in rows
        ]

    async def add_key(self, key: ApiKey) -> None:
        async with self._conn() as conn:
            await conn.execute(
                "INSERT INTO api_keys (id, tenant, name, secret_sha256, created_at) VALUES (%s, %s, %s, %s, %s)",
                (key.id, key.tenant, key.name, key.secret_sha256, key.created_at),
            )

    async def key(self, key_id: str) -> ApiKey | None:
        rows = await self._fetch("SELECT * FROM api_keys WHERE id = %s", (key_id,))
        return key_from_row(rows[0]) if rows else None

    async def keys(self) -> list[ApiKey]:
        return [key_from_row(row) for row in await self._fetch("SELECT * FROM api_keys ORDER BY created_at")]

    async def revoke_key(self, key_id: str) -> bool:
        async with self._conn() as conn:
            cur = await conn.execute(
                "UPDATE api_keys SET revoked_at = %s WHERE id = %s AND revoked_at IS NULL", (time.time(), key_id)
            )
            return cur.rowcount == 1

    async def listen(self, on_change: Callable[[str, bool], None]) -> None:
        if self._listener is None:
            self._listener = asyncio.get_running_loop().create_task(self._listen(on_change), name="store-listen")

    async def _listen(self, on_change: Callable[[str, bool], None]) -> None:
        """LISTENs on its own connection for as long as the store is open, reconnecting with backoff."""
        delay = 0.1
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self._dsn, autocommit=True) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    await conn.execute(f"LISTEN {QUEUE_CHANNEL}")
                    # Every change from now on is heard: the order read now, plus them, is the queue.
                    await self.reindex()
                    self._index_live = True
                    delay = 0.1
                    # Whatever changed while nobody listened: everyone re-reads.
                    on_change("", True)
                    async for note in conn.notifies():
                        if note.channel == QUEUE_CHANNEL:
                            self._index.apply(_parse_queue_change(note.payload))
                            continue
                        request_id, _, moved = note.payload.partition(" ")
                        on_change(request_id, moved == _QUEUE_MOVED)
            except (psycopg.OperationalError, StoreUnavailable) as exc:
                log.warning("store notifications lost; reconnecting", extra={"error": str(exc), "retry_in": delay})
            finally:
                self._index_live = False
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 5.0)

    async def drop_previews(self, finished_before: float) -> int:
        async with self._conn() as conn:
            # The table holds the running requests' and the recently finished ones': a short scan.
            cur = await conn.execute(
                "DELETE FROM previews AS p USING requests AS r WHERE r.id = p.request_id AND r.finished_at < %s",
                (finished_before,),
            )
            return cur.rowcount

    async def expirable(self, before: float, limit: int) -> list[RequestRecord]:
        rows = await self._fetch(
            "SELECT * FROM requests WHERE finished_at IS NOT NULL AND expired_at IS NULL AND finished_at < %s"
            # A request keeps its output until its webhook's body is built from it.
            " AND NOT EXISTS (SELECT 1 FROM webhook_deliveries AS w WHERE w.request_id = requests.id"
            " AND w.body IS NULL AND w.delivered_at IS NULL AND w.given_up_at IS NULL)"
            " ORDER BY finished_at LIMIT %s",
            (before, limit),
        )
        return [record_from_row(row) for row in rows]

    async def expire(self, request_ids: Sequence[str]) -> list[str]:
        if not request_ids:
            return []
        async with self._conn() as conn, conn.transaction():
            cur = await conn.execute(
                "UPDATE requests SET expired_at = %s, input = ''::bytea, output = NULL, client_request_id = NULL"
                " WHERE id = ANY(%s) AND finished_at IS NOT NULL AND expired_at IS NULL RETURNING id",
                (time.time(), list(request_ids)),
            )
            expired = [row["id"] for row in await cur.fetchall()]
            if expired:
                await conn.execute("DELETE FROM logs WHERE request_id = ANY(%s)", (expired,))
                await conn.execute("DELETE FROM previews WHERE request_id = ANY(%s)", (expired,))
                await conn.execute(
                    f"DELETE FROM webhook_deliveries WHERE request_id = ANY(%s) AND {_WEBHOOK_ENDED}", (expired,)
                )
            await _notify(conn, expired, moves_queue=False)
        return expired


async def _notify(
    conn: psycopg.AsyncConnection[Any], request_ids: list[str], *, moves_queue: bool = True
) -> list[QueueChange]:
    """Delivered to every listener at commit, and only if it commits: `<id>`, or `<id> queue` when the
    change may have moved queue positions (other gateways then wake the streams of waiting requests).
    Those also go out on QUEUE_CHANNEL with the requests' places, and are returned for this gateway's index."""
    unique = list(dict.fromkeys(request_ids))
    for request_id in unique:
        payload = f"{request_id} {_QUEUE_MOVED}" if moves_queue else request_id
        await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))
    if not (moves_queue and unique):
        return []
    cur = await conn.execute(
        "SELECT id, moves, state = 'IN_QUEUE' AS waiting, priority, fair_tag, seq, pg_notify(%s, concat_ws(' ', id,"
        " moves, (state = 'IN_QUEUE')::int, priority, fair_tag, seq)) FROM requests WHERE id = ANY(%s)",
        (QUEUE_CHANNEL, unique),
    )
    return [_queue_change(row, waiting=bool(row["waiting"])) for row in await cur.fetchall()]


def _queue_change(row: dict[str, Any], *, waiting: bool) -> QueueChange:
    return QueueChange(row["id"], int(row["moves"]), waiting, (int(row["priority"]), float(row["fair_tag"]), int(row["seq"])))


def _parse_queue_change(payload: str) -> QueueChange:
    request_id, moves, waiting, priority, fair_tag, seq = payload.split(" ")
    return QueueChange(request_id, int(moves), waiting == "1", (int(priority), float(fair_tag), int(seq)))


def _safe_dsn(dsn: str) -> str:
    """The DSN without its password, for error messages and logs."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "(unparsable DSN)"
    return f"{info.get('host', 'localhost')}:{info.get('port', 5432)}/{info.get('dbname', '')}"
