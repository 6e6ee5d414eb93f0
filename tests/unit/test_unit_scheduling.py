"""HotFirstOrder: hot base models may go first, but never more than max_skips places."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from gateway.scheduling import HotFirstOrder
from gateway.store import RequestRecord, RequestStore
from gateway.store_sqlite import SqliteStore
from loraserve.v1 import types_pb2


@pytest_asyncio.fixture
async def store(tmp_path: Path) -> AsyncIterator[RequestStore]:
    opened = SqliteStore(tmp_path / "requests.sqlite3")
    yield opened
    await opened.close()


async def queue(store: RequestStore, keys: str) -> list[RequestRecord]:
    """One request per character, its base-model key the character."""
    inp = types_pb2.GenerateInput(model_name="m", prompt="p")
    return [(await store.add(inp, seed=0, model_key=key))[0] for key in keys]


async def drain(store: RequestStore, order: HotFirstOrder) -> list[RequestRecord]:
    """Dispatches everything, one at a time, the way the dispatcher does."""
    ran = []
    while waiting := await store.waiting(order.lookahead):
        record = order.choose(waiting)
        assert await store.claim(record.id)
        order.dispatched(record)
        ran.append(record)
    return ran


async def test_zero_skips_is_fifo(store: RequestStore) -> None:
    submitted = await queue(store, "abab")
    order = HotFirstOrder(max_skips=0, hot_slots=1)
    order.dispatched(submitted[0])
    assert [r.id for r in await drain(store, order)] == [r.id for r in submitted]


async def test_hot_model_goes_first(store: RequestStore) -> None:
    first, *rest = await queue(store, "abbb")
    order = HotFirstOrder(max_skips=4, hot_slots=1)
    assert await store.claim(first.id)
    order.dispatched(first)  # replica now holds "a"
    await queue(store, "a")
    ran = await drain(store, order)
    assert [r.model_key for r in ran] == ["a", "b", "b", "b"]


@pytest.mark.parametrize("max_skips", [1, 2, 3, 5])
async def test_no_request_waits_more_than_max_skips_places(store: RequestStore, max_skips: int) -> None:
    warm = (await queue(store, "h"))[0]
    order = HotFirstOrder(max_skips=max_skips, hot_slots=1)
    assert await store.claim(warm.id)
    order.dispatched(warm)
    cold = (await queue(store, "c"))[0]
    hot = await queue(store, "h" * 10)
    ran = await drain(store, order)
    position = [r.id for r in ran].index(cold.id)
    # FIFO would run it first; it may be overtaken by exactly max_skips hot requests, no more.
    assert position == max_skips
    assert [r.id for r in ran if r.id != cold.id] == [r.id for r in hot]


async def test_forgotten_requests_do_not_keep_counts(store: RequestStore) -> None:
    warm, cold, hot = await queue(store, "hch")
    order = HotFirstOrder(max_skips=1, hot_slots=1)
    assert await store.claim(warm.id)
    order.dispatched(warm)
    assert order.choose(await store.waiting(order.lookahead)).id == hot.id
    assert await store.cancel(cold.id)
    order.forget(cold.id)
    assert order.choose(await store.waiting(order.lookahead)).id == hot.id
