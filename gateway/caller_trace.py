"""A caller's own trace goes on into the gateway: the submit span becomes a child of the span named by the
`traceparent` of the caller's gRPC metadata or HTTP headers, as OpenTelemetry-instrumented clients send it.

Installed by gateway/server.py only while tracing is on; a call without a `traceparent` is left as it is.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from aiohttp import web

from core import tracing


class CallerTrace(grpc.aio.ServerInterceptor):
    """Unary-request handlers (Submit, Subscribe and the reads) run inside the caller's span."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        metadata = handler_call_details.invocation_metadata
        if handler is None or tracing.incoming_context(metadata) is None:
            return handler
        if handler.unary_unary is not None and inspect.iscoroutinefunction(handler.unary_unary):
            unary = handler.unary_unary

            async def unary_in_caller_trace(request: Any, context: grpc.aio.ServicerContext) -> Any:
                with tracing.continuing(metadata):
                    return await unary(request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary_in_caller_trace, handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream is not None and inspect.isasyncgenfunction(handler.unary_stream):
            stream = handler.unary_stream

            async def stream_in_caller_trace(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                with tracing.continuing(metadata):
                    async for response in stream(request, context):
                        yield response

            return grpc.unary_stream_rpc_method_handler(
                stream_in_caller_trace, handler.request_deserializer, handler.response_serializer
            )
        return handler


@web.middleware
async def caller_trace(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """The HTTP side's twin of CallerTrace: fal's queue submit and /run inside the caller's span."""
    with tracing.continuing(request.headers.items()):
        return await handler(request)
