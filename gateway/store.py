"""RequestStore: the queue and history of requests, in SQLite (WAL) in the data directory.

Everything a caller can ask about a request — its place in the queue, its logs, its
progress, its result — is read from here, so a restarted gateway answers the same and
picks up what was waiting. Calls are short and made from the event loop's thread.
"""

from __future__ import annotations

import bisect
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from gateway.wal_checkpoints import WalCheckpointer
from loraserve.v1 import types_pb2


class State(StrEnum):
    IN_QUEUE = "IN_QUEUE"
    IN_PROGRESS = "IN_PROGRESS"
    COMPLETED = "COMPLETED"
    CANCELLED = "CANCELLED"


FINAL_STATES = (State.COMPLETED, State.CANCELLED)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    client_request_id TEXT UNIQUE,
    state TEXT NOT NULL,
    input BLOB NOT NULL,
    seed INTEGER NOT NULL,
    model_key TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    step INTEGER NOT NULL DEFAULT 0,
    total_steps INTEGER NOT NULL DEFAULT 0,
    output BLOB,
    error_type TEXT,
    error_message TEXT,
    inference_seconds REAL
);
CREATE INDEX IF NOT EXISTS requests_waiting ON requests (seq) WHERE state = 'IN_QUEUE';
CREATE TABLE IF NOT EXISTS logs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL,
    message TEXT NOT NULL,
    level INTEGER NOT NULL,
    source TEXT NOT NULL,
    timestamp REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS logs_by_request ON logs (request_id, seq);
"""


@dataclass(frozen=True)
class RequestRecord:
    seq: int
    id: str
    state: State
    input: types_pb2.GenerateInput
    seed: int
    model_key: str
    created_at: float
    started_at: float | None
    finished_at: float | None
    attempts: int
    step: int
    total_steps: int
    output: types_pb2.GenerateOutput | None
    error: types_pb2.RequestError | None
    inference_seconds: float | None

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES


@dataclass(frozen=True)
class LogRecord:
    seq: int
    entry: types_pb2.LogEntry


class RequestStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        # Checkpoints (and their fsync) run on the checkpointer's thread, not inside a caller's commit.
        self._db.execute("PRAGMA wal_autocheckpoint=0")
        self._db.executescript(_SCHEMA)
        self._checkpointer = WalCheckpointer(path)
        self._checkpointer.start()
        # The seqs of waiting requests, sorted: a queue position is a binary search instead of a
        # COUNT over the waiting index, which grew with the queue (1.9× slower Submit / 1.7×
        # GetStatus at 10,000 waiting). Kept in step with the table by every method that moves a
        # request in or out of IN_QUEUE, under the same lock; this process is the store's only writer.
        self._waiting = [
            int(seq)
            for (seq,) in self._db.execute("SELECT seq FROM requests WHERE state = ? ORDER BY seq", (State.IN_QUEUE,))
        ]

    def close(self) -> None:
        self._checkpointer.stop()
        self._db.close()

    @property
    def checkpointer(self) -> WalCheckpointer:
        return self._checkpointer

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        self._checkpointer.committed()

    def add(
        self, inp: types_pb2.GenerateInput, *, seed: int, model_key: str, client_request_id: str = ""
    ) -> tuple[RequestRecord, bool]:
        """Queues a request; returns (record, created). A repeated client_request_id is not queued twice."""
        with self._tx() as db:
            if client_request_id:
                row = db.execute(
                    "SELECT * FROM requests WHERE client_request_id = ?", (client_request_id,)
                ).fetchone()
                if row is not None:
                    return _record(row), False
            request_id = str(uuid.uuid4())
            db.execute(
                "INSERT INTO requests (id, client_request_id, state, input, seed, model_key, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    request_id,
                    client_request_id or None,
                    State.IN_QUEUE,
                    inp.SerializeToString(),
                    seed,
                    model_key,
                    time.time(),
                ),
            )
            row = db.execute("SELECT * FROM requests WHERE id = ?", (request_id,)).fetchone()
            bisect.insort(self._waiting, int(row["seq"]))
        return _record(row), True

    def get(self, request_id: str) -> RequestRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM requests WHERE id = ?", (request_id,)).fetchone()
        return None if row is None else _record(row)

    def queue_position(self, record: RequestRecord) -> int:
        """Requests waiting ahead of this one."""
        with self._lock:
            return bisect.bisect_left(self._waiting, record.seq)

    def waiting_count(self) -> int:
        with self._lock:
            return len(self._waiting)

    def oldest_waiting(self) -> RequestRecord | None:
        head = self.waiting(1)
        return head[0] if head else None

    def waiting(self, limit: int) -> list[RequestRecord]:
        """The head of the queue, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM requests WHERE state = 'IN_QUEUE' ORDER BY seq LIMIT ?", (limit,)
            ).fetchall()
        return [_record(row) for row in rows]

    def start(self, request_id: str) -> bool:
        """IN_QUEUE → IN_PROGRESS; False when it was no longer waiting (e.g. cancelled)."""
        with self._tx() as db:
            started = db.execute(
                "UPDATE requests SET state = ?, started_at = COALESCE(started_at, ?),"
                " attempts = attempts + 1, step = 0, total_steps = 0"
                " WHERE id = ? AND state = ? RETURNING seq",
                (State.IN_PROGRESS, time.time(), request_id, State.IN_QUEUE),
            ).fetchall()
            self._leave_queue(started)
        return bool(started)

    def requeue(self, request_id: str) -> None:
        """Puts a started request back in its original place (its seq keeps its FIFO turn)."""
        with self._tx() as db:
            requeued = db.execute(
                "UPDATE requests SET state = ?, step = 0, total_steps = 0 WHERE id = ? AND state = ? RETURNING seq",
                (State.IN_QUEUE, request_id, State.IN_PROGRESS),
            ).fetchall()
            self._join_queue(requeued)

    def recover(self) -> int:
        """After a restart nothing is running: what was IN_PROGRESS waits again."""
        with self._tx() as db:
            recovered = db.execute(
                "UPDATE requests SET state = ?, step = 0, total_steps = 0 WHERE state = ? RETURNING seq",
                (State.IN_QUEUE, State.IN_PROGRESS),
            ).fetchall()
            self._join_queue(recovered)
        return len(recovered)

    def set_progress(self, request_id: str, step: int, total: int) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE requests SET step = ?, total_steps = ? WHERE id = ? AND state = ?",
                (step, total, request_id, State.IN_PROGRESS),
            )

    def complete(self, request_id: str, output: types_pb2.GenerateOutput, inference_seconds: float) -> bool:
        with self._tx() as db:
            cur = db.execute(
                "UPDATE requests SET state = ?, output = ?, inference_seconds = ?, finished_at = ?"
                " WHERE id = ? AND state = ?",
                (
                    State.COMPLETED,
                    output.SerializeToString(),
                    inference_seconds,
                    time.time(),
                    request_id,
                    State.IN_PROGRESS,
                ),
            )
        return cur.rowcount == 1

    def fail(self, request_id: str, error: types_pb2.RequestError) -> bool:
        """Ends a waiting or running request with an error (state COMPLETED, as fal reports it)."""
        return self._finish(request_id, State.COMPLETED, error)

    def cancel(self, request_id: str) -> bool:
        return self._finish(
            request_id,
            State.CANCELLED,
            types_pb2.RequestError(type="CANCELLED", message="cancelled by the caller"),
        )

    def _finish(self, request_id: str, state: State, error: types_pb2.RequestError) -> bool:
        with self._tx() as db:
            waiting = db.execute(
                "SELECT seq FROM requests WHERE id = ? AND state = ?", (request_id, State.IN_QUEUE)
            ).fetchall()
            cur = db.execute(
                "UPDATE requests SET state = ?, error_type = ?, error_message = ?, finished_at = ?"
                " WHERE id = ? AND state IN (?, ?)",
                (state, error.type, error.message, time.time(), request_id, State.IN_QUEUE, State.IN_PROGRESS),
            )
            self._leave_queue(waiting)
        return cur.rowcount == 1

    def _join_queue(self, rows: list[sqlite3.Row]) -> None:
        for row in rows:
            bisect.insort(self._waiting, int(row[0]))

    def _leave_queue(self, rows: list[sqlite3.Row]) -> None:
        for row in rows:
            at = bisect.bisect_left(self._waiting, int(row[0]))
            if at < len(self._waiting) and self._waiting[at] == int(row[0]):
                del self._waiting[at]

    def add_log(self, request_id: str, entry: types_pb2.LogEntry) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO logs (request_id, message, level, source, timestamp) VALUES (?, ?, ?, ?, ?)",
                (request_id, entry.message, entry.level, entry.source, entry.timestamp),
            )

    def logs(self, request_id: str, after_seq: int = 0) -> list[LogRecord]:
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


def _record(row: sqlite3.Row) -> RequestRecord:
    output = None
    if row["output"] is not None:
        output = types_pb2.GenerateOutput.FromString(row["output"])
    error = None
    if row["error_type"] is not None:
        error = types_pb2.RequestError(type=row["error_type"], message=row["error_message"] or "")
    return RequestRecord(
        seq=row["seq"],
        id=row["id"],
        state=State(row["state"]),
        input=types_pb2.GenerateInput.FromString(row["input"]),
        seed=row["seed"],
        model_key=row["model_key"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        attempts=row["attempts"],
        step=row["step"],
        total_steps=row["total_steps"],
        output=output,
        error=error,
        inference_seconds=row["inference_seconds"],
    )
