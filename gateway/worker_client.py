"""Calls the workers through Ray Serve's gRPC ingress, like any gRPC server.

The gateway needs no Ray in its process: `application` picks the Serve app and
`multiplexed_model_id` lets Serve route to a replica that already holds the base model.
"""

from __future__ import annotations

from typing import TypeAlias

import grpc

from loraserve.v1 import worker_pb2, worker_pb2_grpc

GenerateCall: TypeAlias = grpc.aio.UnaryStreamCall


class WorkerClient:
    def __init__(self, target: str, app_name: str) -> None:
        self._channel = grpc.aio.insecure_channel(
            target, options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)]
        )
        self._stub = worker_pb2_grpc.WorkerServiceStub(self._channel)
        self._app_name = app_name

    def _metadata(self, model_key: str) -> tuple[tuple[str, str], ...]:
        return (("application", self._app_name), ("multiplexed_model_id", model_key))

    def generate(self, request: worker_pb2.GenerateRequest, model_key: str) -> GenerateCall:
        return self._stub.Generate(request, metadata=self._metadata(model_key))

    async def prefetch(
        self, request: worker_pb2.PrefetchRequest, model_key: str, timeout_seconds: float
    ) -> worker_pb2.PrefetchResponse:
        response: worker_pb2.PrefetchResponse = await self._stub.Prefetch(
            request, metadata=self._metadata(model_key), timeout=timeout_seconds
        )
        return response

    async def close(self) -> None:
        await self._channel.close()
