"""Hands waiting requests to the workers, oldest first, when a worker has room.

The dispatcher owns every call to the workers: callers' streams only read the store, so
a caller hanging up never cancels work; only `cancel` does. A worker call that breaks
(replica died, Serve unavailable) is retried up to `max_attempts`, then the request
fails with WORKER_FAILED — it is never left hanging.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time

import grpc

from gateway.feed import ChangeFeed
from gateway.metrics import GatewayMetrics
from gateway.scheduling import HotFirstOrder
from gateway.store import RequestRecord, RequestStore, State
from gateway.worker_client import GenerateCall, WorkerClient
from loraserve.errors import ErrorType
from loraserve.v1 import types_pb2, worker_pb2

log = logging.getLogger(__name__)

# Prefetch calls in flight at once: they only warm caches, so they must never crowd out work.
MAX_PREFETCHES = 2
PREFETCH_TIMEOUT_SECONDS = 600.0


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
    ) -> None:
        self._store = store
        self._feed = feed
        self._worker = worker
        self._metrics = metrics
        self._capacity = capacity
        self._max_attempts = max_attempts
        self._order = order
        self._wakeup = asyncio.Event()
        self._running: dict[str, asyncio.Task[None]] = {}
        # The lease token of each running request: renewed while its call runs, named by every write.
        self._leases: dict[str, str] = {}
        self._calls: dict[str, GenerateCall] = {}
        self._cancelled: set[str] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._prefetch_slots = asyncio.Semaphore(MAX_PREFETCHES)
        self._prefetches: set[asyncio.Task[None]] = set()
        self._accepting = True

    @property
    def in_flight(self) -> int:
        return len(self._running)

    def start(self) -> None:
        self._loop_task = asyncio.get_running_loop().create_task(self._loop(), name="dispatcher")

    def wake(self) -> None:
        self._wakeup.set()

    async def _loop(self) -> None:
        while self._accepting:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._accepting and len(self._running) < self._capacity:
                waiting = await self._store.waiting(self._order.lookahead)
                if not waiting:
                    break
                chosen = self._order.choose(waiting)
                record = await self._store.claim(chosen.id)
                if record is None:
                    self._order.forget(chosen.id)
                    continue
                self._order.dispatched(record)
                if record.attempts == 1:
                    self._metrics.queue_wait.observe(max(0.0, time.time() - record.created_at))
                self._feed.notify()
                task = asyncio.get_running_loop().create_task(self._run(record), name=f"request-{record.id}")
                self._running[record.id] = task
                self._leases[record.id] = record.lease_token
                task.add_done_callback(functools.partial(self._finished, record.id))

    def _finished(self, request_id: str, _task: asyncio.Task[None] | None = None) -> None:
        self._running.pop(request_id, None)
        self._leases.pop(request_id, None)
        self._calls.pop(request_id, None)
        self._cancelled.discard(request_id)
        self.wake()

    def prefetch(self, record: RequestRecord) -> None:
        """A request that will wait: have a replica read its adapters into host RAM meanwhile."""
        if not (record.input.loras or record.input.embeddings) or len(self._running) < self._capacity:
            return
        task = asyncio.get_running_loop().create_task(self._prefetch(record), name=f"prefetch-{record.id}")
        self._prefetches.add(task)
        task.add_done_callback(self._prefetches.discard)

    async def _prefetch(self, record: RequestRecord) -> None:
        async with self._prefetch_slots:
            current = await self._store.get(record.id)
            if current is None or current.state != State.IN_QUEUE:
                return
            request = worker_pb2.PrefetchRequest(request_id=record.id, input=record.input)
            try:
                response = await self._worker.prefetch(request, record.model_key, PREFETCH_TIMEOUT_SECONDS)
            except grpc.aio.AioRpcError as exc:
                # Only a warm-up: the request itself resolves its adapters again and reports errors.
                log.info("prefetch failed", extra={"request_id": record.id, "error": exc.code().name})
                return
            await self._log(
                record.id,
                f"prefetched {response.adapters_ready} adapter(s) while waiting",
                types_pb2.LOG_LEVEL_INFO,
            )
            self._feed.notify()

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
        """A waiting request was cancelled: it no longer counts for the fairness bound."""
        self._order.forget(request_id)

    def cancel_running(self, request_id: str) -> None:
        """Cancels the worker call; the replica stops at its next denoising step."""
        self._cancelled.add(request_id)
        call = self._calls.get(request_id)
        if call is not None:
            call.cancel()

    async def _run(self, record: RequestRecord) -> None:
        request = worker_pb2.GenerateRequest(request_id=record.id, input=record.input, seed=record.seed)
        call = self._worker.generate(request, record.model_key)
        self._calls[record.id] = call
        try:
            async for event in call:
                await self._apply(record, event)
        except (grpc.aio.AioRpcError, asyncio.CancelledError) as exc:
            if record.id in self._cancelled:
                return
            if isinstance(exc, asyncio.CancelledError):
                raise
            await self._worker_broke(record, exc)
        else:
            current = await self._store.get(record.id)
            if current is not None and not current.finished:
                await self._fail(record, ErrorType.WORKER_FAILED, "the worker ended the call without a result")
        finally:
            if not call.done():
                call.cancel()
            self._feed.notify()

    async def _apply(self, record: RequestRecord, event: worker_pb2.GenerateResponse) -> None:
        which = event.WhichOneof("event")
        if which == "log":
            await self._store.add_log(record.id, event.log)
        elif which == "progress":
            await self._store.set_progress(record.id, record.lease_token, event.progress.step, event.progress.total)
        elif which == "result":
            if await self._store.complete(
                record.id, record.lease_token, event.result.output, event.result.inference_seconds
            ):
                self._metrics.inference.observe(event.result.inference_seconds)
                self._metrics.outcome("completed")
        elif which == "failure":
            if await self._store.fail(record.id, event.failure, record.lease_token):
                self._metrics.outcome("failed", event.failure.type)
        self._feed.notify()

    async def _worker_broke(self, record: RequestRecord, exc: grpc.aio.AioRpcError) -> None:
        attempts = record.attempts
        detail = f"{exc.code().name}: {exc.details()}"
        log.warning("worker call failed", extra={"request_id": record.id, "attempt": attempts, "error": detail})
        if attempts < self._max_attempts:
            await self._log(record.id, f"worker call failed ({detail}); retrying", types_pb2.LOG_LEVEL_WARN)
            self._metrics.retries.inc()
            await self._store.requeue(record.id, record.lease_token)
        else:
            await self._fail(record, ErrorType.WORKER_FAILED, f"worker failed after {attempts} attempts: {detail}")

    async def _fail(self, record: RequestRecord, error_type: ErrorType, message: str) -> None:
        await self._log(record.id, message, types_pb2.LOG_LEVEL_ERROR)
        error = types_pb2.RequestError(type=error_type, message=message)
        if await self._store.fail(record.id, error, record.lease_token):
            self._metrics.outcome("failed", error_type)

    async def _log(self, request_id: str, message: str, level: types_pb2.LogLevel) -> None:
        await self._store.add_log(
            request_id,
            types_pb2.LogEntry(message=message, level=level, source="gateway", timestamp=time.time()),
        )

    async def shutdown(self, grace_seconds: float) -> None:
        """Stops dispatching; running requests get `grace_seconds`, then go back to the queue."""
        self._accepting = False
        for task in self._prefetches:
            task.cancel()
        self.wake()
        if self._loop_task is not None:
            await self._loop_task
        running = list(self._running.values())
        if running:
            _, late = await asyncio.wait(running, timeout=grace_seconds)
            for request_id, task in list(self._running.items()):
                if task in late:
                    task.cancel()
                    # Stopped by this shutdown, not by the request: the attempt is given back.
                    await self._store.requeue(request_id, self._leases[request_id], refund_attempt=True)
            await asyncio.gather(*late, return_exceptions=True)
