"""Fair order between tenants, weights and priorities, on both store engines: a tenant's burst does
not hold back another tenant's single request, and queue positions are the order requests start in."""

from __future__ import annotations

import random

import pytest

from gateway.store import RequestRecord, RequestStore
from loraserve.v1 import types_pb2

INPUT = types_pb2.GenerateInput(model_name="org/model", prompt="p")


async def submit(
    store: RequestStore, tenant: str, count: int = 1, *, weight: float = 1.0, priority: int = 0
) -> list[RequestRecord]:
    return [
        (await store.add(INPUT, seed=0, model_key="k", tenant=tenant, weight=weight, priority=priority))[0]
        for _ in range(count)
    ]


async def start_order(store: RequestStore) -> list[str]:
    """Claims the head of the queue until it is empty, as the dispatcher does; the tenants in that order."""
    started = []
    while head := await store.waiting(1):
        claimed = await store.claim(head[0].id)
        assert claimed is not None
        started.append(claimed.tenant)
    return started


async def test_a_burst_does_not_hold_back_another_tenants_single_request(store: RequestStore) -> None:
    await submit(store, "burst", 50)
    (single,) = await submit(store, "single")
    assert await store.queue_position(single) == 1, "one job of the burst, then the single request"
    assert (await start_order(store))[:3] == ["burst", "single", "burst"]


async def test_a_tenant_arriving_later_waits_one_job_not_the_backlog(store: RequestStore) -> None:
    await submit(store, "burst", 20)
    for _ in range(5):
        head = await store.waiting(1)
        assert await store.claim(head[0].id) is not None
    (late,) = await submit(store, "late")
    assert await store.queue_position(late) == 1


async def test_weights_share_the_starts(store: RequestStore) -> None:
    await submit(store, "heavy", 30, weight=2.0)
    await submit(store, "light", 30, weight=1.0)
    first = (await start_order(store))[:30]
    assert first.count("heavy") == 20 and first.count("light") == 10


async def test_low_priority_runs_only_when_no_normal_request_waits(store: RequestStore) -> None:
    low = await submit(store, "a", 3, priority=1)
    normal = await submit(store, "b", 2)
    assert [await store.queue_position(r) for r in normal] == [0, 1]
    assert [await store.queue_position(r) for r in low] == [2, 3, 4]
    (later,) = await submit(store, "c")
    assert await store.queue_position(later) == 1, "fair among normal requests: after b's first, before b's second"
    assert [await store.queue_position(r) for r in low] == [3, 4, 5], "and before every low one"


async def test_positions_are_the_order_requests_start_in(store: RequestStore) -> None:
    rng = random.Random(3)
    weights = {"a": 1.0, "b": 2.0, "c": 0.5}
    for _ in range(60):
        tenant = rng.choice(list(weights))
        await submit(store, tenant, weight=weights[tenant], priority=int(rng.random() < 0.2))
    waiting = await store.waiting(1000)
    by_position = sorted(waiting, key=lambda r: r.order)
    assert [await store.queue_position(r) for r in by_position] == list(range(len(waiting)))
    started = []
    while head := await store.waiting(1):
        assert await store.claim(head[0].id) is not None
        started.append(head[0].id)
    assert started == [r.id for r in by_position]


async def test_tenant_activity_counts_waiting_and_running(store: RequestStore) -> None:
    records = await submit(store, "a", 3)
    await submit(store, "b", 2)
    assert await store.claim(records[0].id) is not None
    assert await store.tenant_activity("a") == (2, 1)
    assert await store.tenant_activity("b") == (2, 0)
    assert await store.tenant_activity("nobody") == (0, 0)


@pytest.mark.parametrize("weight", [0.25, 4.0])
async def test_a_retried_request_keeps_its_fair_place(store: RequestStore, weight: float) -> None:
    first, second = await submit(store, "a", 2, weight=weight)
    run = await store.claim(first.id)
    assert run is not None
    await submit(store, "b", 3)
    assert await store.requeue(first.id, run.lease_token)
    assert await store.queue_position(first) == 0
