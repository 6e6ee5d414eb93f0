"""Queue positions and queue sizes cost the same however many requests wait: no call counts the
waiting rows. Positions come from each gateway's in-memory order (a binary search), kept in step
with every gateway's writes on PostgreSQL through notifications; the tenants' waiting and running
counts from a table that triggers keep in the transaction of every state change, on both engines."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest_asyncio

from gateway.queue_index import QueueChange, QueueIndex
from gateway.store import RequestRecord, RequestStore
from gateway.store_postgres import PostgresStore
from gateway.store_sqlite import SqliteStore
from loraserve.v1 import types_pb2
from tests.unit.worker_testkit import wait_until

INPUT = types_pb2.GenerateInput(model_name="org/model", prompt="a red house")


class RecordingPostgresStore(PostgresStore):
    """The real store, keeping the SQL of every statement it runs for the test to read."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.statements: list[str] = []

    async def _fetch(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        self.statements.append(sql)
        return await super()._fetch(sql, params)

    async def _write(self, sql: str, params: tuple[Any, ...], **kwargs: Any) -> list[dict[str, Any]]:
        self.statements.append(sql)
        return await super()._write(sql, params, **kwargs)


@pytest_asyncio.fixture
async def two(postgres_dsn: str) -> AsyncIterator[tuple[RecordingPostgresStore, RecordingPostgresStore]]:
    """Two gateways' stores on one database, each listening as a gateway does."""
    stores: list[RecordingPostgresStore] = []
    for owner in ("gateway-a", "gateway-b"):
        store = await RecordingPostgresStore.open(postgres_dsn, owner=owner)
        assert isinstance(store, RecordingPostgresStore)
        await store.listen(lambda _id, _moved: None)
        stores.append(store)
    yield stores[0], stores[1]
    for store in stores:
        await store.close()


async def counted_positions(dsn: str) -> dict[str, int]:
    """The truth, counted the slow way: each waiting request's position in start order."""
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute("SELECT id FROM requests WHERE state = 'IN_QUEUE' ORDER BY priority, fair_tag, seq")
        return {row[0]: at for at, row in enumerate(await cur.fetchall())}


async def positions(store: RequestStore, ids: list[str]) -> dict[str, int]:
    found: dict[str, int] = {}
    for request_id in ids:
        record = await store.get(request_id)
        if record is not None and record.state == "IN_QUEUE":
            found[request_id] = await store.queue_position(record)
    return found


async def test_positions_agree_across_gateways_without_counting_rows(
    two: tuple[RecordingPostgresStore, RecordingPostgresStore], postgres_dsn: str
) -> None:
    a, b = two
    await wait_until(lambda: a._index_live and b._index_live, "both gateways listen")
    records: list[RequestRecord] = []
    for i in range(40):
        store = a if i % 3 else b
        record, _ = await store.add(INPUT, seed=i, model_key="k", tenant=f"t{i % 4}", priority=int(i % 7 == 0))
        records.append(record)
    ids = [r.id for r in records]
    # Every kind of move, made on either gateway: claims, a requeue (with and without backoff), cancels,
    # a failure of a waiting request, a start deadline passing.
    run = await b.claim(ids[0])
    assert run is not None and await b.requeue(ids[0], run.lease_token, delay_seconds=30)
    run = await a.claim(ids[1])
    assert run is not None and await a.requeue(ids[1], run.lease_token)
    assert await a.claim(ids[2]) is not None
    assert await b.claim(ids[3]) is not None
    assert await a.cancel(ids[5])
    assert await b.cancel(ids[8])
    assert await a.fail(ids[9], types_pb2.RequestError(type="INTERNAL", message="gone"))
    late, _ = await b.add(INPUT, seed=99, model_key="k", tenant="t1", start_timeout_seconds=0.001)
    ids.append(late.id)
    await wait_until(lambda: time.time() > (late.start_deadline or 0), "the start deadline passed")
    assert await a.expire_start_deadlines() == [late.id]

    truth = await counted_positions(postgres_dsn)
    assert len(truth) == 40 - 2 - 3

    async def agree() -> bool:
        return await positions(a, ids) == truth and await positions(b, ids) == truth

    await wait_until(agree, "both gateways' positions match the counted ones")
    assert await a.waiting_count() == await b.waiting_count() == len(truth)
    assert a.known_queue_depth() == b.known_queue_depth() == len(truth)
    async with await psycopg.AsyncConnection.connect(postgres_dsn) as conn:
        cur = await conn.execute(
            "SELECT tenant, count(*) FILTER (WHERE state = 'IN_QUEUE'), count(*) FILTER (WHERE state = 'IN_PROGRESS')"
            " FROM requests GROUP BY tenant"
        )
        counted = {row[0]: (row[1], row[2]) for row in await cur.fetchall()}
    assert counted["t2"] == (9, 1) and counted["t3"] == (9, 1)
    for store in (a, b):
        assert {tenant: await store.tenant_activity(tenant) for tenant in counted} == counted

    # What a Submit and a GetStatus run: nothing counts the waiting rows.
    b.statements.clear()
    added, _ = await b.add(INPUT, seed=100, model_key="k", tenant="t2")
    at = await b.queue_position(added)
    probe = await b.get(ids[-2])
    assert probe is not None
    behind = await b.queue_position(probe)
    await b.tenant_activity("t2")
    await b.waiting_count()
    assert b.statements and not [sql for sql in b.statements if "count(" in sql.lower()], b.statements
    truth = await counted_positions(postgres_dsn)
    assert (at, behind) == (truth[added.id], truth[ids[-2]])


async def test_a_store_without_a_listener_counts_positions(postgres_dsn: str) -> None:
    """Without its notifications a gateway cannot know other gateways' moves: it counts, as before."""
    a = await PostgresStore.open(postgres_dsn)
    b = await PostgresStore.open(postgres_dsn)
    try:
        first, _ = await a.add(INPUT, seed=1, model_key="k")
        second, _ = await b.add(INPUT, seed=2, model_key="k")
        assert await a.queue_position(second) == 1
        assert await a.cancel(first.id)
        assert await b.queue_position(second) == 0
    finally:
        await a.close()
        await b.close()


async def test_tenant_counts_follow_every_state_change(store: RequestStore) -> None:
    """The counts table against the requests themselves, through every write that moves a request."""
    made = [(await store.add(INPUT, seed=i, model_key="k", tenant=f"t{i % 2}"))[0] for i in range(12)]
    runs = [await store.claim(r.id) for r in made[:6]]
    assert all(runs)
    assert await store.requeue(made[0].id, runs[0].lease_token)  # type: ignore[union-attr]
    assert await store.complete(made[1].id, runs[1].lease_token, types_pb2.GenerateOutput(), 0.1)  # type: ignore[union-attr]
    assert await store.fail(made[2].id, types_pb2.RequestError(type="INTERNAL", message="x"), runs[2].lease_token)  # type: ignore[union-attr]
    assert await store.cancel(made[3].id)
    assert await store.cancel(made[7].id)
    # t0: made 0, 2, 4, 6, 8, 10: 0 waiting again, 2 failed, 4 running, 6, 8, 10 waiting.
    assert await store.tenant_activity("t0") == (4, 1)
    # t1: made 1 completed, 3 cancelled, 5 running, 7 cancelled, 9, 11 waiting.
    assert await store.tenant_activity("t1") == (2, 1)
    assert await store.tenant_activity("nobody") == (0, 0)
    assert await store.waiting_count() == 6


async def test_sqlite_quota_checks_read_counts_not_rows(tmp_path: Any) -> None:
    store = SqliteStore(tmp_path / "data" / "requests.sqlite3")
    try:
        for i in range(5):
            await store.add(INPUT, seed=i, model_key="k", tenant="t", max_waiting=10)
        statements: list[str] = []
        store._db.set_trace_callback(statements.append)
        await store.add(INPUT, seed=9, model_key="k", tenant="t", max_waiting=10)
        assert await store.tenant_activity("t") == (6, 0)
        store._db.set_trace_callback(None)
        assert statements and not [sql for sql in statements if "count(" in sql.lower()], statements
    finally:
        await store.close()


def test_sqlite_migrations_keep_trigger_bodies_whole(tmp_path: Any) -> None:
    """A database from before the counts table gets them filled from the requests it holds."""
    path = tmp_path / "data" / "requests.sqlite3"
    path.parent.mkdir()
    from gateway import migrations
    from gateway.store_sqlite import _statements

    db = sqlite3.connect(path, isolation_level=None)
    db.execute(f"CREATE TABLE {migrations.MIGRATIONS_TABLE} (version INTEGER PRIMARY KEY, name TEXT, applied_at REAL)")
    for step in migrations.SQLITE[:8]:
        for statement in _statements(step.sql):
            db.execute(statement)
        db.execute(f"INSERT INTO {migrations.MIGRATIONS_TABLE} VALUES (?, ?, 0)", (step.version, step.name))
    for i, state in enumerate(["IN_QUEUE", "IN_QUEUE", "IN_PROGRESS", "COMPLETED"]):
        db.execute(
            "INSERT INTO requests (id, state, input, seed, model_key, created_at, tenant) VALUES (?, ?, X'', 0, 'k', 0, 'a')",
            (f"r{i}", state),
        )
    db.close()
    store = SqliteStore(path)
    try:
        assert tuple(store._db.execute("SELECT waiting, running FROM queue_counts WHERE tenant = 'a'").fetchone()) == (2, 1)
        assert store.known_queue_depth() == 2
    finally:
        store._db.close()
        store._dir_lock.release()


def test_a_late_notification_does_not_undo_a_newer_change() -> None:
    index = QueueIndex()
    joined = QueueChange("r", 2, True, (0, 1.0, 1))
    left = QueueChange("r", 3, False, (0, 1.0, 1))
    other = QueueChange("s", 0, True, (0, 2.0, 2))
    index.apply(other)
    index.apply(joined)
    index.apply(left)
    index.apply(joined)  # its notification, after the local apply of the newer leave
    assert len(index) == 1 and index.position((0, 2.0, 2)) == 0
    index.begin_reload()
    index.apply(QueueChange("t", 0, True, (0, 0.5, 3)))  # committed while the table is read
    index.finish_reload([other])
    assert len(index) == 2 and index.position((0, 2.0, 2)) == 1
