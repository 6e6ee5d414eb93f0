"""OpenTelemetry tracing of requests, off unless `tracing_enabled`.

One trace per request: the gateway's submit, its wait in the queue, each dispatch and worker call, and
in the worker replica Generate with its input fetches, denoising and output writes. The trace context
crosses two gaps as a W3C `traceparent`: the queue (stored with the request, so whichever gateway
dispatches it, now or after a restart, continues the trace) and the worker call (gRPC metadata, which
Serve's gRPC proxy hands to the replica). Log records made inside a span carry its `trace_id` and
`span_id`, so a JSON log line can be found from a trace and back.

Off, every span is the API's non-recording one, no context is attached, nothing of the SDK is imported
and nothing is stored or sent. One tracer per process, set up from the settings by whichever side runs
there (the Gateway's constructor, the Worker's in each replica); the first setup wins, so a test
can put an in-memory exporter in place first (`use`).
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Coroutine, Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ParamSpec, Protocol, TypeVar, cast

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    from core.config import Settings

P = ParamSpec("P")
R = TypeVar("R")

# The name the spans' instrumentation scope carries.
SCOPE = "loraserve"
TRACEPARENT = "traceparent"

_NOOP: trace.Tracer = trace.NoOpTracer()
_tracer: trace.Tracer = _NOOP
# W3C trace context only, whatever OTEL_PROPAGATORS says: both sides of each gap must agree.
_PROPAGATOR = TraceContextTextMapPropagator()
_log_records_tagged = False


class _Provider(Protocol):
    def get_tracer(self, instrumenting_module_name: str) -> trace.Tracer: ...


def enabled() -> bool:
    return _tracer is not _NOOP


def setup(settings: Settings, component: str) -> None:
    """Sends this process's spans to the OTLP endpoint as service `{tracing_service_name}-{component}`.

    Sampled at `tracing_sample_ratio` where a trace starts; a span whose parent came from the other side
    follows that side's decision, so a trace is kept whole or not at all.
    """
    if not settings.tracing_enabled or enabled():
        return
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    provider = TracerProvider(
        resource=Resource.create({"service.name": f"{settings.tracing_service_name}-{component}"}),
        sampler=ParentBased(TraceIdRatioBased(settings.tracing_sample_ratio)),
    )
    # An empty endpoint leaves it to OTel's own OTEL_EXPORTER_OTLP_* variables (default localhost:4317).
    exporter = OTLPSpanExporter(endpoint=settings.tracing_otlp_endpoint or None)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    # Global too, so libraries instrumented for OpenTelemetry join the same traces.
    trace.set_tracer_provider(provider)
    use(provider)


def use(provider: _Provider) -> None:
    """Traces with `provider` from now on (a test's in-memory exporter, or `setup`'s)."""
    global _tracer
    _tracer = provider.get_tracer(SCOPE)
    _tag_log_records()


def stop() -> None:
    """Back to no tracing (a test undoing `use`)."""
    global _tracer
    _tracer = _NOOP


@contextmanager
def span(
    name: str,
    *,
    parent: Context | None = None,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: dict[str, str | int] | None = None,
    end_on_exit: bool = True,
) -> Iterator[Span]:
    """A span, current inside the block, child of `parent` (else of the current span); ends in error on an
    exception, and at the block's end unless `end_on_exit` is False (the caller ends it). Off: the invalid
    span, with nothing attached."""
    if _tracer is _NOOP:
        yield trace.INVALID_SPAN
        return
    with _tracer.start_as_current_span(
        name, context=parent, kind=kind, attributes=attributes, end_on_exit=end_on_exit
    ) as current:
        yield current


def traced(name: str, kind: SpanKind = SpanKind.INTERNAL) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Each call of the function (or coroutine function) in a span of its own; off, a plain call."""

    def wrap(fn: Callable[P, R]) -> Callable[P, R]:
        if inspect.iscoroutinefunction(fn):
            coroutine = cast(Callable[P, Coroutine[Any, Any, Any]], fn)

            @functools.wraps(fn)
            async def run_async(*args: P.args, **kwargs: P.kwargs) -> Any:
                if _tracer is _NOOP:
                    return await coroutine(*args, **kwargs)
                with span(name, kind=kind):
                    return await coroutine(*args, **kwargs)

            return cast(Callable[P, R], run_async)

        @functools.wraps(fn)
        def run(*args: P.args, **kwargs: P.kwargs) -> R:
            if _tracer is _NOOP:
                return fn(*args, **kwargs)
            with span(name, kind=kind):
                return fn(*args, **kwargs)

        return run

    return wrap


def record_span(name: str, *, parent: Context | None, start: float, end: float, attributes: dict[str, str | int]) -> None:
    """A span for something that is over and had no code running through it (a wait in the queue); times in
    epoch seconds."""
    if _tracer is _NOOP:
        return
    done = _tracer.start_span(name, context=parent, attributes=attributes, start_time=_nanoseconds(start))
    done.end(end_time=_nanoseconds(max(start, end)))


def annotate(**attributes: str | int) -> None:
    """Attributes of the current span (`loraserve.` prefixed), known only inside it (the request id made
    by the store)."""
    current = trace.get_current_span()
    if current.is_recording():
        current.set_attributes({f"loraserve.{key}": value for key, value in attributes.items()})


def failed(description: str) -> None:
    """The current span ends in error: an outcome that is reported, not raised (a failed attempt)."""
    current = trace.get_current_span()
    if current.is_recording():
        current.set_status(Status(StatusCode.ERROR, description))


def traceparent() -> str:
    """The current span's context as a W3C `traceparent` ("" with none), to be stored with a request."""
    carrier: dict[str, str] = {}
    if _tracer is not _NOOP:
        _PROPAGATOR.inject(carrier)
    return carrier.get(TRACEPARENT, "")


def from_traceparent(value: str) -> Context | None:
    """The context a stored `traceparent` names; None (a new trace) for "" or when tracing is off."""
    if not value or _tracer is _NOOP:
        return None
    return _PROPAGATOR.extract({TRACEPARENT: value})


def outgoing_metadata() -> tuple[tuple[str, str], ...]:
    """gRPC metadata that carries the current span to the callee (none when there is no span)."""
    value = traceparent()
    return ((TRACEPARENT, value),) if value else ()


def incoming_context(metadata: Iterable[tuple[str, str | bytes]] | None) -> Context | None:
    """The caller's context from a call's gRPC metadata; None when it sent none or tracing is off."""
    if metadata is None or _tracer is _NOOP:
        return None
    for key, value in metadata:
        if key.lower() == TRACEPARENT:
            return from_traceparent(value.decode("ascii", "replace") if isinstance(value, bytes) else value)
    return None


@contextmanager
def continuing(carrier: Iterable[tuple[str, str | bytes]] | None) -> Iterator[None]:
    """Inside the block, the span the caller's metadata or headers name (W3C `traceparent`) is the current
    one, so the spans made there join the caller's trace; without one (or with tracing off), nothing changes."""
    parent = incoming_context(carrier)
    if parent is None:
        yield
        return
    token = otel_context.attach(parent)
    try:
        yield
    finally:
        otel_context.detach(token)


def _nanoseconds(epoch_seconds: float) -> int:
    return int(epoch_seconds * 1_000_000_000)


def _tag_log_records() -> None:
    """Every log record made inside a span gets `trace_id` and `span_id` (hex, as trace backends show
    them), whatever handler writes it: ours (core/logs.py) or Ray Serve's in a replica. Once per process;
    a record costs nothing more while tracing is off."""
    global _log_records_tagged
    if _log_records_tagged:
        return
    _log_records_tagged = True
    current = logging.getLogRecordFactory()

    def make(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = current(*args, **kwargs)
        if _tracer is not _NOOP:
            context = trace.get_current_span().get_span_context()
            if context.is_valid:
                record.trace_id = trace.format_trace_id(context.trace_id)
                record.span_id = trace.format_span_id(context.span_id)
        return record

    # A factory that redacts, wrapped, still redacts (core.logs.redact_log_records wraps it only once).
    make.redacts = getattr(current, "redacts", False)  # type: ignore[attr-defined]
    logging.setLogRecordFactory(make)
