"""What only the SQLite engine does: WAL and its checkpointer thread, the data-dir lock, migrating
a database written before migrations existed, and a connection that survives a failed COMMIT."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from gateway import migrations
from gateway.data_dir_lock import DataDirLocked
from gateway.store import State
from gateway.store_sqlite import SqliteStore
from loraserve.v1 import types_pb2


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "requests.sqlite3"


@pytest_asyncio.fixture
async def store(path: Path) -> AsyncIterator[SqliteStore]:
    opened = SqliteStore(path)
    yield opened
    await opened.close()


def inp(prompt: str = "p") -> types_pb2.GenerateInput:
    return types_pb2.GenerateInput(model_name="org/model", prompt=prompt)


async def add(store: SqliteStore, prompt: str = "p") -> str:
    record, _ = await store.add(inp(prompt), seed=7, model_key="key")
    return record.id


async def test_wal_mode_is_on(store: SqliteStore, path: Path) -> None:
    await add(store)
    with sqlite3.connect(path) as other:
        (mode,) = other.execute("PRAGMA journal_mode").fetchone()
    other.close()
    assert mode.lower() == "wal"


async def test_a_second_gateway_on_the_same_data_dir_is_refused(store: SqliteStore, path: Path) -> None:
    with pytest.raises(DataDirLocked, match="another gateway .*pid .* is using the data dir") as refused:
        SqliteStore(path)
    assert "store_url" in str(refused.value)
    # The first one is untouched and the lock goes with it.
    await add(store)
    await store.close()
    again = SqliteStore(path)
    assert await again.waiting_count() == 1
    await again.close()


def wal_bytes(path: Path) -> int:
    return Path(f"{path}-wal").stat().st_size


async def test_commits_never_checkpoint_on_the_callers_thread(store: SqliteStore, path: Path) -> None:
    """With SQLite's automatic checkpoint the log is copied back (and reused) at 1,000 pages; here only the checkpointer copies."""
    store.checkpointer.stop()
    for index in range(1500):
        await store.cancel(await add(store, f"p{index}"))
    assert wal_bytes(path) > 2000 * 4096
    done = store.checkpointer.checkpoint()
    assert not done.busy and done.log_frames > 2000 and done.checkpointed_frames == done.log_frames
    with sqlite3.connect(path) as other:
        assert other.execute("SELECT COUNT(*) FROM requests WHERE state = 'CANCELLED'").fetchone() == (1500,)
    other.close()


async def test_the_checkpointer_thread_copies_the_log_every_few_hundred_commits(store: SqliteStore) -> None:
    from gateway.wal_checkpoints import EVERY_COMMITS

    for index in range(EVERY_COMMITS):
        await add(store, f"p{index}")
    assert store.checkpointer.wait_for(1, timeout=30)
    await add(store, "after")
    assert store.checkpointer.checkpoint().log_frames < 20


def _pre_migration_database(path: Path) -> None:
    """The schema and one waiting request as a gateway before numbered migrations left them."""
    path.parent.mkdir(parents=True)
    db = sqlite3.connect(path)
    db.executescript(migrations.SQLITE[0].sql)
    db.execute(
        "INSERT INTO requests (id, state, input, seed, model_key, created_at) VALUES (?, ?, ?, ?, ?, ?)",
        ("old-1", "IN_QUEUE", inp("old").SerializeToString(), 3, "k", 1.0),
    )
    db.commit()
    db.close()


async def test_an_older_database_is_migrated_at_start_and_keeps_its_requests(path: Path) -> None:
    _pre_migration_database(path)
    store = SqliteStore(path)
    try:
        assert store.applied_migrations() == [m.version for m in migrations.SQLITE]
        old = await store.get("old-1")
        assert old is not None and old.state == State.IN_QUEUE and old.input.prompt == "old"
        run = await store.claim("old-1")
        assert run is not None and run.lease_token
    finally:
        await store.close()
    reopened = SqliteStore(path)
    assert reopened.applied_migrations() == [m.version for m in migrations.SQLITE]
    await reopened.close()


class _FailingCommit:
    """The store's connection, except that the next COMMIT fails (a full disk, an I/O error)."""

    def __init__(self, real: sqlite3.Connection) -> None:
        self.real = real
        self.fail_next_commit = True

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql == "COMMIT" and self.fail_next_commit:
            self.fail_next_commit = False
            raise sqlite3.OperationalError("disk I/O error")
        return self.real.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


async def test_a_failed_commit_is_rolled_back_and_the_store_goes_on(store: SqliteStore) -> None:
    kept = await add(store, "kept")
    store._db = _FailingCommit(store._db)  # type: ignore[assignment]
    with pytest.raises(sqlite3.OperationalError):
        await add(store, "lost")
    assert not store._db.in_transaction
    assert [r.input.prompt for r in await store.waiting(10)] == ["kept"]
    assert await store.waiting_count() == 1
    after = await add(store, "after")
    assert [r.id for r in await store.waiting(10)] == [kept, after]


async def test_submits_committed_during_an_fsync_wait_for_the_next_one_and_share_it(tmp_path: Path) -> None:
    """Group commit: nobody is answered on an fsync that began before their commit; many share one."""
    import asyncio
    import threading

    from gateway.wal_sync import WalSync

    db_path = tmp_path / "r.sqlite3"
    Path(f"{db_path}-wal").write_bytes(b"log")
    sync = WalSync(db_path)
    started, release = threading.Event(), threading.Event()
    fsyncs: list[int] = []

    def fsync() -> None:
        fsyncs.append(len(fsyncs))
        if len(fsyncs) == 1:
            started.set()
            release.wait(30)

    sync._fsync = fsync  # type: ignore[method-assign]
    first = asyncio.ensure_future(sync.sync())
    assert await asyncio.to_thread(started.wait, 30)
    later = [asyncio.ensure_future(sync.sync()) for _ in range(10)]
    await asyncio.sleep(0)
    assert not first.done() and not any(f.done() for f in later)
    release.set()
    await asyncio.wait_for(asyncio.gather(first, *later), 30)
    assert fsyncs == [0, 1], "the first fsync began before the later commits: they waited for a second, shared one"
    sync.close()
