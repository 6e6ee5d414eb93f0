"""What the PostgreSQL engine adds: several gateways on one queue — atomic claims, the same queue
positions from every gateway, leases taken back from a dead owner, changes announced to every
listener, concurrent migrations — on a real server on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import psycopg
import pytest_asyncio

from gateway import migrations
from gateway.store import State
from gateway.store_postgres import PostgresStore
from loraserve.v1 import types_pb2
from tests.conftest import free_port


@pytest_asyncio.fixture
async def two(postgres_dsn: str) -> AsyncIterator[tuple[PostgresStore, PostgresStore]]:
    """Two gateways' stores on one database."""
    a = await PostgresStore.open(postgres_dsn, owner="gateway-a")
    b = await PostgresStore.open(postgres_dsn, owner="gateway-b")
    yield a, b
    await a.close()
    await b.close()


def inp(prompt: str = "p") -> types_pb2.GenerateInput:
    return types_pb2.GenerateInput(model_name="org/model", prompt=prompt)


async def test_concurrent_migrations_run_each_step_once(postgres_dsn: str) -> None:
    stores = await asyncio.gather(*(PostgresStore.open(postgres_dsn) for _ in range(4)))
    try:
        assert await stores[0].applied_migrations() == [m.version for m in migrations.POSTGRES]
    finally:
        for store in stores:
            await store.close()


async def test_every_request_is_claimed_by_exactly_one_gateway(two: tuple[PostgresStore, PostgresStore]) -> None:
    a, b = two
    ids = [(await a.add(inp(str(i)), seed=i, model_key="k"))[0].id for i in range(40)]

    async def drain(store: PostgresStore) -> list[str]:
        won = []
        for request_id in ids:
            if await store.claim(request_id) is not None:
                won.append(request_id)
        return won

    won_a, won_b = await asyncio.gather(drain(a), drain(b))
    assert sorted(won_a + won_b) == sorted(ids)
    assert not set(won_a) & set(won_b)
    for request_id in won_a:
        record = await b.get(request_id)
        assert record is not None and record.owner == "gateway-a" and record.attempts == 1


async def test_queue_positions_are_the_same_from_every_gateway(two: tuple[PostgresStore, PostgresStore]) -> None:
    a, b = two
    records = [(await (a if i % 2 else b).add(inp(), seed=i, model_key="k"))[0] for i in range(6)]
    await b.claim(records[1].id)
    await a.cancel(records[3].id)
    for record in (records[0], records[2], records[4], records[5]):
        assert await a.queue_position(record) == await b.queue_position(record)
    assert [await a.queue_position(r) for r in (records[0], records[2], records[4], records[5])] == [0, 1, 2, 3]
    assert await a.waiting_count() == await b.waiting_count() == 4
    # GetStatus reads the position with the record, in one round trip.
    read = [await b.get(r.id) for r in (records[0], records[2], records[4], records[5])]
    assert [r.queue_position for r in read if r is not None] == [0, 1, 2, 3]
    assert (await b.get(records[1].id)).queue_position is None  # type: ignore[union-attr]


async def test_a_dead_gateways_running_request_is_taken_back_by_another(
    two: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = two
    record, _ = await a.add(inp(), seed=1, model_key="k")
    run = await a.claim(record.id)
    assert run is not None
    assert not await b.take_back(max_attempts=10), "a live lease is left alone"
    # Gateway A stops renewing (SIGKILL): its lease runs out by the database's clock.
    async with await psycopg.AsyncConnection.connect(a._dsn, autocommit=True) as conn:
        await conn.execute("UPDATE requests SET lease_expires_at = lease_expires_at - 3600 WHERE id = %s", (record.id,))
    taken = await b.take_back(max_attempts=10)
    assert taken.requeued == [record.id]
    rerun = await b.claim(record.id)
    assert rerun is not None and rerun.owner == "gateway-b" and rerun.attempts == 2
    # A's late result is refused; B's stands.
    assert not await a.complete(record.id, run.lease_token, types_pb2.GenerateOutput(seed=666), 1.0)
    assert await a.renew({record.id: run.lease_token}) == set()
    assert await b.complete(record.id, rerun.lease_token, types_pb2.GenerateOutput(seed=7), 1.0)
    done = await a.get(record.id)
    assert done is not None and done.state == State.COMPLETED and done.output is not None and done.output.seed == 7


async def test_changes_on_one_gateway_are_announced_to_the_others(
    two: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = two
    seen: asyncio.Queue[str] = asyncio.Queue()
    moved: list[bool] = []
    await b.listen(lambda request_id, queue: (seen.put_nowait(request_id), moved.append(queue)))
    assert await asyncio.wait_for(seen.get(), 30) == "", "a (re)connected listener first asks for a full re-read"
    record, _ = await a.add(inp(), seed=1, model_key="k")
    assert await asyncio.wait_for(seen.get(), 30) == record.id
    run = await a.claim(record.id)
    assert run is not None
    assert await asyncio.wait_for(seen.get(), 30) == record.id
    assert await b.cancel(record.id)
    assert await asyncio.wait_for(seen.get(), 30) == record.id
    await b.add_log(record.id, types_pb2.LogEntry(message="step"))
    assert await asyncio.wait_for(seen.get(), 30) == record.id
    assert moved == [True, True, True, True, False], "a log line moves no queue position"
    # The run on A learns it was cancelled from its lease.
    assert await a.renew({record.id: run.lease_token}) == set()


async def test_an_unreachable_database_is_store_unavailable(postgres_dsn: str) -> None:
    from gateway.store import StoreUnavailable

    store = await PostgresStore.open(postgres_dsn)
    async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as admin:
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid()"
        )
    # The pool finds its broken connections and replaces them: the next call works.
    record, created = await store.add(inp(), seed=1, model_key="k")
    assert created and (await store.get(record.id)) is not None
    await store.close()
    bad = f"postgresql://postgres@127.0.0.1:{free_port()}/nope"  # nothing listens there
    try:
        await PostgresStore.open(bad, connect_timeout_seconds=2)
    except StoreUnavailable as exc:
        assert "cannot reach PostgreSQL" in str(exc)
    else:
        raise AssertionError("opening an unreachable database must fail with StoreUnavailable")
