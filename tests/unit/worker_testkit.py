"""A real gRPC WorkerService on loopback that a test controls (it completes, dies mid-stream, hangs,
reports a failed output write), a server for it that can go down and come back on the same
port, a TCP relay whose connections can go silent, and waiting on conditions with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from loraserve.errors import ErrorType
from loraserve.v1 import types_pb2, worker_pb2, worker_pb2_grpc
from tests.conftest import free_port

SAFETY_S = 20.0


async def wait_until(check: Callable[[], Any], what: str, timeout: float = SAFETY_S) -> None:
    """Polls `check` (sync or async) until it is true; fails naming `what` after `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        await asyncio.sleep(0.01)


class FakeWorker(worker_pb2_grpc.WorkerServiceServicer):
    """Does, for each call of a request, the next step of that request's plan (default: complete)."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.cancelled: list[str] = []
        self.plans: dict[str, list[str]] = {}
        self.default = "complete"
        self.holding: set[str] = set()
        self.prefetched: list[str] = []
        # The prompts of the fal-ai/flux-lora requests Generate was called with.
        self.flux_prompts: list[str] = []
        # Set to an unset event, Prefetch calls wait for it (counted in `prefetching` meanwhile).
        self.prefetch_gate: asyncio.Event | None = None
        self.prefetching = 0

    async def Generate(  # noqa: N802 - the gRPC method's name
        self, request: worker_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.GenerateResponse]:
        self.calls.append(request.request_id)
        if request.HasField("flux_input"):
            self.flux_prompts.append(request.flux_input.prompt)
        plan = self.plans.get(request.request_id)
        step = plan.pop(0) if plan else self.default
        try:
            if step == "complete":
                yield worker_pb2.GenerateResponse(log=types_pb2.LogEntry(message="working", source="worker"))
                yield worker_pb2.GenerateResponse(progress=types_pb2.StepProgress(step=1, total=1))
                output = types_pb2.GenerateOutput(seed=request.seed + 1000)
                yield worker_pb2.GenerateResponse(result=worker_pb2.WorkerResult(output=output, inference_seconds=0.5))
            elif step == "die":
                yield worker_pb2.GenerateResponse(progress=types_pb2.StepProgress(step=1, total=4))
                await context.abort(grpc.StatusCode.INTERNAL, "the replica died")
            elif step == "hang":
                self.holding.add(request.request_id)
                await asyncio.Event().wait()
            elif step == "complete_then_hold":
                # The result is out, the call not yet closed (what the dispatcher sees for a moment).
                output = types_pb2.GenerateOutput(seed=request.seed + 1000)
                yield worker_pb2.GenerateResponse(result=worker_pb2.WorkerResult(output=output, inference_seconds=0.5))
                self.holding.add(request.request_id)
                await asyncio.Event().wait()
            elif step == "hold":
                yield worker_pb2.GenerateResponse(progress=types_pb2.StepProgress(step=1, total=4))
                self.holding.add(request.request_id)
                await asyncio.Event().wait()
            elif step == "store_failed":
                failure = types_pb2.RequestError(type=ErrorType.WORKER_FAILED, message="could not store the outputs")
                yield worker_pb2.GenerateResponse(failure=failure)
            elif step == "bad_adapter":
                failure = types_pb2.RequestError(type=ErrorType.ADAPTER_LOAD_FAILED, message="not a LoRA")
                yield worker_pb2.GenerateResponse(failure=failure)
            else:
                raise AssertionError(f"unknown step {step}")
        except asyncio.CancelledError:
            self.cancelled.append(request.request_id)
            raise

    async def Prefetch(  # noqa: N802 - the gRPC method's name
        self, request: worker_pb2.PrefetchRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.PrefetchResponse:
        self.prefetching += 1
        try:
            if self.prefetch_gate is not None:
                await self.prefetch_gate.wait()
        finally:
            self.prefetching -= 1
        self.prefetched.append(request.request_id)
        return worker_pb2.PrefetchResponse(adapters_ready=len(request.input.loras) + len(request.flux_input.loras))


class WorkerServer:
    """The fake worker on a fixed loopback port, stopped and started again like a Serve ingress."""

    def __init__(self, worker: FakeWorker) -> None:
        self.worker = worker
        self.port = free_port()
        self._server: grpc.aio.Server | None = None
        self.options: list[tuple[str, int]] = []

    async def start(self) -> None:
        server = grpc.aio.server(options=self.options)
        worker_pb2_grpc.add_WorkerServiceServicer_to_server(self.worker, server)
        assert server.add_insecure_port(f"127.0.0.1:{self.port}") == self.port
        await server.start()
        self._server = server

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=None)
            self._server = None


class Relay:
    """A TCP relay in front of the worker whose open connections can go silent: bytes stop flowing
    both ways while the sockets stay open, as on a network path that started dropping packets.
    Connections made later flow again."""

    def __init__(self, target_port: int) -> None:
        self._target_port = target_port
        self._open: list[asyncio.Event] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._connected, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def go_silent(self) -> None:
        for flowing in self._open:
            flowing.clear()

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target_port)
        self._writers += [writer, up_writer]
        flowing = asyncio.Event()
        flowing.set()
        self._open.append(flowing)
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(source, sink, flowing))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter, flowing: asyncio.Event) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await source.read(65536):
                if flowing.is_set():
                    sink.write(data)
                    await sink.drain()
        sink.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
