"""The SQLite engine of the RequestStore: the embedded default, one gateway per data dir.

Calls are short and made from the event loop's thread (no thread hop: a commit costs
~0.2 ms). The data dir is locked to this gateway, so it is the store's only writer and
keeps the queue positions in memory; a request still IN_PROGRESS at start belonged to a
gateway that is gone.
"""

from __future__ import annotations

import bisect
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from gateway import migrations
from gateway.data_dir_lock import DataDirLock
from gateway.store import (
    CANCELLED_BY_CALLER,
    DUE_WEBHOOKS_IN_TURNS,
    ApiKey,
    LogRecord,
    Preview,
    QueuedInput,
    RequestRecord,
    State,
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
from gateway.wal_checkpoints import WalCheckpointer
from gateway.wal_sync import WalSync
from loraserve.v1 import types_pb2


class SqliteStore:
    def __init__(self, path: Path, *, lease_seconds: float = 30.0, owner: str = "", admin: bool = False) -> None:
        """`admin`: for `loraserve keys` beside a running gateway — no data-dir lock; it must not dispatch."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self.owner = owner or new_owner_name()
        self.lease_seconds = lease_seconds
        self._dir_lock = DataDirLock(path.parent)
        if not admin:
            self._dir_lock.acquire()
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            self._lock = threading.Lock()
            self._db.execute("PRAGMA journal_mode=WAL")
            # Commits append to the log; a Submit is answered after the log is synced (`add`, WalSync).
            self._db.execute("PRAGMA synchronous=NORMAL")
            # Checkpoints (and their fsync) run on the checkpointer's thread, not inside a caller's commit.
            self._db.execute("PRAGMA wal_autocheckpoint=0")
            self._migrate()
        except BaseException:
            self._dir_lock.release()
            raise
        self._index_changes: list[Callable[[], None]] = []
        self._webhook_due: Callable[[], None] = lambda: None
        self._checkpointer = WalCheckpointer(path)
        self._checkpointer.start()
        self._wal_sync = WalSync(path)
        # The start order (priority, fair_tag, seq) of waiting requests, sorted: a queue position is a
        # binary search instead of a COUNT over the waiting index, which grew with the queue (1.9× slower
        # Submit / 1.7× GetStatus at 10,000 waiting). Kept in step with the table by every method that
        # moves a request in or out of IN_QUEUE, under the same lock; the data-dir lock makes this
        # process the store's only writer.
        self._waiting: list[Order] = []
        self._read_queue()

    def _read_queue(self) -> None:
        self._waiting = sorted(
            _order(row) for row in self._db.execute(f"SELECT {_ORDER} FROM requests WHERE state = 'IN_QUEUE'")
        )

    async def reindex(self) -> None:
        with self._lock:
            self._read_queue()

    def _migrate(self) -> None:
        self._db.execute(
            f"CREATE TABLE IF NOT EXISTS {migrations.MIGRATIONS_TABLE}"
            " (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
        )
        applied = {int(v) for (v,) in self._db.execute(f"SELECT version FROM {migrations.MIGRATIONS_TABLE}")}
        for step in migrations.pending(applied, migrations.SQLITE):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for statement in _statements(step.sql):
                    self._db.execute(statement)
                self._db.execute(
                    f"INSERT INTO {migrations.MIGRATIONS_TABLE} (version, name, applied_at) VALUES (?, ?, ?)",
                    (step.version, step.name, time.time()),
                )
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def applied_migrations(self) -> list[int]:
        with self._lock:
            return [int(v) for (v,) in self._db.execute(f"SELECT version FROM {migrations.MIGRATIONS_TABLE} ORDER BY 1")]

    async def close(self) -> None:
        self._checkpointer.stop()
        self._wal_sync.close()
        self._db.close()
        self._dir_lock.release()

    @property
    def checkpointer(self) -> WalCheckpointer:
        return self._checkpointer

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: it survives a crash of this process; `WalSync` makes it survive power loss."""
        with self._lock:
            self._index_changes = []
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                    self._db.execute("COMMIT")
                except BaseException:
                    # A failed COMMIT leaves the transaction open: roll it back or the connection is wedged.
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise
                # The queue index follows the table only once the table has changed.
                for change in self._index_changes:
                    change()
            finally:
                self._index_changes = []
        self._checkpointer.committed()

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
        with self._tx() as db:
            if client_request_id:
                row = db.execute(
                    "SELECT * FROM requests WHERE tenant = ? AND client_request_id = ?", (tenant, client_request_id)
                ).fetchone()
                if row is not None:
                    return record_from_row(row), False
            if max_waiting:
                counted = db.execute("SELECT waiting FROM queue_counts WHERE tenant = ?", (tenant,)).fetchone()
                waiting = int(counted[0]) if counted else 0
                if waiting >= max_waiting:
                    raise TenantFull(waiting)
            request_id = str(uuid.uuid4())
            now = time.time()
            ((clock,),) = db.execute("SELECT v FROM queue_clock WHERE id = 1").fetchall()
            ((last,),) = db.execute(
                "SELECT max(fair_tag) FROM requests WHERE tenant = ? AND state IN ('IN_QUEUE', 'IN_PROGRESS')",
                (tenant,),
            ).fetchall()
            row = db.execute(
                "INSERT INTO requests (id, client_request_id, state, input, seed, model_key, created_at, start_deadline,"
                " tenant, priority, fair_tag, webhook_url, trace_context) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " RETURNING *",
                (
                    request_id,
                    client_request_id or None,
                    State.IN_QUEUE,
                    inp.SerializeToString(),
                    seed,
                    model_key,
                    now,
                    now + start_timeout_seconds if start_timeout_seconds > 0 else None,
                    tenant,
                    priority,
                    max(clock, last or 0.0) + 1.0 / weight,
                    webhook_url,
                    trace_context,
                ),
            ).fetchone()
            self._join_queue([_order(row)])
        # Acknowledged only once on disk.
        await self._wal_sync.sync()
        return record_from_row(row), True

    async def get(self, request_id: str) -> RequestRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM requests WHERE id = ?", (request_id,)).fetchone()
        return None if row is None else record_from_row(row)

    async def queue_position(self, record: RequestRecord) -> int:
        with self._lock:
            return bisect.bisect_left(self._waiting, record.order)

    async def tenant_activity(self, tenant: str) -> tuple[int, int]:
        with self._lock:
            row = self._db.execute("SELECT waiting, running FROM queue_counts WHERE tenant = ?", (tenant,)).fetchone()
        return (int(row[0]), int(row[1])) if row else (0, 0)

    async def waiting_count(self) -> int:
        return self.known_queue_depth()

    def known_queue_depth(self) -> int:
        with self._lock:
            return len(self._waiting)

    async def waiting(self, limit: int) -> list[RequestRecord]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT * FROM requests WHERE state = 'IN_QUEUE' AND {_READY} ORDER BY priority, fair_tag, seq LIMIT ?",
                (time.time(), limit),
            ).fetchall()
        return [record_from_row(row) for row in rows]

    async def next_retry_in(self) -> float | None:
        now = time.time()
        with self._lock:
            ((first,),) = self._db.execute(
                "SELECT min(not_before) FROM requests WHERE state = 'IN_QUEUE' AND not_before > ?", (now,)
            ).fetchall()
        return None if first is None else max(0.0, first - now)

    async def claim(self, request_id: str) -> RequestRecord | None:
        now = time.time()
        with self._tx() as db:
            row = db.execute(
                "UPDATE requests SET state = ?, started_at = COALESCE(started_at, ?), attempts = attempts + 1,"
                " step = 0, total_steps = 0, owner = ?, lease_token = ?, lease_expires_at = ?, not_before = NULL"
                f" WHERE id = ? AND state = ? AND {_READY} RETURNING *",
                (
                    State.IN_PROGRESS,
                    now,
                    self.owner,
                    uuid.uuid4().hex,
                    now + self.lease_seconds,
                    request_id,
                    State.IN_QUEUE,
                    now,
                ),
            ).fetchone()
            if row is not None:
                self._leave_queue([_order(row)])
                db.execute("UPDATE queue_clock SET v = max(v, ?) WHERE id = 1", (row["fair_tag"],))
        return None if row is None else record_from_row(row)

    async def renew(self, leases: Mapping[str, str]) -> set[str]:
        held: set[str] = set()
        if not leases:
            return held
        expires = time.time() + self.lease_seconds
        with self._tx() as db:
            for request_id, token in leases.items():
                cur = db.execute(
                    "UPDATE requests SET lease_expires_at = ? WHERE id = ? AND lease_token = ? AND state = ?",
                    (expires, request_id, token, State.IN_PROGRESS),
                )
                if cur.rowcount:
                    held.add(request_id)
        return held

    async def requeue(
        self, request_id: str, token: str, *, refund_attempt: bool = False, delay_seconds: float = 0.0
    ) -> bool:
        not_before = time.time() + delay_seconds if delay_seconds > 0 else None
        with self._tx() as db:
            row = db.execute(
                f"UPDATE requests SET {_REQUEUE_SET}, attempts = attempts - ?, not_before = ? WHERE id = ?"
                f" AND lease_token = ? AND state = ? RETURNING {_ORDER}",
                (State.IN_QUEUE, int(refund_attempt), not_before, request_id, token, State.IN_PROGRESS),
            ).fetchone()
            if row is not None:
                self._join_queue([_order(row)])
        return row is not None

    async def recover(self, max_attempts: int) -> TakenBack:
        # The data-dir lock says no other gateway is alive: whatever is running was lost.
        return self._take_back("state = ?", (State.IN_PROGRESS,), max_attempts)

    async def take_back(self, max_attempts: int) -> TakenBack:
        return self._take_back("state = ? AND lease_expires_at < ?", (State.IN_PROGRESS, time.time()), max_attempts)

    def _take_back(self, where: str, params: tuple[object, ...], max_attempts: int) -> TakenBack:
        requeued: list[str] = []
        failed: list[str] = []
        with self._tx() as db:
            for row in db.execute(f"SELECT id, attempts, {_ORDER} FROM requests WHERE {where}", params).fetchall():
                if int(row["attempts"]) >= max_attempts:
                    error = lost_owner_error(int(row["attempts"]))
                    db.execute(
                        f"UPDATE requests SET {_FINISH_SET} WHERE id = ?",
                        (State.COMPLETED, error.type, error.message, time.time(), row["id"]),
                    )
                    failed.append(row["id"])
                else:
                    db.execute(f"UPDATE requests SET {_REQUEUE_SET} WHERE id = ?", (State.IN_QUEUE, row["id"]))
                    self._join_queue([_order(row)])
                    requeued.append(row["id"])
            self._hook(db, failed)
        return TakenBack(requeued, failed)

    async def expire_start_deadlines(self) -> list[str]:
        error = start_timeout_error()
        with self._tx() as db:
            rows = db.execute(
                f"UPDATE requests SET {_FINISH_SET} WHERE state = 'IN_QUEUE' AND start_deadline < ?"
                f" RETURNING id, {_ORDER}",
                (State.COMPLETED, error.type, error.message, time.time(), time.time()),
            ).fetchall()
            self._leave_queue([_order(row) for row in rows])
            self._hook(db, [row["id"] for row in rows])
        return [row["id"] for row in rows]

    async def set_progress(
        self, request_id: str, token: str, step: int, total: int, preview_jpeg: bytes = b""
    ) -> None:
        with self._tx() as db:
            cur = db.execute(
                "UPDATE requests SET step = ?, total_steps = ? WHERE id = ? AND lease_token = ? AND state = ?",
                (step, total, request_id, token, State.IN_PROGRESS),
            )
            if preview_jpeg and cur.rowcount == 1:
                db.execute(_PUT_PREVIEW, (request_id, step, total, preview_jpeg))

    async def preview(self, request_id: str, after_version: int = 0) -> Preview | None:
        with self._lock:
            row = self._db.execute(
                "SELECT version, step, total_steps, jpeg FROM previews WHERE request_id = ? AND version > ?",
                (request_id, after_version),
            ).fetchone()
        return None if row is None else Preview(int(row[0]), int(row[1]), int(row[2]), bytes(row[3]))

    async def complete(
        self, request_id: str, token: str, output: types_pb2.GenerateOutput, inference_seconds: float
    ) -> bool:
        with self._tx() as db:
            cur = db.execute(
                "UPDATE requests SET state = ?, output = ?, inference_seconds = ?, finished_at = ?,"
                " lease_token = NULL, lease_expires_at = NULL WHERE id = ? AND lease_token = ? AND state = ?",
                (
                    State.COMPLETED,
                    output.SerializeToString(),
                    inference_seconds,
                    time.time(),
                    request_id,
                    token,
                    State.IN_PROGRESS,
                ),
            )
            if cur.rowcount == 1:
                self._hook(db, [request_id])
        return cur.rowcount == 1

    async def fail(self, request_id: str, error: types_pb2.RequestError, token: str | None = None) -> bool:
        return self._finish(request_id, State.COMPLETED, error, token)

    async def cancel(self, request_id: str) -> bool:
        return self._finish(request_id, State.CANCELLED, CANCELLED_BY_CALLER, None)

    def _finish(self, request_id: str, state: State, error: types_pb2.RequestError, token: str | None) -> bool:
        with self._tx() as db:
            row = db.execute(f"SELECT state, lease_token, {_ORDER} FROM requests WHERE id = ?", (request_id,)).fetchone()
            if row is None or row["state"] not in (State.IN_QUEUE, State.IN_PROGRESS):
                return False
            if token is not None and (row["state"] != State.IN_PROGRESS or row["lease_token"] != token):
                return False
            db.execute(
                f"UPDATE requests SET {_FINISH_SET}, error_field = ? WHERE id = ?",
                (state, error.type, error.message, time.time(), error.field, request_id),
            )
            if row["state"] == State.IN_QUEUE:
                self._leave_queue([_order(row)])
            self._hook(db, [request_id])
        return True

    def _hook(self, db: sqlite3.Connection, request_ids: list[str]) -> None:
        """Inside the transaction that ends these requests: the webhook deliveries of those that have one."""
        if not request_ids:
            return
        now = time.time()
        cur = db.execute(
            "INSERT INTO webhook_deliveries (request_id, tenant, url, next_attempt_at, created_at)"
            f" SELECT id, tenant, webhook_url, ?, ? FROM requests WHERE id IN ({', '.join('?' for _ in request_ids)})"
            " AND webhook_url != '' ON CONFLICT (request_id) DO NOTHING",
            (now, now, *request_ids),
        )
        if cur.rowcount > 0:
            self._index_changes.append(lambda: self._webhook_due())

    def on_webhook_due(self, callback: Callable[[], None]) -> None:
        self._webhook_due = callback

    async def claim_webhooks(
        self, limit: int, claim_seconds: float, *, per_tenant: int = 0, sending: Mapping[str, int] | None = None
    ) -> list[WebhookDelivery]:
        now = time.time()
        with self._tx() as db:
            rows = db.execute(
                DUE_WEBHOOKS_IN_TURNS.format(now="?", limit="?"),
                (now, now, webhook_candidates(limit, per_tenant, sending)),
            ).fetchall()
            claimed = [
                db.execute(
                    "UPDATE webhook_deliveries SET claim_token = ?, claim_expires_at = ? WHERE request_id = ?"
                    " RETURNING *",
                    (uuid.uuid4().hex, now + claim_seconds, request_id),
                ).fetchone()
                for request_id in webhooks_with_room(rows, limit, per_tenant, sending)
            ]
        return [webhook_from_row(row) for row in claimed]

    async def set_webhook_body(self, request_id: str, token: str, body: bytes) -> bytes | None:
        with self._tx() as db:
            row = db.execute(
                "UPDATE webhook_deliveries SET body = COALESCE(body, ?) WHERE request_id = ? AND claim_token = ?"
                " RETURNING body",
                (body, request_id, token),
            ).fetchone()
        return None if row is None else bytes(row["body"])

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
        now = time.time()
        with self._tx() as db:
            cur = db.execute(
                f"UPDATE webhook_deliveries SET {_ATTEMPTED_SET} WHERE request_id = ? AND claim_token = ?",
                (
                    status,
                    error or None,
                    now if delivered else None,
                    now if not delivered and retry_in_seconds is None else None,
                    now + (retry_in_seconds or 0.0),
                    request_id,
                    token,
                ),
            )
        return cur.rowcount == 1

    async def webhook(self, request_id: str) -> WebhookDelivery | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM webhook_deliveries WHERE request_id = ?", (request_id,)).fetchone()
        return None if row is None else webhook_from_row(row)

    def _join_queue(self, orders: list[Order]) -> None:
        """Inside a transaction: these requests join the queue index when it commits."""

        def join() -> None:
            for order in orders:
                bisect.insort(self._waiting, order)

        self._index_changes.append(join)

    def _leave_queue(self, orders: list[Order]) -> None:
        def leave() -> None:
            for order in orders:
                at = bisect.bisect_left(self._waiting, order)
                if at < len(self._waiting) and self._waiting[at] == order:
                    del self._waiting[at]

        self._index_changes.append(leave)

    async def add_log(self, request_id: str, entry: types_pb2.LogEntry) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO logs (request_id, message, level, source, timestamp) VALUES (?, ?, ?, ?, ?)",
                (request_id, entry.message, entry.level, entry.source, entry.timestamp),
            )

    async def logs(self, request_id: str, after_seq: int = 0) -> list[LogRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM logs WHERE request_id = ? AND seq > ? ORDER BY seq", (request_id, after_seq)
            ).fetchall()
        return [
            LogRecord(
                row["seq"],
                types_pb2.LogEntry(
                    message=row["message"], level=row["level"], source=row["source"], timestamp=row["timestamp"]
                ),
            )
            for row in rows
        ]

    async def add_key(self, key: ApiKey) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO api_keys (id, tenant, name, secret_sha256, created_at) VALUES (?, ?, ?, ?, ?)",
                (key.id, key.tenant, key.name, key.secret_sha256, key.created_at),
            )

    async def key(self, key_id: str) -> ApiKey | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM api_keys WHERE id = ?", (key_id,)).fetchone()
        return None if row is None else key_from_row(row)

    async def keys(self) -> list[ApiKey]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM api_keys ORDER BY created_at").fetchall()
        return [key_from_row(row) for row in rows]

    async def revoke_key(self, key_id: str) -> bool:
        with self._tx() as db:
            cur = db.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (time.time(), key_id)
            )
        return cur.rowcount == 1

    async def listen(self, on_change: Callable[[str, bool], None]) -> None:
        """One gateway: every change is made here and notified where it is made."""

    async def drop_previews(self, finished_before: float) -> int:
        with self._tx() as db:
            # The table holds the running requests' and the recently finished ones': a short scan.
            return db.execute(
                "DELETE FROM previews WHERE request_id IN (SELECT p.request_id FROM previews AS p"
                " JOIN requests AS r ON r.id = p.request_id WHERE r.finished_at < ?)",
                (finished_before,),
            ).rowcount

    async def expirable(self, before: float, limit: int) -> list[RequestRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM requests WHERE finished_at IS NOT NULL AND expired_at IS NULL AND finished_at < ?"
                f" AND {_NO_WEBHOOK_TO_BUILD} ORDER BY finished_at LIMIT ?",
                (before, limit),
            ).fetchall()
        return [record_from_row(row) for row in rows]

    async def expire(self, request_ids: Sequence[str]) -> list[str]:
        if not request_ids:
            return []
        marks = ", ".join("?" for _ in request_ids)
        with self._tx() as db:
            expired = [
                row["id"]
                for row in db.execute(
                    "UPDATE requests SET expired_at = ?, input = X'', output = NULL, client_request_id = NULL"
                    f" WHERE id IN ({marks}) AND finished_at IS NOT NULL AND expired_at IS NULL RETURNING id",
                    (time.time(), *request_ids),
                ).fetchall()
            ]
            if expired:
                marks = ", ".join("?" for _ in expired)
                db.execute(f"DELETE FROM logs WHERE request_id IN ({marks})", tuple(expired))
                db.execute(f"DELETE FROM previews WHERE request_id IN ({marks})", tuple(expired))
                db.execute(
                    f"DELETE FROM webhook_deliveries WHERE request_id IN ({marks}) AND {_WEBHOOK_ENDED}", tuple(expired)
                )
        return expired


# A request's one preview row, replaced by each newer preview; its version counts on across retries.
_PUT_PREVIEW = (
    "INSERT INTO previews (request_id, version, step, total_steps, jpeg) VALUES (?, 1, ?, ?, ?)"
    " ON CONFLICT (request_id) DO UPDATE SET version = previews.version + 1, step = excluded.step,"
    " total_steps = excluded.total_steps, jpeg = excluded.jpeg"
)

# Back in the queue at its original seq (FIFO place); the lease is dropped.
_REQUEUE_SET = "state = ?, step = 0, total_steps = 0, owner = NULL, lease_token = NULL, lease_expires_at = NULL"
_FINISH_SET = (
    "state = ?, error_type = ?, error_message = ?, finished_at = ?, lease_token = NULL, lease_expires_at = NULL"
)
# An attempt recorded and the claim released: (status, error, delivered_at, given_up_at, next_attempt_at).
_ATTEMPTED_SET = (
    "attempts = attempts + 1, last_status = ?, last_error = ?, delivered_at = ?, given_up_at = ?,"
    " next_attempt_at = ?, claim_token = NULL, claim_expires_at = NULL"
)
_WEBHOOK_ENDED = "(delivered_at IS NOT NULL OR given_up_at IS NOT NULL)"
# A request keeps its output until its webhook's body is built from it.
_NO_WEBHOOK_TO_BUILD = (
    "NOT EXISTS (SELECT 1 FROM webhook_deliveries AS w WHERE w.request_id = requests.id AND w.body IS NULL"
    " AND w.delivered_at IS NULL AND w.given_up_at IS NULL)"
)

# A waiting request not backing off at the time given as the parameter.
_READY = "(not_before IS NULL OR not_before <= ?)"

Order = tuple[int, float, int]
# The columns of a request's start order, in order.
_ORDER = "priority, fair_tag, seq"


def _order(row: sqlite3.Row) -> Order:
    return (int(row["priority"]), float(row["fair_tag"]), int(row["seq"]))


def _statements(script: str) -> list[str]:
    """The script's statements, a trigger's body (statements between BEGIN and END) kept whole."""
    statements: list[str] = []
    pending = ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \n;"):
                statements.append(pending.strip())
            pending = ""
    return statements
