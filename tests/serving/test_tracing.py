"""One trace per request, from the gateway's Submit to the worker's output writes, exported in memory.

A real gateway (SQLite queue) dispatches to the real Worker on the tiny SD 1.5 model, served by a gRPC
server on loopback in this process: no Ray, whose gRPC proxy hands a replica the call's metadata as this
server does. The request is image-to-image with a data-URI start image, so the worker fetches an input, and its
Submit carries a `traceparent` as an instrumented caller's would: the trace is the caller's. The context
crosses the queue only through the request's stored `traceparent` and the worker call only through its
gRPC metadata: without either, the spans split into several traces.
"""

from __future__ import annotations

import base64
import io
import json
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import numpy as np
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from PIL import Image

from bench.worker_in_process import in_process
from core import tracing
from core.config import Settings
from core.logs import JsonFormatter
from gateway.server import Gateway
from loraserve.client import AsyncClient
from loraserve.inputs import to_input
from loraserve.v1 import generation_pb2, generation_pb2_grpc, worker_pb2_grpc
from serving.app import Worker
from serving.tiny import TinyModel
from tests.conftest import free_port

# The spans of one request, each with the span it must be a child of (None: the root).
PARENTS = {
    "caller": None,
    "gateway.submit": "caller",
    "gateway.queue": "gateway.submit",
    "gateway.dispatch": "gateway.submit",
    "WorkerService/Generate": "gateway.dispatch",
    "worker.generate": "WorkerService/Generate",
    "worker.resolve_inputs": "worker.generate",
    "storage.fetch": "worker.resolve_inputs",
    "worker.denoise": "worker.generate",
    "worker.write_outputs": "worker.generate",
}


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    tracing.use(provider)
    yield spans
    tracing.stop()


def settings_for(tmp_path: Path, model: TinyModel) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        grpc_port=free_port(),
        http_port=free_port(),
        serve_grpc_port=free_port(),
        device="cpu",
        allowed_local_roots=str(model.pipeline_dir),
        worker_shared_secret="between-gateway-and-workers",
        tracing_enabled=True,
    )


@asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[Gateway]:
    """The gateway and the Worker behind it; on the way out the gateway waits for its dispatches, so every
    span has ended."""
    workers = grpc.aio.server()
    worker_pb2_grpc.add_WorkerServiceServicer_to_server(in_process(Worker(settings)), workers)
    workers.add_insecure_port(f"127.0.0.1:{settings.serve_grpc_port}")
    await workers.start()
    gateway = Gateway(settings)
    try:
        await gateway.start()
        yield gateway
    finally:
        await gateway.stop(grace_seconds=60)
        await workers.stop(grace=None)


def request_body(model: TinyModel) -> dict[str, Any]:
    return {
        "model_name": str(model.pipeline_dir),
        "prompt": "a photo of a red house",
        "image_size": {"width": 64, "height": 64},
        "num_inference_steps": 2,
    }


def start_image() -> str:
    buffer = io.BytesIO()
    Image.fromarray((np.random.RandomState(1).rand(64, 64, 3) * 255).astype(np.uint8)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def ids(span: ReadableSpan) -> trace.SpanContext:
    assert span.context is not None
    return span.context


def by_name(spans: tuple[ReadableSpan, ...]) -> dict[str, ReadableSpan]:
    names = [span.name for span in spans]
    assert sorted(names) == sorted(PARENTS), names
    return {span.name: span for span in spans}


@pytest.mark.timeout(300)
async def test_one_trace_spans_the_caller_the_gateway_and_the_worker(
    exporter: InMemorySpanExporter, tiny_sd15: TinyModel, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    # Image-to-image: the output takes the start image's size.
    body = {**request_body(tiny_sd15), "endpoint": "ENDPOINT_IMAGE_TO_IMAGE", "image_url": start_image(), "seed": 7}
    del body["image_size"]
    async with running(settings_for(tmp_path, tiny_sd15)) as gateway:
        target = f"127.0.0.1:{gateway.grpc_port}"
        with tracing.span("caller"):
            caller = tracing.outgoing_metadata()
        async with grpc.aio.insecure_channel(target) as channel:
            submitted = await generation_pb2_grpc.GenerationServiceStub(channel).Submit(
                generation_pb2.SubmitRequest(input=to_input(body)), metadata=caller
            )
        async with AsyncClient(target) as client:
            async for _ in client.stream_status(submitted.request_id):
                pass
            result = await client.result(submitted.request_id)

    spans = by_name(exporter.get_finished_spans())
    trace_id = ids(spans["caller"]).trace_id
    assert {ids(span).trace_id for span in spans.values()} == {trace_id}
    for name, parent in PARENTS.items():
        expected = None if parent is None else ids(spans[parent]).span_id
        parent_context = spans[name].parent
        assert (parent_context.span_id if parent_context is not None else None) == expected, name
    assert spans["gateway.submit"].kind == trace.SpanKind.SERVER
    assert spans["WorkerService/Generate"].kind == trace.SpanKind.CLIENT
    assert spans["worker.generate"].kind == trace.SpanKind.SERVER
    assert (spans["gateway.submit"].attributes or {})["loraserve.request_id"] == result.request_id
    assert (spans["storage.fetch"].attributes or {})["loraserve.field"] == "input.image_url"
    assert all(span.status.is_ok for span in spans.values())

    lines = [
        json.loads(JsonFormatter().format(record))
        for record in caplog.records
        if getattr(record, "request_id", None) == result.request_id
    ]
    completed = [line for line in lines if line["msg"] == "request completed"]
    assert completed and completed[0]["trace_id"] == trace.format_trace_id(trace_id), lines


def test_off_nothing_is_traced_stored_or_sent() -> None:
    tracing.setup(Settings(), "gateway")
    assert not tracing.enabled()
    with tracing.span("gateway.submit") as span:
        assert not span.is_recording()
        assert trace.get_current_span() is trace.INVALID_SPAN
        assert tracing.traceparent() == ""
        assert tracing.outgoing_metadata() == ()
    assert tracing.from_traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01") is None


@pytest.mark.timeout(300)
async def test_a_subscribe_and_a_fal_http_submit_join_their_callers_traces(
    exporter: InMemorySpanExporter, tiny_sd15: TinyModel, tmp_path: Path
) -> None:
    """The streaming gRPC call and fal's HTTP queue take the caller's `traceparent` as Submit does."""
    async with running(settings_for(tmp_path, tiny_sd15)) as gateway:
        with tracing.span("grpc caller"):
            grpc_caller = tracing.outgoing_metadata()
        with tracing.span("http caller"):
            http_caller = dict(tracing.outgoing_metadata())
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
            stream = generation_pb2_grpc.GenerationServiceStub(channel).Subscribe(
                generation_pb2.SubscribeRequest(input=to_input(request_body(tiny_sd15))), metadata=grpc_caller
            )
            assert [r async for r in stream][-1].HasField("result")
        async with aiohttp.ClientSession() as http:
            url = f"http://127.0.0.1:{gateway.settings.http_port}/fal-ai/lora/"
            async with http.post(url, json=request_body(tiny_sd15), headers=http_caller) as response:
                assert response.status == 200, await response.text()

    spans = exporter.get_finished_spans()
    submits = [span for span in spans if span.name == "gateway.submit"]
    callers = {span.name: ids(span) for span in spans if span.name.endswith("caller")}
    assert sorted((span.parent.span_id if span.parent else 0) for span in submits) == sorted(
        caller.span_id for caller in callers.values()
    )
    assert {ids(span).trace_id for span in submits} == {caller.trace_id for caller in callers.values()}
