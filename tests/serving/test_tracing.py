"""One trace per request, from the gateway's Submit to the worker's output writes, exported in memory.

A real gateway (SQLite queue) dispatches to the real Worker on the tiny SD 1.5 model, served by a gRPC
server on loopback in this process: no Ray, whose gRPC proxy hands a replica the call's metadata as this
server does. The request is image-to-image with a data-URI start image, so the worker fetches an input.
The trace context crosses the queue only through the request's stored `traceparent` and the worker call
only through its gRPC metadata: without either, the spans split into several traces.
"""

from __future__ import annotations

import base64
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

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
from loraserve.v1 import worker_pb2_grpc
from serving.app import Worker
from serving.tiny import TinyModel
from tests.conftest import free_port

# The spans of one request, each with the span it must be a child of (None: the root).
PARENTS = {
    "gateway.submit": None,
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
async def test_one_trace_spans_the_gateway_and_the_worker(
    exporter: InMemorySpanExporter, tiny_sd15: TinyModel, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    settings = Settings(
        data_dir=tmp_path / "data",
        grpc_port=free_port(),
        http_port=free_port(),
        serve_grpc_port=free_port(),
        device="cpu",
        allowed_local_roots=str(tiny_sd15.pipeline_dir),
        worker_shared_secret="between-gateway-and-workers",
        tracing_enabled=True,
    )
    workers = grpc.aio.server()
    worker_pb2_grpc.add_WorkerServiceServicer_to_server(in_process(Worker(settings)), workers)
    workers.add_insecure_port(f"127.0.0.1:{settings.serve_grpc_port}")
    await workers.start()
    gateway = Gateway(settings)
    try:
        await gateway.start()
        async with AsyncClient(f"127.0.0.1:{gateway.grpc_port}") as client:
            result = await client.subscribe(
                {
                    "model_name": str(tiny_sd15.pipeline_dir),
                    "prompt": "a photo of a red house",
                    "endpoint": "ENDPOINT_IMAGE_TO_IMAGE",
                    "image_url": start_image(),
                    "num_inference_steps": 2,
                    "seed": 7,
                }
            )
    finally:
        # Waits for the dispatch, so every span has ended.
        await gateway.stop(grace_seconds=60)
        await workers.stop(grace=None)

    spans = by_name(exporter.get_finished_spans())
    trace_id = ids(spans["gateway.submit"]).trace_id
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
