"""Calls the workers through Ray Serve's gRPC ingress, like any gRPC server.

The gateway needs no Ray in its process: `application` picks the Serve app and
`multiplexed_model_id` lets Serve route to a replica that already holds the base model.

Every Generate call has a deadline and the channel sends keepalive pings, so neither a
hung replica nor a network path that silently stopped carrying packets holds a request
(and its dispatch slot) forever. The pings are paced for Serve's gRPC proxy, which runs
gRPC's default server policy: a client that pings more often than every 5 minutes while
the proxy sends nothing, or at all while no call is open, is cut off with GOAWAY
`too_many_pings` (taking the open calls with it) and gRPC then doubles its ping interval
for good.
"""

from __future__ import annotations

import asyncio
from typing import TypeAlias

import grpc

from core import tracing
from loraserve.v1 import worker_pb2, worker_pb2_grpc
from core.worker_auth import METADATA_KEY

GenerateCall: TypeAlias = grpc.aio.UnaryStreamCall

# gRPC's default `grpc.http2.min_ping_interval_without_data_ms` on servers, Serve's proxy included.
SERVE_MIN_PING_INTERVAL_SECONDS = 300.0


class WorkerClient:
    def __init__(
        self,
        target: str,
        app_name: str,
        *,
        call_timeout_seconds: float = 1800.0,
        keepalive_seconds: float = SERVE_MIN_PING_INTERVAL_SECONDS,
        keepalive_timeout_seconds: float = 20.0,
        reconnect_backoff_max_seconds: float = 10.0,
        shared_secret: str = "",
    ) -> None:
        options: list[tuple[str, int]] = [
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            # gRPC's default reconnect backoff grows to 2 minutes: the workers coming back after an
            # outage would go unnoticed that long.
            ("grpc.max_reconnect_backoff_ms", int(reconnect_backoff_max_seconds * 1000)),
        ]
        if keepalive_seconds > 0:
            options += [
                ("grpc.keepalive_time_ms", int(keepalive_seconds * 1000)),
                ("grpc.keepalive_timeout_ms", int(keepalive_timeout_seconds * 1000)),
                # gRPC 1.85 waits for the ack of a keepalive ping this long, not keepalive_timeout_ms
                # (default 1 minute).
                ("grpc.http2.ping_timeout_ms", int(keepalive_timeout_seconds * 1000)),
                # Keep pinging through a long silent stretch of a call (a model loading);
                # gRPC's default stops after two pings without data.
                ("grpc.http2.max_pings_without_data", 0),
                # Idle channels are not pinged: Serve's proxy refuses that (see above).
                ("grpc.keepalive_permit_without_calls", 0),
            ]
        self._channel = grpc.aio.insecure_channel(target, options=options)
        self._stub = worker_pb2_grpc.WorkerServiceStub(self._channel)
        self._app_name = app_name
        self._secret = ((METADATA_KEY, shared_secret),) if shared_secret else ()
        self.call_timeout_seconds = call_timeout_seconds

    def _metadata(self, model_key: str) -> tuple[tuple[str, str], ...]:
        return (("application", self._app_name), ("multiplexed_model_id", model_key), *self._secret)

    def generate(self, request: worker_pb2.GenerateRequest, model_key: str) -> GenerateCall:
        """The call, in a client span that ends with it and whose context the worker continues."""
        with tracing.span(
            "WorkerService/Generate",
            kind=tracing.SpanKind.CLIENT,
            attributes={"rpc.system": "grpc", "loraserve.request_id": request.request_id},
            end_on_exit=False,
        ) as span:
            call: GenerateCall = self._stub.Generate(
                request,
                metadata=self._metadata(model_key) + tracing.outgoing_metadata(),
                timeout=self.call_timeout_seconds,
            )
        if span.is_recording():
            call.add_done_callback(lambda _call: span.end())
        return call

    async def prefetch(
        self, request: worker_pb2.PrefetchRequest, model_key: str, timeout_seconds: float
    ) -> worker_pb2.PrefetchResponse:
        response: worker_pb2.PrefetchResponse = await self._stub.Prefetch(
            request, metadata=self._metadata(model_key), timeout=timeout_seconds
        )
        return response

    async def reachable(self, timeout_seconds: float) -> bool:
        """Whether a connection to the workers' ingress comes up within the timeout.

        Cheap (no call reaches a replica) and enough for the circuit breaker: whether the
        Serve application answers is what the next real calls find out.
        """
        try:
            await asyncio.wait_for(self._channel.channel_ready(), timeout_seconds)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        await self._channel.close()
