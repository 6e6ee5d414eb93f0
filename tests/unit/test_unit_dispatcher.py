"""gateway.dispatcher against a real gRPC WorkerService on loopback that the test controls
(it completes, dies mid-stream, hangs, reports a failed output write, goes down and comes
back), with the real SQLite store and ChangeFeed.

Synchronisation is by waiting on conditions (store state, calls the fake worker saw) with
a deadline, never by sleeping a fixed time; timeouts and backoffs are made tiny through
the same constructor parameters the gateway fills from its settings.
"""

from __future__ import annotations

import asyncio
import gc
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gateway.circuit_breaker import CircuitBreaker
from gateway.dispatcher import MAX_PREFETCHES, Dispatcher
from gateway.feed import ChangeFeed
from gateway.metrics import GatewayMetrics
from gateway.scheduling import HotFirstOrder
from gateway.store import RequestRecord, State
from gateway.store_sqlite import SqliteStore
from gateway.worker_client import WorkerClient
from core.backoff import Backoff
from loraserve.errors import ErrorType
from loraserve.v1 import flux_pb2, types_pb2, worker_pb2
from tests.unit.worker_testkit import SAFETY_S, FakeWorker, Relay, WorkerServer, wait_until

TINY_BACKOFF = Backoff(0.005, 0.05)


class FlakyStore(SqliteStore):
    """The real store, with failures injected into chosen methods (as many times as asked)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.failures: dict[str, int] = {}
        # Runs inside `claim`, after the claim committed: a Cancel landing at that moment.
        self.after_claim: Callable[[RequestRecord], Awaitable[None]] | None = None

    def _maybe_fail(self, method: str) -> None:
        if self.failures.get(method, 0) > 0:
            self.failures[method] -= 1
            raise sqlite3.OperationalError(f"injected failure in {method}")

    async def waiting(self, limit: int) -> list[RequestRecord]:
        self._maybe_fail("waiting")
        return await super().waiting(limit)

    async def complete(
        self, request_id: str, token: str, output: types_pb2.GenerateOutput, inference_seconds: float
    ) -> bool:
        self._maybe_fail("complete")
        return await super().complete(request_id, token, output, inference_seconds)

    async def claim(self, request_id: str) -> RequestRecord | None:
        record = await super().claim(request_id)
        if record is not None and self.after_claim is not None:
            await self.after_claim(record)
        return record


@dataclass
class Harness:
    store: FlakyStore
    dispatcher: Dispatcher
    worker: WorkerClient
    metrics: GatewayMetrics
    health: list[bool] = field(default_factory=list)

    async def submit(self, count: int = 1, prompt: str = "a red house") -> list[str]:
        ids = []
        for i in range(count):
            record, _ = await self.store.add(
                types_pb2.GenerateInput(model_name="org/model", prompt=f"{prompt} {i}"), seed=i, model_key="key"
            )
            ids.append(record.id)
        self.dispatcher.wake()
        return ids

    async def get(self, request_id: str) -> RequestRecord:
        record = await self.store.get(request_id)
        assert record is not None
        return record

    async def wait_finished(self, *request_ids: str) -> list[RequestRecord]:
        async def all_finished() -> bool:
            return all([(await self.get(r)).finished for r in request_ids])

        await wait_until(all_finished, f"{len(request_ids)} request(s) finished")
        return [await self.get(r) for r in request_ids]

    async def log_text(self, request_id: str) -> str:
        return "\n".join(entry.entry.message for entry in await self.store.logs(request_id))

    def metric(self, name: str) -> float:
        value = self.metrics.registry.get_sample_value(name)
        return 0.0 if value is None else value


@pytest.fixture
def fake() -> FakeWorker:
    return FakeWorker()


@pytest.fixture
async def server(fake: FakeWorker) -> AsyncIterator[WorkerServer]:
    running = WorkerServer(fake)
    yield running
    await running.stop()


@pytest.fixture
async def make(tmp_path: Path, server: WorkerServer) -> AsyncIterator[Callable[..., Awaitable[Harness]]]:
    made: list[Harness] = []

    async def build(
        *,
        capacity: int = 2,
        max_attempts: int = 3,
        call_timeout_seconds: float = 30.0,
        threshold: int = 2,
        port: int = 0,
        keepalive_seconds: float = 0.0,
    ) -> Harness:
        store = FlakyStore(tmp_path / "data" / "requests.sqlite3")
        metrics = GatewayMetrics(queue_depth=lambda: 0, in_flight=lambda: 0)
        worker = WorkerClient(
            f"127.0.0.1:{port or server.port}",
            "app",
            call_timeout_seconds=call_timeout_seconds,
            keepalive_seconds=keepalive_seconds,
            keepalive_timeout_seconds=0.5,
            reconnect_backoff_max_seconds=0.05,
        )
        health: list[bool] = []

        async def on_serving(serving: bool) -> None:
            health.append(serving)

        dispatcher = Dispatcher(
            store,
            ChangeFeed(),
            worker,
            metrics,
            capacity=capacity,
            max_attempts=max_attempts,
            order=HotFirstOrder(max_skips=0, hot_slots=1),
            retry_backoff=TINY_BACKOFF,
            breaker=CircuitBreaker(threshold=threshold, backoff=TINY_BACKOFF),
            on_serving=on_serving,
        )
        harness = Harness(store, dispatcher, worker, metrics, health)
        made.append(harness)
        dispatcher.start()
        return harness

    yield build
    for harness in made:
        await harness.dispatcher.shutdown(0)
        await harness.worker.close()
        await harness.store.close()


Make = Callable[..., Awaitable[Harness]]


async def test_requests_run_and_complete(make: Make, server: WorkerServer, fake: FakeWorker) -> None:
    await server.start()
    h = await make()
    ids = await h.submit(3)
    for record in await h.wait_finished(*ids):
        assert record.state == State.COMPLETED and record.error is None
        assert record.output is not None and record.output.seed == record.seed + 1000
        assert record.attempts == 1
    assert sorted(fake.calls) == sorted(ids)
    assert "working" in await h.log_text(ids[0])
    assert h.health == [], "nothing went wrong: health never changed"


async def test_an_outage_fails_nothing_and_uses_no_attempts(make: Make, server: WorkerServer, fake: FakeWorker) -> None:
    """Serve's ingress is down when the requests come: dispatching pauses (health NOT_SERVING), the
    requests wait in their places with their attempts untouched, and all run once it is back."""
    h = await make(capacity=1, threshold=2)
    ids = await h.submit(5)
    await wait_until(lambda: h.health == [False], "the breaker opened")
    assert h.dispatcher.serving is False
    assert h.metric("loraserve_dispatch_paused") == 1
    assert h.metric("loraserve_worker_calls_unreached_total") == 2
    await wait_until(lambda: h.dispatcher.in_flight == 0, "the failed calls ended")
    for request_id in ids:
        record = await h.get(request_id)
        assert record.state == State.IN_QUEUE and record.attempts == 0
    assert "not counted as an attempt" in await h.log_text(ids[0])

    await server.start()
    records = await h.wait_finished(*ids)
    assert [r.state for r in records] == [State.COMPLETED] * 5
    assert [r.error for r in records] == [None] * 5
    assert [r.attempts for r in records] == [1] * 5
    assert fake.calls == ids, "the queue kept its order through the outage"
    assert h.health == [False, True]
    assert h.metric("loraserve_dispatch_paused") == 0
    assert h.metric("loraserve_worker_retries_total") == 0


async def test_an_outage_in_the_middle_of_work(make: Make, server: WorkerServer, fake: FakeWorker) -> None:
    """The ingress goes away while a call runs: that call was an attempt (it reached a worker) and runs
    again; the requests behind it are not charged for the calls that found nobody."""
    await server.start()
    h = await make(capacity=1, max_attempts=2)
    first, *rest = await h.submit(4)
    fake.plans[first] = ["hold"]
    await wait_until(lambda: first in fake.holding, "the first request is running")
    await server.stop()
    await wait_until(lambda: h.health == [False], "the breaker opened")
    await server.start()
    records = await h.wait_finished(first, *rest)
    assert [r.state for r in records] == [State.COMPLETED] * 4 and [r.error for r in records] == [None] * 4
    assert records[0].attempts == 2
    assert [r.attempts for r in records[1:]] == [1] * 3


async def test_a_replica_dying_mid_request_is_retried(make: Make, server: WorkerServer, fake: FakeWorker) -> None:
    await server.start()
    h = await make(max_attempts=3)
    (request_id,) = await h.submit()
    fake.plans[request_id] = ["die", "die"]
    (record,) = await h.wait_finished(request_id)
    assert record.state == State.COMPLETED and record.error is None and record.output is not None
    assert record.attempts == 3
    logs = await h.log_text(request_id)
    assert "attempt 1 of 3 failed (INTERNAL: the replica died); retrying" in logs
    assert "attempt 2 of 3 failed" in logs
    assert h.metric("loraserve_worker_retries_total") == 2
    assert h.metric("loraserve_worker_calls_unreached_total") == 0


async def test_attempts_run_out_with_a_clear_error(make: Make, server: WorkerServer, fake: FakeWorker) -> None:
    await server.start()
    h = await make(max_attempts=2)
    (request_id,) = await h.submit()
    fake.plans[request_id] = ["die", "die", "complete"]
    (record,) = await h.wait_finished(request_id)
    assert record.state == State.COMPLETED and record.error is not None
    assert record.error.type == ErrorType.WORKER_FAILED
    assert record.error.message == "worker failed after 2 attempts: INTERNAL: the replica died"
    assert fake.calls == [request_id] * 2


async def test_a_hung_worker_hits_the_deadline(make: Make, server: WorkerServer, fake: FakeWorker) -> None:
    """A replica that never answers frees the request and its slot at the call's deadline."""
    await server.start()
    fake.default = "hang"
    h = await make(capacity=1, max_attempts=2, call_timeout_seconds=0.3)
    (request_id,) = await h.submit()
    (record,) = await h.wait_finished(request_id)
    assert record.error is not None and record.error.type == ErrorType.WORKER_FAILED
    assert "no result within worker_call_timeout_seconds (0.3 s)" in record.error.message
    assert record.attempts == 2
    await wait_until(lambda: h.dispatcher.in_flight == 0, "the slot is free")
    await wait_until(lambda: fake.cancelled == [request_id] * 2, "the worker saw both calls end")

    fake.default = "complete"
    (after,) = await h.submit()
    (record,) = await h.wait_finished(after)
    assert record.error is None, "the freed slot runs the next request"


async def test_a_failed_output_write_is_retried(make: Make, server: WorkerServer, fake: FakeWorker) -> None:
    """The worker reports outputs it could not store as WORKER_FAILED: another attempt, not the end."""
    await server.start()
    h = await make(max_attempts=3)
    (request_id,) = await h.submit()
    fake.plans[request_id] = ["store_failed"]
    (record,) = await h.wait_finished(request_id)
    assert record.error is None and record.output is not None and record.attempts == 2
    assert "attempt 1 of 3 failed (WORKER_FAILED: could not store the outputs)" in await h.log_text(request_id)


async def test_a_failed_output_write_on_every_attempt_fails_the_request(
    make: Make, server: WorkerServer, fake: FakeWorker
) -> None:
    await server.start()
    fake.default = "store_failed"
    h = await make(max_attempts=2)
    (request_id,) = await h.submit()
    (record,) = await h.wait_finished(request_id)
    assert record.error is not None and record.error.type == ErrorType.WORKER_FAILED
    assert record.error.message == "worker failed after 2 attempts: WORKER_FAILED: could not store the outputs"


async def test_a_request_error_is_not_retried(make: Make, server: WorkerServer, fake: FakeWorker) -> None:
    await server.start()
    h = await make(max_attempts=3)
    (request_id,) = await h.submit()
    fake.plans[request_id] = ["bad_adapter"]
    (record,) = await h.wait_finished(request_id)
    assert record.error is not None and record.error.type == ErrorType.ADAPTER_LOAD_FAILED
    assert record.attempts == 1 and fake.calls == [request_id]


async def test_cancel_between_claim_and_call_makes_no_call(make: Make, server: WorkerServer, fake: FakeWorker) -> None:
    """The Cancel lands after the dispatcher claimed the request, before any worker call exists, by a
    caller that still saw it waiting (so it reports `left_queue`): the worker never gets it."""
    await server.start()
    h = await make(capacity=1)
    cancelled: list[str] = []

    async def cancel_now(record: RequestRecord) -> None:
        if not cancelled:
            cancelled.append(record.id)
            assert await h.store.cancel(record.id)
            h.dispatcher.left_queue(record.id)

    h.store.after_claim = cancel_now
    first, second = await h.submit(2)
    (record,) = await h.wait_finished(second)
    assert record.error is None
    assert cancelled == [first]
    assert (await h.get(first)).state == State.CANCELLED
    assert fake.calls == [second], "the cancelled request never reached the worker"


async def test_cancel_stops_a_running_call(make: Make, server: WorkerServer, fake: FakeWorker) -> None:
    await server.start()
    fake.default = "hold"
    h = await make(max_attempts=3)
    (request_id,) = await h.submit()
    await wait_until(lambda: request_id in fake.holding, "the call is running")
    assert await h.store.cancel(request_id)
    h.dispatcher.cancel_running(request_id)
    await wait_until(lambda: fake.cancelled == [request_id], "the worker saw the call cancelled")
    await wait_until(lambda: h.dispatcher.in_flight == 0, "the slot is free")
    record = await h.get(request_id)
    assert record.state == State.CANCELLED and fake.calls == [request_id], "not run again"


async def test_the_loop_outlives_store_errors(make: Make, server: WorkerServer) -> None:
    """A store error in the dispatch loop is logged and counted; health says NOT_SERVING until the loop,
    restarted with backoff, works again; nothing waiting is lost."""
    await server.start()
    h = await make()
    h.store.failures["waiting"] = 3
    ids = await h.submit(2)
    records = await h.wait_finished(*ids)
    assert [r.error for r in records] == [None, None]
    assert h.metric("loraserve_dispatcher_errors_total") == 3
    assert h.health == [False, True]


async def test_a_store_error_mid_run_gives_the_request_back(make: Make, server: WorkerServer, fake: FakeWorker) -> None:
    await server.start()
    h = await make(max_attempts=3)
    h.store.failures["complete"] = 1
    (request_id,) = await h.submit()
    (record,) = await h.wait_finished(request_id)
    assert record.error is None and record.output is not None
    assert record.attempts == 2 and fake.calls == [request_id] * 2
    assert h.metric("loraserve_dispatcher_errors_total") == 1


async def test_shutdown_gives_back_running_requests_without_charging_them(
    make: Make, server: WorkerServer, fake: FakeWorker
) -> None:
    await server.start()
    fake.default = "hold"
    h = await make()
    (request_id,) = await h.submit()
    await wait_until(lambda: request_id in fake.holding, "the call is running")
    await h.dispatcher.shutdown(0)
    record = await h.get(request_id)
    assert record.state == State.IN_QUEUE and record.attempts == 0
    await wait_until(lambda: fake.cancelled == [request_id], "the worker saw the call cancelled")


async def test_shutdown_during_an_outage_returns(make: Make) -> None:
    """No worker answers: shutdown returns, and the request waits in the queue for the next gateway."""
    h = await make(threshold=1)
    (request_id,) = await h.submit()
    await wait_until(lambda: h.health == [False], "the breaker opened")
    await asyncio.wait_for(h.dispatcher.shutdown(0), SAFETY_S)
    record = await h.get(request_id)
    assert (record.state, record.error, record.output) == (State.IN_QUEUE, None, None)
    assert record.attempts == 0, "a call that never reached a worker was charged"


async def test_a_silent_network_path_is_noticed_by_keepalive(
    make: Make, server: WorkerServer, fake: FakeWorker
) -> None:
    """The connection to a running call stops carrying packets: keepalive pings go unanswered, the call
    fails long before its deadline, and the request (which had reached a worker) runs again."""
    server.options = [("grpc.http2.min_ping_interval_without_data_ms", 50)]
    await server.start()
    relay = Relay(server.port)
    await relay.start()
    try:
        h = await make(port=relay.port, keepalive_seconds=0.2, call_timeout_seconds=600)
        (request_id,) = await h.submit()
        fake.plans[request_id] = ["hold"]
        await wait_until(lambda: request_id in fake.holding, "the call is running")
        relay.go_silent()
        (record,) = await h.wait_finished(request_id)
    finally:
        await relay.close()
    assert record.error is None and record.output is not None and record.attempts == 2
    assert "attempt 1 of 3 failed (UNAVAILABLE" in await h.log_text(request_id)


async def test_waiting_requests_queue_for_a_prefetch_by_id_and_ended_ones_are_skipped(
    make: Make, server: WorkerServer, fake: FakeWorker
) -> None:
    """A prefetch reads the input from the store when its turn comes: requests queued behind the prefetches
    in flight keep no record (and no input) alive, and one cancelled meanwhile is never prefetched."""
    await server.start()
    h = await make(capacity=1)
    fake.default = "hold"
    (running,) = await h.submit(prompt="running")
    await wait_until(lambda: running in fake.holding, "the call is running")
    fake.prefetch_gate = asyncio.Event()
    lora = types_pb2.LoraWeight(path="data:application/octet-stream;base64," + "A" * 100_000)
    ids = []
    for i in range(20):
        record, _ = await h.store.add(
            types_pb2.GenerateInput(model_name="org/model", prompt=f"waits {i}", loras=[lora]), seed=i, model_key="key"
        )
        h.dispatcher.prefetch(record)
        ids.append(record.id)
    del record
    await wait_until(lambda: fake.prefetching == MAX_PREFETCHES, "the prefetch slots are taken")
    gc.collect()
    alive = [o for o in gc.get_objects() if isinstance(o, RequestRecord) and o.id in ids]
    assert len(alive) <= MAX_PREFETCHES, f"{len(alive)} waiting requests' records held for a prefetch"
    del alive
    for request_id in ids[MAX_PREFETCHES : MAX_PREFETCHES + 10]:
        assert await h.store.cancel(request_id)
    fake.prefetch_gate.set()
    expected = ids[:MAX_PREFETCHES] + ids[MAX_PREFETCHES + 10 :]
    await wait_until(lambda: len(fake.prefetched) >= len(expected), "the queued prefetches ran")
    assert sorted(fake.prefetched) == sorted(expected), "cancelled requests were prefetched"
    for request_id in [running, *expected]:
        await h.store.cancel(request_id)
    h.dispatcher.cancel_running(running)


async def test_prefetch_only_for_a_request_that_will_wait(make: Make, server: WorkerServer, fake: FakeWorker) -> None:
    """Not once the running request's result is stored and only its call is closing."""
    await server.start()
    h = await make(capacity=1)

    async def with_lora(prompt: str) -> RequestRecord:
        lora = types_pb2.LoraWeight(path="a.safetensors")
        record, _ = await h.store.add(
            types_pb2.GenerateInput(model_name="org/model", prompt=prompt, loras=[lora]), seed=0, model_key="key"
        )
        return record

    fake.default = "hold"
    (running,) = await h.submit(prompt="running")
    await wait_until(lambda: running in fake.holding, "the call is running")
    waiting = await with_lora("waits behind it")
    h.dispatcher.prefetch(waiting)
    await wait_until(lambda: fake.prefetched == [waiting.id], "the waiting request was prefetched")
    assert await h.store.cancel(waiting.id) and await h.store.cancel(running)
    h.dispatcher.cancel_running(running)
    await wait_until(lambda: h.dispatcher.in_flight == 0, "the slot is free")

    fake.default = "complete_then_hold"
    (closing,) = await h.submit(prompt="closing")
    await wait_until(lambda: closing in fake.holding, "the result is out and the call still open")
    await h.wait_finished(closing)
    following = await with_lora("the caller's next request")
    h.dispatcher.prefetch(following)
    assert not [task for task in asyncio.all_tasks() if task.get_name() == f"prefetch-{following.id}"]
    assert fake.prefetched == [waiting.id]


async def test_a_flux_request_reaches_the_worker_as_flux_input_and_its_loras_are_prefetched(
    make: Make, server: WorkerServer, fake: FakeWorker
) -> None:
    await server.start()
    h = await make(capacity=1)
    fake.default = "hold"
    (running,) = await h.submit(prompt="running")
    await wait_until(lambda: running in fake.holding, "the call is running")
    flux_input = flux_pb2.FluxInput(prompt="a cat", loras=[types_pb2.LoraWeight(path="f.safetensors")])
    waiting, _ = await h.store.add(worker_pb2.QueuedFluxInput(input=flux_input), seed=0, model_key="flux")
    h.dispatcher.prefetch(waiting)
    await wait_until(lambda: fake.prefetched == [waiting.id], "the waiting FLUX request was prefetched")
    lines = [record.entry.message for record in await h.store.logs(waiting.id)]
    assert "prefetched 1 adapter(s) while waiting" in lines, lines
    fake.default = "complete"
    assert await h.store.cancel(running)
    h.dispatcher.cancel_running(running)
    await h.wait_finished(waiting.id)
    assert fake.flux_prompts == ["a cat"]
