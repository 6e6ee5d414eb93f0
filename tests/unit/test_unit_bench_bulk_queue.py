"""P4's deepest queue is written into the store directly (bench/bulk_queue.py): the copies must be real
waiting requests behind the ones already waiting, counted and positioned by the store like any Submit,
and removed again by one call, on both engines."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `bench/` sits beside the packages

from bench.bulk_queue import add_waiting, remove_waiting
from gateway.store import RequestStore, State
from gateway.store_postgres import PostgresStore
from gateway.store_sqlite import SqliteStore
from loraserve.v1 import types_pb2


@pytest.mark.parametrize("engine", ["sqlite", "postgres"])
async def test_copies_wait_behind_the_queue_and_are_removed(engine: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    path = tmp_path / "requests.sqlite3"
    dsn = "" if engine == "sqlite" else str(request.getfixturevalue("postgres_dsn"))
    store: RequestStore = SqliteStore(path) if engine == "sqlite" else await PostgresStore.open(dsn)
    try:
        inp = types_pb2.GenerateInput(model_name="org/model", prompt="p")
        first, _ = await store.add(inp, seed=1, model_key="key", tenant="t")
        second, _ = await store.add(inp, seed=2, model_key="key", tenant="t")
        copies = await add_waiting(store, dsn, path, second.id, 25)
        assert len(set(copies)) == 25 and not {first.id, second.id} & set(copies)
        assert await store.waiting_count() == 27 and await store.tenant_activity("t") == (27, 0)
        last = await store.get(copies[-1])
        assert last is not None and last.state == State.IN_QUEUE and last.seed == 2
        assert len(last.id) == len(second.id)
        # Behind both originals, in the order they were made; a Submit after them goes behind them all.
        positions = [await store.queue_position(r) for r in [await store.get(c) for c in copies] if r is not None]
        assert sorted(positions) == list(range(2, 27))
        third, _ = await store.add(inp, seed=3, model_key="key", tenant="t")
        assert await store.queue_position(third) == 27
        await remove_waiting(store, dsn, path)
        assert await store.waiting_count() == 3 and await store.tenant_activity("t") == (3, 0)
        assert await store.queue_position(third) == 2
        assert await store.get(copies[0]) is None
    finally:
        await store.close()
