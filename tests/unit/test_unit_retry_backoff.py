"""A request back in the queue after a failed attempt waits out its backoff on every gateway: the store
holds `not_before`, each claim honours it, and an idle gateway wakes when a backoff another gateway
began ends. Two gateways' stores on one real PostgreSQL server, a real gRPC worker on loopback."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest_asyncio

from gateway.circuit_breaker import CircuitBreaker
from gateway.dispatcher import Dispatcher
from gateway.feed import ChangeFeed
from gateway.metrics import GatewayMetrics
from gateway.scheduling import HotFirstOrder
from gateway.store import RequestStore, State
from gateway.store_postgres import PostgresStore
from gateway.worker_client import WorkerClient
from core.backoff import Backoff
from loraserve.v1 import types_pb2
from tests.unit.worker_testkit import FakeWorker, WorkerServer, wait_until

INPUT = types_pb2.GenerateInput(model_name="org/model", prompt="a red house")


@pytest_asyncio.fixture
async def two(postgres_dsn: str) -> AsyncIterator[tuple[PostgresStore, PostgresStore]]:
    a = await PostgresStore.open(postgres_dsn, owner="gateway-a")
    b = await PostgresStore.open(postgres_dsn, owner="gateway-b")
    yield a, b
    await a.close()
    await b.close()


@pytest_asyncio.fixture
async def worker() -> AsyncIterator[tuple[FakeWorker, WorkerServer]]:
    fake = FakeWorker()
    server = WorkerServer(fake)
    await server.start()
    yield fake, server
    await server.stop()


def dispatcher(store: RequestStore, port: int, backoff: Backoff) -> tuple[Dispatcher, WorkerClient]:
    client = WorkerClient(f"127.0.0.1:{port}", "app", call_timeout_seconds=30.0)
    made = Dispatcher(
        store,
        ChangeFeed(),
        client,
        GatewayMetrics(queue_depth=lambda: 0, in_flight=lambda: 0),
        capacity=2,
        max_attempts=3,
        order=HotFirstOrder(max_skips=0, hot_slots=1),
        retry_backoff=backoff,
        breaker=CircuitBreaker(threshold=2, backoff=Backoff(0.005, 0.05)),
    )
    made.start()
    return made, client


async def test_another_gateway_does_not_claim_a_request_during_its_backoff(
    two: tuple[PostgresStore, PostgresStore], worker: tuple[FakeWorker, WorkerServer]
) -> None:
    a, b = two
    fake, server = worker
    # Gateway A's attempt fails; its backoff (30-60 s) is far longer than this test runs.
    running, client = dispatcher(a, server.port, Backoff(60.0, 60.0))
    try:
        record, _ = await a.add(INPUT, seed=1, model_key="key")
        fake.plans[record.id] = ["store_failed"]
        running.wake()

        async def backing_off() -> bool:
            current = await b.get(record.id)
            return current is not None and current.state == State.IN_QUEUE and current.attempts == 1

        await wait_until(backing_off, "the failed attempt is back in the queue")
        current = await b.get(record.id)
        assert current is not None and current.not_before is not None
        assert current.not_before - time.time() > 20, "the backoff is kept in the store"
        assert await b.waiting(10) == [], "gateway B sees nothing ready to start"
        assert await b.claim(record.id) is None, "nor can it claim the request during A's backoff"
        retry_in = await b.next_retry_in()
        assert retry_in is not None and 20 < retry_in <= 60
        assert fake.calls == [record.id], "one attempt so far"
        # It keeps its place: a request submitted after it waits behind it.
        later, _ = await b.add(INPUT, seed=2, model_key="key")
        assert await b.queue_position(later) == 1
        await b.cancel(later.id)
    finally:
        await running.shutdown(0)
        await client.close()


async def test_an_idle_gateway_runs_a_request_when_a_backoff_begun_elsewhere_ends(
    two: tuple[PostgresStore, PostgresStore], worker: tuple[FakeWorker, WorkerServer]
) -> None:
    a, b = two
    fake, server = worker
    record, _ = await a.add(INPUT, seed=1, model_key="key")
    claimed = await a.claim(record.id)
    assert claimed is not None
    assert await a.requeue(record.id, claimed.lease_token, delay_seconds=0.5)
    assert await b.claim(record.id) is None
    # Gateway B's dispatcher is woken once (by the requeue's notification, in a gateway) and finds
    # nothing ready: it must wake by itself when the backoff ends.
    running, client = dispatcher(b, server.port, Backoff(0.005, 0.05))
    try:
        running.wake()

        async def done() -> bool:
            current = await b.get(record.id)
            return current is not None and current.state == State.COMPLETED

        await wait_until(done, "gateway B ran the request after its backoff")
        current = await a.get(record.id)
        assert current is not None and current.error is None and current.attempts == 2
        assert fake.calls == [record.id]
    finally:
        await running.shutdown(0)
        await client.close()


async def test_a_requeue_without_delay_is_ready_at_once(two: tuple[PostgresStore, PostgresStore]) -> None:
    a, b = two
    record, _ = await a.add(INPUT, seed=1, model_key="key")
    claimed = await a.claim(record.id)
    assert claimed is not None
    assert await a.requeue(record.id, claimed.lease_token)
    assert [r.id for r in await b.waiting(10)] == [record.id]
    assert await b.next_retry_in() is None
    again = await b.claim(record.id)
    assert again is not None and again.not_before is None
