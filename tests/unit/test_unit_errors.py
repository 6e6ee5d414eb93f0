"""gateway.errors: exceptions → google.rpc.Status, and what a real gRPC client then sees."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio
from google.rpc import code_pb2, error_details_pb2, status_pb2

from gateway.errors import (
    DOMAIN,
    REQUEST_ERROR_CODES,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    RequestFailed,
    ServiceError,
    Unavailable,
    grpc_errors,
    to_status,
)
from loraserve.client import AsyncClient, Client, LoraServeError
from loraserve.errors import ErrorType
from loraserve.request.violations import FieldViolation, InvalidInput
from loraserve.v1 import generation_pb2, generation_pb2_grpc, types_pb2

SECRET = "db-password=hunter2"
VIOLATIONS = [
    FieldViolation("input.prompt", "is required and must not be empty"),
    FieldViolation("input.loras[1].scale", "must be a finite number, got inf"),
]


def unpack(status: status_pb2.Status) -> tuple[error_details_pb2.ErrorInfo, error_details_pb2.BadRequest | None]:
    infos, bads = [], []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            infos.append(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            bads.append(bad)
        else:
            raise AssertionError(f"unexpected detail {detail.type_url}")
    assert len(infos) == 1 and len(bads) <= 1
    return infos[0], (bads[0] if bads else None)


# (id, exception, google.rpc code, reason)
SERVICE_ERRORS: list[tuple[str, ServiceError, int, str]] = [
    ("service-error", ServiceError("something broke"), code_pb2.INTERNAL, "INTERNAL"),
    ("service-error-reason", ServiceError("custom", reason="CUSTOM_REASON"), code_pb2.INTERNAL, "CUSTOM_REASON"),
    ("invalid-argument", InvalidArgument(VIOLATIONS), code_pb2.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    ("not-found", NotFound("no request with id 'x'"), code_pb2.NOT_FOUND, "REQUEST_NOT_FOUND"),
    ("failed-precondition", FailedPrecondition("not ready"), code_pb2.FAILED_PRECONDITION, "REQUEST_NOT_FINISHED"),
    ("unavailable", Unavailable("shutting down"), code_pb2.UNAVAILABLE, "SHUTTING_DOWN"),
    ("unavailable-reason", Unavailable("busy", reason="OVERLOADED"), code_pb2.UNAVAILABLE, "OVERLOADED"),
]


@pytest.mark.parametrize(("exc", "code", "reason"), [c[1:] for c in SERVICE_ERRORS], ids=[c[0] for c in SERVICE_ERRORS])
def test_service_error_to_status(exc: ServiceError, code: int, reason: str) -> None:
    status = to_status(exc)
    assert status.code == code
    assert status.message == exc.message == str(exc)
    info, bad = unpack(status)
    assert (info.reason, info.domain) == (reason, "loraserve")
    assert DOMAIN == "loraserve"
    if isinstance(exc, InvalidArgument):
        assert bad is not None
        assert [(v.field, v.description) for v in bad.field_violations] == [
            (v.field, v.description) for v in VIOLATIONS
        ]
        assert "`input.prompt`" in status.message and "`input.loras[1].scale`" in status.message
    else:
        assert bad is None


def test_the_request_models_refusal_is_invalid_argument_naming_its_fields() -> None:
    """Validation raises InvalidInput, which knows no gRPC: answered as the gateway's own InvalidArgument."""
    status = to_status(InvalidInput(VIOLATIONS))
    assert status.code == code_pb2.INVALID_ARGUMENT
    info, bad = unpack(status)
    assert info.reason == "INVALID_ARGUMENT" and bad is not None
    assert [(v.field, v.description) for v in bad.field_violations] == [(v.field, v.description) for v in VIOLATIONS]
    assert "`input.prompt`" in status.message


# Request failure type → code, spelled out (not read back from the mapping under test).
REQUEST_FAILURES: list[tuple[str, int]] = [
    (ErrorType.INVALID_INPUT, code_pb2.INVALID_ARGUMENT),
    (ErrorType.MODEL_LOAD_FAILED, code_pb2.FAILED_PRECONDITION),
    (ErrorType.ADAPTER_LOAD_FAILED, code_pb2.FAILED_PRECONDITION),
    (ErrorType.OUT_OF_MEMORY, code_pb2.RESOURCE_EXHAUSTED),
    (ErrorType.CANCELLED, code_pb2.CANCELLED),
    (ErrorType.WORKER_FAILED, code_pb2.UNAVAILABLE),
    (ErrorType.START_TIMEOUT, code_pb2.DEADLINE_EXCEEDED),
    (ErrorType.INTERNAL, code_pb2.INTERNAL),
    ("SOMETHING_NEW", code_pb2.INTERNAL),
]


def test_every_error_type_has_a_code() -> None:
    assert set(REQUEST_ERROR_CODES) == set(ErrorType)
    assert {str(t) for t, _ in REQUEST_FAILURES} >= set(ErrorType)


@pytest.mark.parametrize(("error_type", "code"), REQUEST_FAILURES, ids=[str(t) for t, _ in REQUEST_FAILURES])
def test_request_failed_to_status(error_type: str, code: int) -> None:
    exc = RequestFailed(error_type, f"the request failed: {error_type}")
    status = to_status(exc)
    assert status.code == code
    assert exc.code.value[0] == code
    assert status.message == f"the request failed: {error_type}"
    info, bad = unpack(status)
    assert (info.reason, info.domain) == (str(error_type), "loraserve")
    assert bad is None


def test_a_refused_input_field_is_a_field_violation() -> None:
    """A worker's refusal names its field (RequestError.field) as a refusal at submit does."""
    error = types_pb2.RequestError(
        type=ErrorType.INVALID_INPUT, message="input.mask_url: 32x32, the image is 64x64", field="input.mask_url"
    )
    info, bad = unpack(to_status(RequestFailed.of(error)))
    assert info.reason == ErrorType.INVALID_INPUT
    assert bad is not None and [(v.field, v.description) for v in bad.field_violations] == [
        ("input.mask_url", error.message)
    ]


def test_request_failed_code_is_per_instance() -> None:
    oom = RequestFailed(ErrorType.OUT_OF_MEMORY, "oom")
    bad = RequestFailed(ErrorType.INVALID_INPUT, "bad")
    assert oom.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert bad.code == grpc.StatusCode.INVALID_ARGUMENT
    assert RequestFailed.code == grpc.StatusCode.INTERNAL


@pytest.mark.parametrize("exc", [ValueError(SECRET), KeyError(SECRET), RuntimeError(SECRET)], ids=lambda e: type(e).__name__)
def test_unexpected_exception_is_internal_without_its_message(exc: Exception, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="gateway.errors"):
        status = to_status(exc)
    assert status.code == code_pb2.INTERNAL
    assert SECRET not in status.message
    assert SECRET not in status.SerializeToString().decode("latin-1")
    info, bad = unpack(status)
    assert (info.reason, info.domain, bad) == ("INTERNAL", "loraserve", None)
    # ... but it is logged, with the original exception, for the operator.
    assert any(record.exc_info and record.exc_info[1] is exc for record in caplog.records)


# ---------------------------------------------------------------------------------------------
# A real grpc.aio server on loopback whose methods are wrapped with @grpc_errors.

def raise_for(request_id: str) -> None:
    if request_id == "missing":
        raise NotFound(f"no request with id {request_id!r}")
    if request_id == "invalid":
        raise InvalidArgument(VIOLATIONS)
    if request_id == "oom":
        raise RequestFailed(ErrorType.OUT_OF_MEMORY, "out of GPU memory")
    if request_id == "bug":
        raise ValueError(SECRET)


class FakeGeneration(generation_pb2_grpc.GenerationServiceServicer):
    @grpc_errors
    async def GetStatus(
        self, request: generation_pb2.GetStatusRequest, context: grpc.aio.ServicerContext
    ) -> generation_pb2.GetStatusResponse:
        raise_for(request.request_id)
        return generation_pb2.GetStatusResponse(status=generation_pb2.RequestStatus(request_id=request.request_id))

    @grpc_errors
    async def StreamStatus(
        self, request: generation_pb2.StreamStatusRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generation_pb2.StreamStatusResponse]:
        yield generation_pb2.StreamStatusResponse(
            status=generation_pb2.RequestStatus(request_id=request.request_id, queue_position=3)
        )
        raise_for(request.request_id)
        yield generation_pb2.StreamStatusResponse(
            status=generation_pb2.RequestStatus(request_id=request.request_id, queue_position=0)
        )


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def target() -> AsyncIterator[str]:
    server = grpc.aio.server()
    generation_pb2_grpc.add_GenerationServiceServicer_to_server(FakeGeneration(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(grace=None)


# (request id, code, reason, field violations, text the message contains)
RPC_ERRORS: list[tuple[str, grpc.StatusCode, str, dict[str, str], str]] = [
    ("missing", grpc.StatusCode.NOT_FOUND, "REQUEST_NOT_FOUND", {}, "no request with id 'missing'"),
    ("invalid", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", {v.field: v.description for v in VIOLATIONS}, "`input.prompt`"),
    ("oom", grpc.StatusCode.RESOURCE_EXHAUSTED, "OUT_OF_MEMORY", {}, "out of GPU memory"),
    ("bug", grpc.StatusCode.INTERNAL, "INTERNAL", {}, "internal error"),
]
RPC_IDS = [c[0] for c in RPC_ERRORS]


def check(error: LoraServeError, code: grpc.StatusCode, reason: str, fields: dict[str, str], text: str) -> None:
    assert error.code == code
    assert error.reason == reason
    assert error.field_violations == fields
    assert text in error.message
    assert SECRET not in error.message


@pytest.mark.parametrize(("request_id", "code", "reason", "fields", "text"), RPC_ERRORS, ids=RPC_IDS)
async def test_unary_error_reaches_client(
    target: str, request_id: str, code: grpc.StatusCode, reason: str, fields: dict[str, str], text: str
) -> None:
    async with AsyncClient(target) as client:
        with pytest.raises(LoraServeError) as caught:
            await asyncio.wait_for(client.status(request_id), timeout=10)
    check(caught.value, code, reason, fields, text)


@pytest.mark.parametrize(("request_id", "code", "reason", "fields", "text"), RPC_ERRORS, ids=RPC_IDS)
async def test_streaming_error_after_first_message_reaches_client(
    target: str, request_id: str, code: grpc.StatusCode, reason: str, fields: dict[str, str], text: str
) -> None:
    received: list[generation_pb2.RequestStatus] = []

    async def consume() -> None:
        async with AsyncClient(target) as client:
            async for status in client.stream_status(request_id):
                received.append(status)

    with pytest.raises(LoraServeError) as caught:
        await asyncio.wait_for(consume(), timeout=10)
    assert [(s.request_id, s.queue_position) for s in received] == [(request_id, 3)]
    check(caught.value, code, reason, fields, text)


async def test_success_passes_through(target: str) -> None:
    async with AsyncClient(target) as client:
        status = await asyncio.wait_for(client.status("fine"), timeout=10)
        streamed = [s async for s in client.stream_status("fine")]
    assert status.request_id == "fine"
    assert [s.queue_position for s in streamed] == [3, 0]


async def test_raw_rpc_error_carries_status_details(target: str) -> None:
    """The trailer a non-Python client reads: grpc-status-details-bin with the same Status."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asyncio.wait_for(stub.GetStatus(generation_pb2.GetStatusRequest(request_id="invalid")), timeout=10)
    trailers = dict(caught.value.trailing_metadata() or ())
    status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    assert status.code == code_pb2.INVALID_ARGUMENT
    info, bad = unpack(status)
    assert info.domain == "loraserve"
    assert bad is not None and [v.field for v in bad.field_violations] == ["input.prompt", "input.loras[1].scale"]


async def test_sync_client_sees_the_same_error(target: str) -> None:
    def call() -> LoraServeError:
        with Client(target) as client:
            try:
                client.status("invalid")
            except LoraServeError as exc:
                return exc
        raise AssertionError("no error raised")

    error = await asyncio.wait_for(asyncio.to_thread(call), timeout=10)
    check(error, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", {v.field: v.description for v in VIOLATIONS}, "")
