"""Copies the request store's write-ahead log into the database on a thread of its own.

SQLite checkpoints on its own inside whichever commit takes the log past 1,000 pages, and a
checkpoint fsyncs the database file. Here that commit is a Submit or a Cancel running on
the gateway's event loop: one call in about a hundred took 4-8 ms instead of 0.2 ms, which
is what set Submit's p99 (bench P4), and every other caller waited behind it. With the
automatic checkpoint off, this thread checkpoints after every `every_commits` commits (and
at least every `interval_seconds` when there were any), on its own connection; sqlite3
releases the GIL while it copies and syncs, and a PASSIVE checkpoint never blocks a writer.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# Commits between checkpoints: a Submit writes about five pages, so the log stays near the
# size SQLite's own 1,000-page threshold would keep it at.
EVERY_COMMITS = 200
INTERVAL_SECONDS = 5.0


@dataclass(frozen=True)
class Checkpoint:
    """What `PRAGMA wal_checkpoint(PASSIVE)` reports: frames in the log, frames copied into the database."""

    busy: bool
    log_frames: int
    checkpointed_frames: int


class WalCheckpointer:
    def __init__(
        self, path: Path, *, every_commits: int = EVERY_COMMITS, interval_seconds: float = INTERVAL_SECONDS
    ) -> None:
        self._path = path
        self._every = max(1, every_commits)
        self._interval = interval_seconds
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._commits = 0
        self._done = threading.Condition()
        self._completed = 0
        self._due = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="store-wal-checkpoints", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def committed(self) -> None:
        """Called after each commit of the store's writer; wakes the thread every `every_commits`."""
        self._commits += 1
        if self._commits >= self._every:
            self._due.set()

    def checkpoint(self) -> Checkpoint:
        """One PASSIVE checkpoint now, on the calling thread (the loop's, or a test's)."""
        with self._lock:
            self._commits = 0
            if self._db is None:
                self._db = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None)
            # fetchall, not fetchone: a statement left unfinished holds a read snapshot, and while
            # one is open no writer can start the log over from its beginning.
            ((busy, log_frames, checkpointed),) = self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        with self._done:
            self._completed += 1
            self._done.notify_all()
        return Checkpoint(bool(busy), int(log_frames), int(checkpointed))

    def wait_for(self, count: int, timeout: float) -> bool:
        """Blocks until `count` checkpoints have completed since start; False after `timeout` seconds."""
        with self._done:
            return self._done.wait_for(lambda: self._completed >= count, timeout)

    def stop(self) -> None:
        self._stopping = True
        self._due.set()
        if self._thread.is_alive():
            self._thread.join()
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def _loop(self) -> None:
        while True:
            self._due.wait(self._interval)
            self._due.clear()
            if self._stopping:
                return
            if not self._commits:
                continue
            try:
                self.checkpoint()
            except sqlite3.Error as exc:
                # The next one copies what this one could not; the log only grows meanwhile.
                log.warning("WAL checkpoint failed", extra={"error": str(exc)})
