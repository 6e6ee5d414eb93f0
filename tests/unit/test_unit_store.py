"""The RequestStore interface, run against both engines: SQLite in a temp dir and PostgreSQL on a
real server on loopback (tests/postgres_server.py) — FIFO order, positions, transitions, leases,
restarts. Engine-specific behaviour lives in test_unit_store_sqlite.py / test_unit_store_postgres.py.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import pytest

from gateway.store import RequestRecord, RequestStore, State, TenantFull
from gateway.store_postgres import PostgresStore
from loraserve.v1 import flux_pb2, types_pb2, worker_pb2
from tests.unit.conftest import Opener


def inp(prompt: str = "a red house") -> types_pb2.GenerateInput:
    return types_pb2.GenerateInput(model_name="org/model", prompt=prompt, num_images=2)


async def add(store: RequestStore, prompt: str = "p", *, client_request_id: str = "") -> RequestRecord:
    record, created = await store.add(inp(prompt), seed=7, model_key="key", client_request_id=client_request_id)
    assert created
    return record


async def claim(store: RequestStore, record: RequestRecord) -> RequestRecord:
    claimed = await store.claim(record.id)
    assert claimed is not None
    return claimed


async def get(store: RequestStore, request_id: str) -> RequestRecord:
    record = await store.get(request_id)
    assert record is not None
    return record


async def positions(store: RequestStore, *records: RequestRecord) -> list[int]:
    return [await store.queue_position(r) for r in records]


async def oldest(store: RequestStore) -> str | None:
    head = await store.waiting(1)
    return head[0].id if head else None


def output() -> types_pb2.GenerateOutput:
    return types_pb2.GenerateOutput(images=[types_pb2.Image(url="http://h/files/a.png", width=64, height=64)], seed=7)


async def test_add_and_get(store: RequestStore) -> None:
    record, created = await store.add(inp("hello"), seed=123, model_key="mk")
    assert created
    got = await get(store, record.id)
    assert got == record
    assert got.state == State.IN_QUEUE and not got.finished
    assert got.input == inp("hello")
    assert (got.seed, got.model_key, got.attempts, got.step, got.total_steps) == (123, "mk", 0, 0, 0)
    assert got.started_at is None and got.finished_at is None and got.start_deadline is None
    assert got.output is None and got.error is None and got.lease_token == ""
    assert await store.get("no-such-id") is None


async def test_a_flux_request_is_told_apart_from_a_lora_one(store: RequestStore) -> None:
    """The queue's input column holds either family; a FLUX one comes back as its FluxInput, with no
    GenerateInput field set, and a fal-ai/lora one has no FluxInput."""
    flux_input = flux_pb2.FluxInput(prompt="a cat", endpoint=flux_pb2.FLUX_ENDPOINT_INPAINTING, num_images=2)
    flux_record, _ = await store.add(worker_pb2.QueuedFluxInput(input=flux_input), seed=1, model_key="flux")
    lora_record = await add(store)
    got = await get(store, flux_record.id)
    assert got.flux_input == flux_input and got.input.ListFields() == []
    assert (await get(store, lora_record.id)).flux_input is None


async def test_fifo_and_queue_positions(store: RequestStore) -> None:
    assert await oldest(store) is None
    assert await store.waiting_count() == 0
    a, b, c, d = [await add(store, name) for name in "abcd"]
    assert await positions(store, a, b, c, d) == [0, 1, 2, 3]
    assert [r.id for r in await store.waiting(10)] == [a.id, b.id, c.id, d.id]
    assert await store.waiting_count() == 4 and store.known_queue_depth() == 4

    await claim(store, a)
    assert await positions(store, b, c, d) == [0, 1, 2]
    assert await store.cancel(c.id)
    assert await positions(store, b, d) == [0, 1]
    await claim(store, b)
    assert await positions(store, d) == [0]
    assert await oldest(store) == d.id
    assert await store.waiting_count() == 1


async def test_claim_takes_a_lease_once_and_counts_attempts(store: RequestStore) -> None:
    a = await add(store)
    started = await claim(store, a)
    assert started.state == State.IN_PROGRESS and started.owner == store.owner
    assert started.attempts == 1 and started.started_at is not None and started.lease_token
    assert await store.claim(a.id) is None, "an IN_PROGRESS request cannot be claimed again"
    assert (await get(store, a.id)).attempts == 1
    assert await store.claim("no-such-id") is None


async def test_a_cancelled_request_cannot_be_claimed(store: RequestStore) -> None:
    a = await add(store)
    assert await store.cancel(a.id)
    assert await store.claim(a.id) is None
    record = await get(store, a.id)
    assert record.state == State.CANCELLED and record.attempts == 0
    assert await oldest(store) is None


async def test_client_request_id_dedupes(store: RequestStore) -> None:
    first, created = await store.add(inp("first"), seed=1, model_key="k", client_request_id="retry-1")
    assert created
    again, created_again = await store.add(inp("second"), seed=2, model_key="other", client_request_id="retry-1")
    assert not created_again
    assert again == first
    assert await store.waiting_count() == 1
    other, created_other = await store.add(inp(), seed=1, model_key="k", client_request_id="retry-2")
    none_1, c1 = await store.add(inp(), seed=1, model_key="k")
    none_2, c2 = await store.add(inp(), seed=1, model_key="k", client_request_id="")
    assert created_other and c1 and c2
    assert len({first.id, other.id, none_1.id, none_2.id}) == 4
    assert await store.waiting_count() == 4


async def test_client_request_id_dedupes_after_the_request_finished(store: RequestStore) -> None:
    first = await add(store, client_request_id="once")
    await store.cancel(first.id)
    again, created = await store.add(inp(), seed=1, model_key="k", client_request_id="once")
    assert not created and again.id == first.id and again.state == State.CANCELLED


async def test_requeue_keeps_the_original_fifo_place(store: RequestStore) -> None:
    a, b, c = await add(store, "a"), await add(store, "b"), await add(store, "c")
    run = await claim(store, a)
    await store.set_progress(a.id, run.lease_token, 4, 10)
    assert await oldest(store) == b.id
    assert await store.requeue(a.id, run.lease_token)
    again = await get(store, a.id)
    assert again.state == State.IN_QUEUE and again.lease_token == ""
    assert (again.step, again.total_steps, again.attempts) == (0, 0, 1)
    assert await positions(store, a, b, c) == [0, 1, 2]
    restarted = await claim(store, a)
    assert restarted.attempts == 2 and restarted.started_at == again.started_at
    assert restarted.lease_token != run.lease_token


async def test_requeue_can_give_the_attempt_back(store: RequestStore) -> None:
    """A call that never reached a worker is not an attempt."""
    a = await add(store)
    run = await claim(store, a)
    assert await store.requeue(a.id, run.lease_token, refund_attempt=True)
    assert (await get(store, a.id)).attempts == 0


async def test_writes_of_a_stale_run_change_nothing(store: RequestStore) -> None:
    """A late result from a run that lost its lease never overwrites the new run's."""
    a = await add(store)
    old = await claim(store, a)
    assert await store.requeue(a.id, old.lease_token)
    new = await claim(store, a)
    await store.set_progress(a.id, old.lease_token, 9, 9)
    assert not await store.complete(a.id, old.lease_token, types_pb2.GenerateOutput(seed=666), 1.0)
    assert not await store.fail(a.id, types_pb2.RequestError(type="INTERNAL", message="late"), old.lease_token)
    assert not await store.requeue(a.id, old.lease_token)
    assert await store.renew({a.id: old.lease_token}) == set()
    current = await get(store, a.id)
    assert current.state == State.IN_PROGRESS and (current.step, current.total_steps) == (0, 0)
    assert await store.renew({a.id: new.lease_token}) == {a.id}
    assert await store.complete(a.id, new.lease_token, output(), 2.0)
    assert (await get(store, a.id)).output == output()


async def test_requeue_ignores_requests_that_are_not_running(store: RequestStore) -> None:
    waiting, done = await add(store), await add(store)
    await store.cancel(done.id)
    assert not await store.requeue(waiting.id, "any")
    assert not await store.requeue(done.id, "any")
    assert (await get(store, waiting.id)).state == State.IN_QUEUE
    assert (await get(store, done.id)).state == State.CANCELLED


async def test_progress_only_while_running(store: RequestStore) -> None:
    a = await add(store)
    await store.set_progress(a.id, "", 1, 5)
    assert ((await get(store, a.id)).step, (await get(store, a.id)).total_steps) == (0, 0)
    run = await claim(store, a)
    await store.set_progress(a.id, run.lease_token, 2, 5)
    assert ((await get(store, a.id)).step, (await get(store, a.id)).total_steps) == (2, 5)


async def test_reopened_store_takes_back_requests_of_a_dead_owner(open_store: Opener) -> None:
    first = await open_store()
    first.lease_seconds = 0.0  # its leases run out at once, as if its gateway had been SIGKILLed
    a, b, c = await add(first, "a"), await add(first, "b"), await add(first, "c")
    run = await claim(first, a)
    await first.set_progress(a.id, run.lease_token, 3, 10)
    done = await claim(first, c)
    await first.complete(c.id, done.lease_token, output(), 1.5)
    await first.close()

    second = await open_store()
    try:
        taken = await second.recover(max_attempts=10)
        assert taken.requeued == [a.id] and taken.failed == []
        assert not await second.recover(max_attempts=10)
        recovered = await get(second, a.id)
        assert recovered.state == State.IN_QUEUE
        assert (recovered.step, recovered.total_steps, recovered.attempts) == (0, 0, 1)
        assert recovered.input == inp("a")
        assert (await get(second, b.id)).state == State.IN_QUEUE
        assert (await get(second, c.id)).output == output()
        assert await positions(second, a, b) == [0, 1]
        d = await add(second, "d")
        assert await second.queue_position(d) == 2 and d.seq > c.seq
    finally:
        await second.close()


async def test_restart_recovery_respects_max_attempts(open_store: Opener) -> None:
    """A request that kills its gateway every time fails with WORKER_FAILED instead of running forever."""
    store = await open_store()
    store.lease_seconds = 0.0
    a = await add(store)
    for _ in range(3):
        await claim(store, a)
        taken = await store.take_back(max_attempts=3)
        if taken.failed:
            break
        assert taken.requeued == [a.id]
    assert taken.failed == [a.id]
    failed = await get(store, a.id)
    assert failed.state == State.COMPLETED and failed.error is not None
    assert failed.error.type == "WORKER_FAILED" and "3 time(s)" in failed.error.message
    await store.close()


async def test_take_back_leaves_live_leases_alone(store: RequestStore) -> None:
    a = await add(store)
    run = await claim(store, a)
    assert not await store.take_back(max_attempts=10)
    assert await store.renew({a.id: run.lease_token}) == {a.id}
    assert (await get(store, a.id)).state == State.IN_PROGRESS


async def test_start_timeout_fails_a_request_that_waited_too_long(store: RequestStore) -> None:
    late, _ = await store.add(inp(), seed=1, model_key="k", start_timeout_seconds=1e-6)
    patient, _ = await store.add(inp(), seed=1, model_key="k", start_timeout_seconds=3600)
    none = await add(store)
    assert late.start_deadline is not None and late.start_deadline > late.created_at
    assert await store.expire_start_deadlines() == [late.id]
    expired = await get(store, late.id)
    assert expired.state == State.COMPLETED and expired.error is not None and expired.error.type == "START_TIMEOUT"
    assert await positions(store, patient, none) == [0, 1]
    assert await store.expire_start_deadlines() == []


async def test_complete_only_a_running_request(store: RequestStore) -> None:
    a = await add(store)
    assert not await store.complete(a.id, "", output(), 1.0), "a waiting request has not run"
    run = await claim(store, a)
    assert await store.complete(a.id, run.lease_token, output(), 2.5)
    done = await get(store, a.id)
    assert done.state == State.COMPLETED and done.finished
    assert done.output == output() and done.inference_seconds == 2.5
    assert done.error is None and done.finished_at is not None
    assert not await store.cancel(a.id)
    assert not await store.fail(a.id, types_pb2.RequestError(type="INTERNAL", message="late"))
    assert not await store.complete(a.id, run.lease_token, types_pb2.GenerateOutput(seed=1), 9.0)
    assert await store.claim(a.id) is None
    assert await get(store, a.id) == done


@pytest.mark.parametrize("started", [False, True], ids=["waiting", "running"])
async def test_fail_ends_an_unfinished_request(store: RequestStore, started: bool) -> None:
    a = await add(store)
    if started:
        await claim(store, a)
    error = types_pb2.RequestError(type="INVALID_INPUT", message="input.mask_url: wrong size", field="input.mask_url")
    assert await store.fail(a.id, error)
    failed = await get(store, a.id)
    assert failed.state == State.COMPLETED and failed.finished
    assert failed.error == error and failed.output is None
    assert not await store.cancel(a.id)
    assert not await store.fail(a.id, types_pb2.RequestError(type="INTERNAL", message="again"))
    assert (await get(store, a.id)).error == error
    assert await store.waiting_count() == 0


@pytest.mark.parametrize("started", [False, True], ids=["waiting", "running"])
async def test_cancel_ends_an_unfinished_request(store: RequestStore, started: bool) -> None:
    a = await add(store)
    token = (await claim(store, a)).lease_token if started else ""
    assert await store.cancel(a.id)
    cancelled = await get(store, a.id)
    assert cancelled.state == State.CANCELLED and cancelled.finished
    assert cancelled.error == types_pb2.RequestError(type="CANCELLED", message="cancelled by the caller")
    assert not await store.cancel(a.id)
    assert not await store.complete(a.id, token, output(), 1.0)
    assert await store.renew({a.id: token}) == set(), "the run learns from its lease that it was cancelled"
    assert (await get(store, a.id)).state == State.CANCELLED


async def test_unknown_ids_are_no_ops(store: RequestStore) -> None:
    assert not await store.cancel("nope")
    assert not await store.complete("nope", "t", output(), 1.0)
    assert not await store.fail("nope", types_pb2.RequestError(type="INTERNAL"))


async def test_logs_ordered_per_request_and_after_seq(store: RequestStore) -> None:
    a, b = await add(store, "a"), await add(store, "b")
    for i in range(3):
        await store.add_log(a.id, types_pb2.LogEntry(message=f"a{i}", level=20, source="worker", timestamp=100.0 + i))
        await store.add_log(b.id, types_pb2.LogEntry(message=f"b{i}", level=30, source="gateway", timestamp=200.0 + i))
    logs = await store.logs(a.id)
    assert [row.entry.message for row in logs] == ["a0", "a1", "a2"]
    assert [row.entry.timestamp for row in logs] == [100.0, 101.0, 102.0]
    assert {(row.entry.level, row.entry.source) for row in logs} == {(20, "worker")}
    seqs = [row.seq for row in logs]
    assert seqs == sorted(seqs) and len(set(seqs)) == 3
    assert [row.entry.message for row in await store.logs(a.id, after_seq=seqs[0])] == ["a1", "a2"]
    assert await store.logs(a.id, after_seq=seqs[-1]) == []
    assert [row.entry.message for row in await store.logs(b.id)] == ["b0", "b1", "b2"]
    assert await store.logs("nope") == []


async def test_positions_agree_with_the_table_through_random_transitions(open_store: Opener) -> None:
    """Positions must match FIFO order over the requests still waiting, whatever happened to the others.

    A model of each request's state (waiting, running under a token, or ended) predicts whether each
    transition succeeds; the store must agree, and its positions must match the model's queue."""
    rng = random.Random(5)
    store = await open_store()
    records: list[RequestRecord] = []
    tokens: dict[str, str] = {}  # the lease of each running request
    waiting: dict[str, int] = {}
    ended: set[str] = set()
    error = types_pb2.RequestError(type="WORKER_FAILED", message="x")
    outcomes: Counter[tuple[str, bool]] = Counter()

    async def step(name: str, record: RequestRecord | None) -> None:
        if name == "add" or record is None:
            new = await add(store)
            records.append(new)
            waiting[new.id] = new.seq
            return
        running, alive = record.id in tokens, record.id not in ended
        if name == "claim":
            run = await store.claim(record.id)
            succeeded, expected = run is not None, record.id in waiting
            if run is not None:
                tokens[record.id] = run.lease_token
                waiting.pop(record.id)
        elif name == "requeue":
            # Half the time with the run's own token, else with a token that never held it.
            token = tokens.get(record.id, "") if rng.random() < 0.5 else "not-a-lease"
            succeeded = await store.requeue(record.id, token)
            expected = running and token == tokens[record.id]
            if expected:
                waiting[record.id] = record.seq
                tokens.pop(record.id)
        elif name in ("cancel", "fail"):
            succeeded = await (store.cancel(record.id) if name == "cancel" else store.fail(record.id, error))
            expected = alive
            if expected:
                waiting.pop(record.id, None)
                tokens.pop(record.id, None)
                ended.add(record.id)
        else:
            succeeded = await store.complete(record.id, tokens.get(record.id, ""), types_pb2.GenerateOutput(), 1.0)
            expected = running
            if expected:
                tokens.pop(record.id)
                ended.add(record.id)
        assert succeeded == expected, (name, record.id, succeeded)
        outcomes[name, succeeded] += 1

    async def check(current: RequestStore) -> None:
        seqs = sorted(waiting.values())
        assert await current.waiting_count() == len(seqs)
        for record in records:
            if record.id in waiting:
                assert await current.queue_position(record) == sum(1 for seq in seqs if seq < record.seq)

    names = ["add", "claim", "requeue", "cancel", "fail", "complete"]
    for index in range(300):
        name = rng.choice(names)
        await step(name, rng.choice(records) if records else None)
        if index % 50 == 49:
            await check(store)
    # Each transition was seen both succeeding and refused.
    assert {name for name, succeeded in outcomes if succeeded} == set(names) - {"add"}
    assert {name for name, succeeded in outcomes if not succeeded} == set(names) - {"add"}
    await store.close()
    reopened = await open_store()
    await check(reopened)
    await reopened.close()


async def test_a_capped_tenant_never_has_more_waiting_than_its_cap(open_store: Opener) -> None:
    """30 Submits at once against a cap of 5, through two stores (two gateways) on PostgreSQL: exactly 5
    are queued; a retried client_request_id still gets its request; another tenant is not held back."""
    first = await open_store()
    stores = [first, await open_store()] if isinstance(first, PostgresStore) else [first]
    try:

        async def submit(index: int, tenant: str = "a", client_request_id: str = "") -> RequestRecord | None:
            try:
                record, _ = await stores[index % len(stores)].add(
                    inp(f"p{index}"),
                    seed=index,
                    model_key="key",
                    tenant=tenant,
                    client_request_id=client_request_id,
                    max_waiting=5,
                )
            except TenantFull as full:
                assert full.waiting >= 5
                return None
            return record

        kept = await submit(100, client_request_id="retry-me")
        accepted = [r for r in await asyncio.gather(*(submit(i) for i in range(30))) if r is not None]
        assert len(accepted) == 4
        assert (await first.tenant_activity("a"))[0] == 5
        again = await submit(101, client_request_id="retry-me")
        assert kept is not None and again is not None and again.id == kept.id
        assert await submit(0, tenant="b") is not None
        await first.cancel(accepted[0].id)
        assert await submit(200) is not None
        assert await submit(201) is None
    finally:
        for store in stores:
            await store.close()


async def test_the_trace_context_is_kept_with_the_request(store: RequestStore) -> None:
    """Whichever gateway claims it continues the trace its submit began (core/tracing.py)."""
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    record, _ = await store.add(inp(), seed=1, model_key="key", trace_context=traceparent)
    assert (await claim(store, record)).trace_context == traceparent
    assert (await add(store)).trace_context == ""
