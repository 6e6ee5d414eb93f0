"""Hands waiting requests to the workers, oldest first, when a worker has room.

The dispatcher owns every call to the workers: callers' streams only read the store, so
a caller hanging up never cancels work; only `cancel` does. Nothing it takes on is lost:

- A worker attempt that fails (the replica died, hung past the call's deadline, or could
  not store the outputs) goes back to the queue in its old place and runs again after a
  jittered backoff, up to `max_attempts`; then the request fails with WORKER_FAILED.
- A call that never reached a worker (Serve's ingress down or without the application)
  is no attempt. After `worker_unreachable_threshold` of them in a row the circuit breaker
  opens: dispatching pauses, health says NOT_SERVING, the workers are probed with backoff,
  and dispatching resumes once they answer. The queue keeps its order meanwhile.
- The dispatch loop is supervised: an error (the store failing) is logged and counted,
  health says NOT_SERVING, and the loop starts again after a backoff.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import grpc

from core import tracing
from core.backoff import Backoff
from gateway.circuit_breaker import CircuitBreaker
from gateway.feed import ChangeFeed
from gateway.metrics import GatewayMetrics
from gateway.scheduling import HotFirstOrder
from gateway.store import RequestRecord, RequestStore, State
from gateway.worker_client import GenerateCall, WorkerClient
from loraserve.errors import ErrorType
from core.logs import RequestLines
from loraserve.v1 import types_pb2, worker_pb2

log = logging.getLogger(__name__)

# Prefetch calls in flight at once: they only warm caches, so they must never crowd out work.
MAX_PREFETCHES = 2
# Waiting requests queued for a prefetch, by id: a prefetch reads the input from the store when its
# turn comes, so a long queue costs no inputs in memory. Beyond this, a waiting request gets none.
MAX_QUEUED_PREFETCHES = 1000
# Waiting requests looked at past the head when some tenants may be at their running quota.
QUOTA_LOOKAHEAD = 50
PREFETCH_TIMEOUT_SECONDS = 600.0

# How a call ends when no worker got it: nothing connected, or Serve's proxy had no live
# deployment (UNAVAILABLE) or no such application yet (NOT_FOUND, e.g. while a RayService
# comes up). Once an event has arrived, any end is a worker attempt; a replica that dies
# is INTERNAL from Serve's proxy, so a request that kills replicas still uses up attempts.
NOT_REACHED_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND})

# Failure events that are the worker's fault, not the request's (the worker reports outputs
# it could not store as WORKER_FAILED): another attempt may succeed.
RETRIED_FAILURES = frozenset({ErrorType.WORKER_FAILED})


class Dispatcher:
    def __init__(
        self,
        store: RequestStore,
        feed: ChangeFeed,
        worker: WorkerClient,
        metrics: GatewayMetrics,
        *,
        capacity: int,
        max_attempts: int,
        order: HotFirstOrder,
        retry_backoff: Backoff,
        breaker: CircuitBreaker,
        on_serving: Callable[[bool], Awaitable[None]] | None = None,
        may_run: Callable[[RequestRecord], Awaitable[bool]] | None = None,
    ) -> None:
        self._store = store
        # A tenant at its running quota waits while others' requests start (gateway/quotas.py).
        self._may_run = may_run
        self._feed = feed
        self._worker = worker
        self._metrics = metrics
        self._capacity = capacity
        self._max_attempts = max_attempts
        self._order = order
        self._retry_backoff = retry_backoff
        self._breaker = breaker
        self._on_serving = on_serving
        self._wakeup = asyncio.Event()
        self._stopping = asyncio.Event()
        self._running: dict[str, asyncio.Task[None]] = {}
        # Running requests whose result (or final failure) is stored: their call is only closing, so
        # a request submitted now (their caller's next, typically) will not wait for them.
        self._settled: set[str] = set()
        # The lease token of each running request: renewed while its call runs, named by every write.
        self._leases: dict[str, str] = {}
        self._calls: dict[str, GenerateCall] = {}
        self._cancelled: set[str] = set()
        # The request being claimed right now: a Cancel may land while the claim is under way.
        self._claiming: str | None = None
        # Wakes the loop when the first request backing off after a failed call (on any gateway: the
        # store holds each backoff) may start again; they keep their places meanwhile.
        self._retry_wake: asyncio.TimerHandle | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._loop_failing = False
        self._serving = True
        self._prefetch_queue: collections.deque[str] = collections.deque()
        self._prefetches: set[asyncio.Task[None]] = set()
        self._accepting = True
        # Console/log lines per request (start, each quarter of the steps, end).
        self._lines = RequestLines(log)

    @property
    def in_flight(self) -> int:
        return len(self._running)

    @property
    def serving(self) -> bool:
        """False while dispatching is paused: the workers are unreachable, or the loop is failing."""
        return self._serving

    def start(self) -> None:
        self._loop_task = asyncio.get_running_loop().create_task(self._loop(), name="dispatcher")

    def wake(self) -> None:
        self._wakeup.set()

    async def _loop(self) -> None:
        """Dispatches until shutdown; an error restarts it after a backoff instead of ending it."""
        errors_in_a_row = 0
        while self._accepting:
            await self._wakeup.wait()
            self._wakeup.clear()
            try:
                if self._breaker.is_open:
                    await self._wait_for_workers()
                await self._dispatch_waiting()
            except Exception:
                errors_in_a_row += 1
                delay = self._retry_backoff.delay(errors_in_a_row)
                log.exception("dispatching failed; restarting", extra={"retry_in_seconds": round(delay, 2)})
                self._metrics.dispatcher_errors.inc()
                self._loop_failing = True
                await self._update_health()
                await self._unless_stopping(asyncio.sleep(delay))
                self.wake()
            else:
                if self._loop_failing:
                    errors_in_a_row = 0
                    self._loop_failing = False
                    log.info("dispatching works again")
                    await self._update_health()

    async def _wait_for_workers(self) -> None:
        """The breaker is open: no dispatching until a probe reaches the workers."""
        if await self._unless_stopping(self._breaker.recover(self._worker.reachable)):
            log.info("workers reachable again; dispatching resumes")
            await self._update_health()

    async def _dispatch_waiting(self) -> None:
        while self._accepting and len(self._running) < self._capacity and not self._breaker.is_open:
            chosen = await self._next_ready()
            if chosen is None:
                break
            self._claiming = chosen.id
            try:
                record = await self._store.claim(chosen.id)
            finally:
                self._claiming = None
            if record is None:
                self._order.forget(chosen.id)
                self._cancelled.discard(chosen.id)
                continue
            self._order.dispatched(record)
            self._lines.started(record.id, record.attempts)
            if chosen.started_at is None:
                self._metrics.queue_wait.observe(max(0.0, time.time() - record.created_at))
                tracing.record_span(
                    "gateway.queue",
                    parent=tracing.from_traceparent(record.trace_context),
                    start=record.created_at,
                    end=time.time(),
                    attributes={"loraserve.request_id": record.id},
                )
            self._feed.changed(record.id)
            self._feed.queue_moved()
            task = asyncio.get_running_loop().create_task(self._run(record), name=f"request-{record.id}")
            self._running[record.id] = task
            self._leases[record.id] = record.lease_token
            task.add_done_callback(functools.partial(self._finished, record.id))

    async def _next_ready(self) -> RequestRecord | None:
        """The next request to run among those waiting and not backing off after a failed call."""
        # With running quotas, look further: the head may belong to tenants that must wait.
        window = self._order.lookahead + (QUOTA_LOOKAHEAD if self._may_run else 0)
        ready = await self._store.waiting(window)
        if self._may_run is not None:
            ready = [record for record in ready if await self._may_run(record)]
        ready = ready[: self._order.lookahead]
        if not ready:
            await self._wake_after_backoff()
            return None
        return self._order.choose(ready)

    def _finished(self, request_id: str, _task: asyncio.Task[None] | None = None) -> None:
        self._lines.forget(request_id)
        self._running.pop(request_id, None)
        self._settled.discard(request_id)
        self._leases.pop(request_id, None)
        self._calls.pop(request_id, None)
        self._cancelled.discard(request_id)
        self.wake()

    def prefetch(self, record: RequestRecord) -> None:
        """A request that will wait: queued, by id, for a replica to read its adapters into host RAM meanwhile.

        Not for a request that will not wait: the Prefetch call would only compete with the request's
        own run for the replica's CPU (a third of a sequential caller's LoRA requests made one while
        the previous request's call was closing).
        """
        adapters = record.flux_input.loras if record.flux_input is not None else [*record.input.loras, *record.input.embeddings]
        if not adapters or not self._all_busy():
            return
        if len(self._prefetch_queue) >= MAX_QUEUED_PREFETCHES or not self._accepting:
            return
        self._prefetch_queue.append(record.id)
        if len(self._prefetches) < MAX_PREFETCHES:
            task = asyncio.get_running_loop().create_task(self._prefetch_queued(), name="prefetch")
            self._prefetches.add(task)
            task.add_done_callback(self._prefetches.discard)

    def _all_busy(self) -> bool:
        return len(self._running) - len(self._settled) >= self._capacity

    async def _prefetch_queued(self) -> None:
        """Prefetches queued requests one at a time, each as the store has it now: one that ended
        (cancelled, failed) or started meanwhile, or that no longer waits, is skipped."""
        while self._prefetch_queue:
            request_id = self._prefetch_queue.popleft()
            try:
                record = await self._store.get(request_id)
                if record is None or record.state != State.IN_QUEUE or not self._all_busy():
                    continue
                request = worker_pb2.PrefetchRequest(request_id=record.id, tenant=record.tenant)
                flux_input = record.flux_input
                if flux_input is not None:
                    request.flux_input.CopyFrom(flux_input)
                else:
                    request.input.CopyFrom(record.input)
                response = await self._worker.prefetch(request, record.model_key, PREFETCH_TIMEOUT_SECONDS)
                await self._log(
                    request_id,
                    f"prefetched {response.adapters_ready} adapter(s) while waiting",
                    types_pb2.LOG_LEVEL_INFO,
                )
            except grpc.aio.AioRpcError as exc:
                # Only a warm-up: the request itself resolves its adapters again and reports errors.
                log.info("prefetch failed", extra={"request_id": request_id, "error": exc.code().name})
                continue
            except Exception:
                log.exception("prefetch failed", extra={"request_id": request_id})
                self._metrics.dispatcher_errors.inc()
                continue
            self._feed.changed(request_id)

    async def renew_leases(self) -> None:
        """Extends the leases of running requests; a run whose lease is gone (cancelled on another
        gateway, or taken back after this gateway stalled) stops at once."""
        leases = dict(self._leases)
        held = await self._store.renew(leases)
        for request_id in leases.keys() - held:
            if request_id in self._running:
                log.info("lease lost; stopping the worker call", extra={"request_id": request_id})
                self.cancel_running(request_id)

    async def changed_elsewhere(self, request_id: str) -> None:
        """Another gateway changed a request: if it is one running here and it ended there (Cancel), stop it."""
        token = self._leases.get(request_id)
        if token is None:
            return
        current = await self._store.get(request_id)
        if current is None or current.finished or current.lease_token != token:
            self.cancel_running(request_id)

    def left_queue(self, request_id: str) -> None:
        """A waiting request was cancelled: it no longer counts for the fairness bound.

        The dispatcher may have claimed it meanwhile (the caller read it as waiting): that
        run is stopped too.
        """
        self._order.forget(request_id)
        self.cancel_running(request_id)

    def cancel_running(self, request_id: str) -> None:
        """Cancels the worker call; the replica stops at its next denoising step.

        Lands whatever the moment: a run cancelled while it is claimed, or before its
        call exists, never makes the call.
        """
        if request_id not in self._running and request_id != self._claiming:
            return
        self._cancelled.add(request_id)
        call = self._calls.get(request_id)
        if call is not None:
            call.cancel()

    async def _run(self, record: RequestRecord) -> None:
        """One run of a claimed request; whatever goes wrong, the request does not stay IN_PROGRESS."""
        try:
            with tracing.span(
                "gateway.dispatch",
                parent=tracing.from_traceparent(record.trace_context),
                attributes={"loraserve.request_id": record.id, "loraserve.attempt": record.attempts},
            ):
                await self._call_worker(record)
        except Exception:
            log.exception("dispatcher error while running a request", extra={"request_id": record.id})
            self._metrics.dispatcher_errors.inc()
            await self._give_back(record)
        finally:
            # It ended, or went back to the queue (which moves the positions behind it).
            self._feed.changed(record.id)
            self._feed.queue_moved()

    async def _call_worker(self, record: RequestRecord) -> None:
        if record.id in self._cancelled:
            return
        request = worker_pb2.GenerateRequest(request_id=record.id, seed=record.seed, tenant=record.tenant)
        flux_input = record.flux_input
        if flux_input is not None:
            request.flux_input.CopyFrom(flux_input)
        else:
            request.input.CopyFrom(record.input)
        call = self._worker.generate(request, record.model_key)
        self._calls[record.id] = call
        reached = False
        try:
            async for event in call:
                if not reached:
                    reached = True
                    self._breaker.record_reached()
                failure = await self._apply(record, event)
                if failure is not None:
                    call.cancel()
                    await self._attempt_failed(record, f"{failure.type}: {failure.message}")
                    return
        except asyncio.CancelledError:
            if record.id in self._cancelled:
                return
            raise
        except grpc.aio.AioRpcError as exc:
            if record.id in self._cancelled:
                return
            await self._worker_broke(record, exc, reached=reached)
        else:
            current = await self._store.get(record.id)
            if current is not None and not current.finished:
                await self._attempt_failed(record, "the worker ended the call without a result")
        finally:
            if not call.done():
                call.cancel()

    async def _apply(
        self, record: RequestRecord, event: worker_pb2.GenerateResponse
    ) -> types_pb2.RequestError | None:
        """Records one event of the worker; returns a failure that another attempt may cure."""
        which = event.WhichOneof("event")
        if which == "log":
            await self._store.add_log(record.id, event.log)
        elif which == "progress":
            # With its preview, if any: streams on every gateway read it from the store (gateway/previews.py).
            progress = event.progress
            await self._store.set_progress(
                record.id, record.lease_token, progress.step, progress.total, progress.preview_jpeg
            )
            self._lines.progress(record.id, progress.step, progress.total)
        elif which == "result":
            if await self._store.complete(
                record.id, record.lease_token, event.result.output, event.result.inference_seconds
            ):
                self._settled.add(record.id)
                self._metrics.inference.observe(event.result.inference_seconds)
                self._metrics.outcome(record.tenant, "completed")
                self._lines.completed(record.id, event.result.inference_seconds)
        elif which == "failure":
            if event.failure.type in RETRIED_FAILURES:
                return event.failure
            if await self._store.fail(record.id, event.failure, record.lease_token):
                self._settled.add(record.id)
                self._metrics.outcome(record.tenant, "failed", event.failure.type)
                self._lines.failed(record.id, f"{event.failure.type}: {event.failure.message}")
        self._feed.changed(record.id)
        return None

    async def _worker_broke(self, record: RequestRecord, exc: grpc.aio.AioRpcError, *, reached: bool) -> None:
        """The call ended with an error status: an attempt, unless it never reached a worker."""
        code = exc.code()
        detail = f"{code.name}: {exc.details()}"
        if not reached and code in NOT_REACHED_CODES:
            await self._not_reached(record, detail)
            return
        self._breaker.record_reached()
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            detail = (
                f"DEADLINE_EXCEEDED: no result within worker_call_timeout_seconds"
                f" ({self._worker.call_timeout_seconds:g} s)"
            )
        await self._attempt_failed(record, detail)

    async def _attempt_failed(self, record: RequestRecord, detail: str) -> None:
        """Runs the request again after a backoff, or fails it once it has used its attempts."""
        tracing.failed(detail)
        log.warning(
            "worker attempt failed", extra={"request_id": record.id, "attempt": record.attempts, "error": detail}
        )
        if record.attempts >= self._max_attempts:
            await self._fail(record, ErrorType.WORKER_FAILED, f"worker failed after {record.attempts} attempts: {detail}")
            return
        delay = self._retry_backoff.delay(record.attempts)
        await self._log(
            record.id,
            f"attempt {record.attempts} of {self._max_attempts} failed ({detail}); retrying in {delay:.1f} s",
            types_pb2.LOG_LEVEL_WARN,
        )
        self._metrics.retries.inc()
        await self._requeue(record, delay=delay)

    async def _not_reached(self, record: RequestRecord, detail: str) -> None:
        """No worker got the call: the attempt is given back and the request waits for the workers."""
        self._metrics.unreached.inc()
        opened = self._breaker.record_unreached()
        log.info("worker call did not reach a worker", extra={"request_id": record.id, "error": detail})
        await self._log(
            record.id,
            f"the call did not reach a worker ({detail}); not counted as an attempt, waiting for workers",
            types_pb2.LOG_LEVEL_WARN,
        )
        await self._requeue(record, delay=self._retry_backoff.delay(1), refund_attempt=True)
        if opened:
            log.warning("workers unreachable; dispatching paused until they answer", extra={"error": detail})
            await self._update_health()
            self.wake()

    async def _requeue(self, record: RequestRecord, *, delay: float, refund_attempt: bool = False) -> None:
        """Back to its old place in the queue, not claimed again by any gateway for `delay` seconds."""
        if await self._store.requeue(record.id, record.lease_token, refund_attempt=refund_attempt, delay_seconds=delay):
            asyncio.get_running_loop().call_later(delay, self.wake)

    async def _wake_after_backoff(self) -> None:
        """Nothing is ready: wake when the first backoff ends, whichever gateway began it."""
        retry_in = await self._store.next_retry_in()
        if self._retry_wake is not None:
            self._retry_wake.cancel()
            self._retry_wake = None
        if retry_in is not None:
            self._retry_wake = asyncio.get_running_loop().call_later(retry_in, self.wake)

    async def _give_back(self, record: RequestRecord) -> None:
        """The gateway failed mid-run (its store): requeue or fail the request, retrying until the store
        takes it, so it is not left IN_PROGRESS until a restart."""
        failures = 0
        while True:
            try:
                if record.attempts >= self._max_attempts:
                    await self._fail(record, ErrorType.INTERNAL, f"the gateway failed {record.attempts} times running it")
                else:
                    await self._requeue(record, delay=self._retry_backoff.delay(record.attempts))
                return
            except Exception:
                failures += 1
                log.exception("cannot give a request back to the queue; retrying", extra={"request_id": record.id})
                self._metrics.dispatcher_errors.inc()
                await asyncio.sleep(self._retry_backoff.delay(failures))

    async def _fail(self, record: RequestRecord, error_type: ErrorType, message: str) -> None:
        await self._log(record.id, message, types_pb2.LOG_LEVEL_ERROR)
        error = types_pb2.RequestError(type=error_type, message=message)
        if await self._store.fail(record.id, error, record.lease_token):
            self._metrics.outcome(record.tenant, "failed", error_type)
            self._lines.failed(record.id, f"{error_type}: {message}")

    async def _log(self, request_id: str, message: str, level: types_pb2.LogLevel) -> None:
        await self._store.add_log(
            request_id,
            types_pb2.LogEntry(message=message, level=level, source="gateway", timestamp=time.time()),
        )

    async def _update_health(self) -> None:
        serving = not (self._breaker.is_open or self._loop_failing)
        if serving == self._serving or not self._accepting:
            return
        self._serving = serving
        self._metrics.dispatch_paused.set(0 if serving else 1)
        if self._on_serving is not None:
            try:
                await self._on_serving(serving)
            except Exception:
                log.exception("could not report the dispatcher's health")

    async def _unless_stopping(self, work: Coroutine[Any, Any, None]) -> bool:
        """Runs `work` unless shutdown comes first (then cancels it); True when it ran to the end."""
        task = asyncio.ensure_future(work)
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not task.done():
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        return not task.cancelled()

    async def shutdown(self, grace_seconds: float) -> None:
        """Stops dispatching; running requests get `grace_seconds`, then go back to the queue."""
        self._accepting = False
        self._stopping.set()
        self._prefetch_queue.clear()
        for prefetch in self._prefetches:
            prefetch.cancel()
        self.wake()
        if self._loop_task is not None:
            await self._loop_task
        running = dict(self._running)
        if not running:
            return
        _, late = await asyncio.wait(running.values(), timeout=grace_seconds)
        stopped = {request_id: self._leases[request_id] for request_id, task in running.items() if task in late}
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
        for request_id, token in stopped.items():
            # Stopped by this shutdown, not by the request: the attempt is given back.
            await self._store.requeue(request_id, token, refund_attempt=True)
            self._lines.back_in_queue(request_id, "not finished within the shutdown grace")
