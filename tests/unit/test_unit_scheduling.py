"""HotFirstOrder: hot base models may go first, but never more than max_skips places."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.scheduling import HotFirstOrder
from gateway.store import RequestRecord, RequestStore
from loraserve.v1 import types_pb2


@pytest.fixture
def store(tmp_path: Path) -> RequestStore:
    return RequestStore(tmp_path / "requests.sqlite3")


def queue(store: RequestStore, keys: str) -> list[RequestRecord]:
    """One request per character, its base-model key the character."""
    inp = types_pb2.GenerateInput(model_name="m", prompt="p")
    return [store.add(inp, seed=0, model_key=key)[0] for key in keys]


def drain(store: RequestStore, order: HotFirstOrder) -> list[RequestRecord]:
    """Dispatches everything, one at a time, the way the dispatcher does."""
    ran = []
    while waiting := store.waiting(order.lookahead):
        record = order.choose(waiting)
        assert store.start(record.id)
        order.dispatched(record)
        ran.append(record)
    return ran


def test_zero_skips_is_fifo(store: RequestStore) -> None:
    submitted = queue(store, "abab")
    order = HotFirstOrder(max_skips=0, hot_slots=1)
    order.dispatched(submitted[0])
    assert [r.id for r in drain(store, order)] == [r.id for r in submitted]


def test_hot_model_goes_first(store: RequestStore) -> None:
    first, *rest = queue(store, "abbb")
    order = HotFirstOrder(max_skips=4, hot_slots=1)
    assert store.start(first.id)
    order.dispatched(first)  # replica now holds "a"
    queue(store, "a")
    ran = drain(store, order)
    assert [r.model_key for r in ran] == ["a", "b", "b", "b"]


@pytest.mark.parametrize("max_skips", [1, 2, 3, 5])
def test_no_request_waits_more_than_max_skips_places(store: RequestStore, max_skips: int) -> None:
    warm = queue(store, "h")[0]
    order = HotFirstOrder(max_skips=max_skips, hot_slots=1)
    assert store.start(warm.id)
    order.dispatched(warm)
    cold = queue(store, "c")[0]
    hot = queue(store, "h" * 10)
    ran = drain(store, order)
    position = [r.id for r in ran].index(cold.id)
    # FIFO would run it first; it may be overtaken by exactly max_skips hot requests, no more.
    assert position == max_skips
    assert [r.id for r in ran if r.id != cold.id] == [r.id for r in hot]


def test_forgotten_requests_do_not_keep_counts(store: RequestStore) -> None:
    warm, cold, hot = queue(store, "hch")
    order = HotFirstOrder(max_skips=1, hot_slots=1)
    assert store.start(warm.id)
    order.dispatched(warm)
    assert order.choose(store.waiting(order.lookahead)).id == hot.id
    assert store.cancel(cold.id)
    order.forget(cold.id)
    assert order.choose(store.waiting(order.lookahead)).id == hot.id
