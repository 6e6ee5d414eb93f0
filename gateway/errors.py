"""The one place that turns errors into gRPC statuses, for unary and streaming calls alike, and
into fal's HTTP answers (status, JSON body, headers) for the queue protocol over HTTP.

Every error leaves as a `google.rpc.Status` with an `ErrorInfo` (domain "loraserve", a
reason) and, for bad input, a `BadRequest` naming each bad field. Nothing else reaches
a caller: an unexpected exception is logged here and answered INTERNAL without its trace.
Over HTTP the same errors become fal's bodies: 422 `{"detail": [{loc, msg, type}]}` naming
the same fields as the BadRequest, `{"detail", "error_type"}` otherwise.
"""

from __future__ import annotations

import datetime
import functools
import inspect
import logging
import math
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from gateway.store import StoreUnavailable
from loraserve.errors import ErrorType
from loraserve.request.violations import FieldViolation, InvalidInput
from loraserve.v1 import types_pb2
from storage.uploads import UploadQuotaExceeded

log = logging.getLogger(__name__)

DOMAIN = "loraserve"
# A gRPC client refuses trailers over 8 KiB (GRPC_ARG_MAX_METADATA_SIZE's default), so a refusal naming many bad
# fields, each quoting its value, reached the caller as RESOURCE_EXHAUSTED "Stream removed". Bytes, before the
# message is percent-encoded (up to 3 characters a byte) and the Status (message and details) base64-encoded (4 a 3)
# into the trailers: at most 1.8 + 4.2 KiB.
MAX_STATUS_MESSAGE_BYTES = 600
MAX_STATUS_DETAILS_BYTES = 2500
MAX_DESCRIPTION_BYTES = 300


class ServiceError(Exception):
    """An error meant for the caller: its message is safe to show."""

    code = grpc.StatusCode.INTERNAL
    reason = "INTERNAL"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason


class InvalidArgument(ServiceError):
    """Bad input, each field named: the request model's InvalidInput, or a refusal of the gateway's own (a submit's
    queue options, an upload)."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"

    def __init__(self, violations: Sequence[FieldViolation]) -> None:
        self.violations = list(violations)
        summary = "; ".join(f"`{v.field}`: {v.description}" for v in self.violations)
        super().__init__(f"invalid request: {summary}")


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "REQUEST_NOT_FOUND"


class ResultExpired(ServiceError):
    """The request finished longer ago than retention_seconds: its result, logs and files were deleted.
    NOT_FOUND rather than FAILED_PRECONDITION, which callers read as "not ready yet, ask again"."""

    code = grpc.StatusCode.NOT_FOUND
    reason = "RESULT_EXPIRED"


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "API_KEY_INVALID"


class AlreadyExists(ServiceError):
    code = grpc.StatusCode.ALREADY_EXISTS
    reason = "CLIENT_REQUEST_ID_REUSED"


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "REQUEST_NOT_FINISHED"


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "SHUTTING_DOWN"


class StoreDown(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "STORE_UNAVAILABLE"


class ResourceExhausted(ServiceError):
    """Over a quota: nothing was accepted; come back after `retry_after_seconds`."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "QUOTA_EXCEEDED"

    def __init__(self, message: str, *, limit: str, subject: str, retry_after_seconds: float) -> None:
        super().__init__(message)
        self.limit = limit
        self.subject = subject
        self.retry_after_seconds = retry_after_seconds


class HttpRefused(ServiceError):
    """An HTTP request refused for how it came rather than what it asks: a body too large (413) or not
    declared JSON (415), a Host this gateway does not answer for (421), a web page's origin it does not trust
    (403). Only the HTTP side raises it."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "HTTP_REQUEST_REFUSED"

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# How a failed request's RequestError.type is answered by GetResult / Subscribe.
REQUEST_ERROR_CODES: dict[str, grpc.StatusCode] = {
    ErrorType.INVALID_INPUT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorType.MODEL_LOAD_FAILED: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorType.ADAPTER_LOAD_FAILED: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorType.OUT_OF_MEMORY: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorType.CANCELLED: grpc.StatusCode.CANCELLED,
    ErrorType.WORKER_FAILED: grpc.StatusCode.UNAVAILABLE,
    ErrorType.START_TIMEOUT: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorType.INTERNAL: grpc.StatusCode.INTERNAL,
}


class RequestFailed(ServiceError):
    """The request ran (or was cancelled) and ended without an output."""

    def __init__(self, error_type: str, message: str, field: str = "") -> None:
        super().__init__(message, reason=error_type)
        self.code = REQUEST_ERROR_CODES.get(error_type, grpc.StatusCode.INTERNAL)
        # The input a worker refused (RequestError.field), answered as a field violation like a refusal at submit.
        self.field = field

    @classmethod
    def of(cls, error: types_pb2.RequestError) -> RequestFailed:
        return cls(error.type, error.message, error.field)


def answerable(exc: BaseException) -> ServiceError:
    """`exc` as a ServiceError both front doors can answer: the request model's refusal is INVALID_ARGUMENT (fal's
    422), a store outage says nothing was changed; anything unexpected is logged here and answered without its
    message, which may hold what callers must not see."""
    if isinstance(exc, StoreUnavailable):
        log.warning("request store unavailable", extra={"error": str(exc)})
        return StoreDown("the request store is unreachable; nothing was changed, retry shortly")
    if isinstance(exc, InvalidInput):
        return InvalidArgument(exc.violations)
    if isinstance(exc, UploadQuotaExceeded):
        return ResourceExhausted(
            str(exc), limit=exc.limit, subject=exc.subject, retry_after_seconds=exc.retry_after_seconds
        )
    if not isinstance(exc, ServiceError):
        log.exception("unexpected error", exc_info=exc)
        return ServiceError("internal error; see the gateway log")
    return exc


def to_status(exc: BaseException) -> status_pb2.Status:
    exc = answerable(exc)
    details: list[Message] = [error_details_pb2.ErrorInfo(reason=exc.reason, domain=DOMAIN)]
    if isinstance(exc, InvalidArgument):
        details.append(_bad_request(exc.violations))
    if isinstance(exc, RequestFailed) and exc.field:
        details.append(_bad_request([FieldViolation(exc.field, exc.message)]))
    if isinstance(exc, ResourceExhausted):
        delay = duration_pb2.Duration()
        delay.FromTimedelta(datetime.timedelta(seconds=exc.retry_after_seconds))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
        details.append(
            error_details_pb2.QuotaFailure(
                violations=[error_details_pb2.QuotaFailure.Violation(subject=exc.subject, description=exc.limit)]
            )
        )
    packed = []
    for detail in details:
        any_msg = any_pb2.Any()
        any_msg.Pack(detail)
        packed.append(any_msg)
    return status_pb2.Status(
        code=getattr(code_pb2, exc.code.name), message=_clipped(exc.message, MAX_STATUS_MESSAGE_BYTES), details=packed
    )


def _bad_request(violations: Sequence[FieldViolation]) -> error_details_pb2.BadRequest:
    """The violations, each description clipped, as many as fit MAX_STATUS_DETAILS_BYTES (in their order: the
    caller fixes those and hears of the rest on its next try)."""
    bad = error_details_pb2.BadRequest()
    for violation in violations:
        bad.field_violations.add(
            field=_clipped(violation.field, MAX_DESCRIPTION_BYTES),
            description=_clipped(violation.description, MAX_DESCRIPTION_BYTES),
        )
        if bad.ByteSize() > MAX_STATUS_DETAILS_BYTES and len(bad.field_violations) > 1:
            del bad.field_violations[-1]
            break
    return bad


def _clipped(text: str, limit: int) -> str:
    """`text` cut to at most `limit` UTF-8 bytes, marked with an ellipsis where it was cut."""
    raw = text.encode("utf-8", "backslashreplace")
    if len(raw) <= limit:
        return text
    return raw[: limit - 3].decode("utf-8", "ignore") + "\u2026"


F = TypeVar("F", bound=Callable[..., Any])


def grpc_errors(handler: F) -> F:
    """Wraps a grpc.aio servicer method (coroutine or async generator)."""

    async def abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
        await context.abort_with_status(rpc_status.to_status(to_status(exc)))

    if inspect.isasyncgenfunction(handler):

        @functools.wraps(handler)
        async def stream(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                async for item in handler(self, request, context):
                    yield item
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await abort(context, exc)

        return stream  # type: ignore[return-value]

    @functools.wraps(handler)
    async def unary(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await handler(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await abort(context, exc)

    return unary  # type: ignore[return-value]



# --- fal's queue protocol over HTTP ----------------------------------------------------------

# A failed request's RequestError.type as fal answers it: the HTTP status of its result and the
# `error_type` of its COMPLETED status. Statuses a client retries (408, 409, 429, 502-504) are
# avoided: the request was accepted, so asking again changes nothing; the start timeout's 504
# carries `X-Fal-Request-Timeout-Type: user`, which no fal client retries.
REQUEST_ERROR_HTTP: dict[str, tuple[int, str]] = {
    ErrorType.INVALID_INPUT: (422, "bad_request"),
    ErrorType.MODEL_LOAD_FAILED: (422, "bad_request"),
    ErrorType.ADAPTER_LOAD_FAILED: (422, "bad_request"),
    ErrorType.OUT_OF_MEMORY: (500, "runner_server_error"),
    ErrorType.CANCELLED: (499, "client_cancelled"),
    ErrorType.WORKER_FAILED: (500, "runner_server_error"),
    ErrorType.START_TIMEOUT: (504, "request_timeout"),
    ErrorType.INTERNAL: (500, "internal_error"),
}
# fal's words for a cancelled request's COMPLETED status.
CANCELLED_MESSAGE = "Request cancelled"
# Where the fields that are not in the JSON body come from on the HTTP side: fal's headers and query.
HTTP_FIELD_LOCS: dict[str, list[str | int]] = {
    "priority": ["header", "x-fal-queue-priority"],
    "start_timeout": ["header", "x-fal-request-timeout"],
    "webhook_url": ["query", "fal_webhook"],
}


@dataclass(frozen=True)
class HttpError:
    status: int
    body: dict[str, Any]
    headers: dict[str, str]


def field_loc(field: str) -> list[str | int]:
    """A field path as the gRPC BadRequest names it (`input.loras[0].path`) as fal's 422 `loc`
    (`["body", "loras", 0, "path"]`); the request's own settings point at their header or query."""
    if field in HTTP_FIELD_LOCS:
        return list(HTTP_FIELD_LOCS[field])
    loc: list[str | int] = ["body"]
    parts = field.split(".")
    # A fal-ai/lora request's fields are SubmitRequest.input's, a fal-ai/flux-lora request's flux_input's.
    if parts[0] in ("input", "flux_input"):
        parts = parts[1:]
    for part in parts:
        name, _, indexes = part.partition("[")
        if name:
            loc.append(name)
        for index in indexes.replace("]", "").split("[") if indexes else ():
            loc.append(int(index) if index.isdigit() else index)
    return loc


def request_error_http(error_type: str) -> tuple[int, str]:
    """(HTTP status of the result, fal `error_type`) for a failed request's RequestError.type."""
    return REQUEST_ERROR_HTTP.get(error_type, (500, "internal_error"))


def to_http(exc: BaseException) -> HttpError:
    """`exc` as fal answers it over HTTP; unexpected exceptions are logged and answered 500 without detail."""
    exc = answerable(exc)
    if isinstance(exc, InvalidArgument):
        detail = [{"loc": field_loc(v.field), "msg": v.description, "type": v.kind} for v in exc.violations]
        return HttpError(422, {"detail": detail}, {"X-Fal-Retryable": "false"})
    if isinstance(exc, RequestFailed):
        status, error_type = request_error_http(exc.reason)
        headers = {"X-Fal-Error-Type": error_type}
        if exc.reason == ErrorType.START_TIMEOUT:
            headers["X-Fal-Request-Timeout-Type"] = "user"
        if status == 422:
            loc = field_loc(exc.field) if exc.field else ["body"]
            body: dict[str, Any] = {"detail": [{"loc": loc, "msg": exc.message, "type": "value_error"}]}
            return HttpError(status, body, {**headers, "X-Fal-Retryable": "false"})
        return HttpError(status, {"detail": exc.message, "error_type": error_type}, headers)
    if isinstance(exc, HttpRefused):
        return HttpError(exc.status, {"detail": exc.message, "error_type": "bad_request"}, {"X-Fal-Error-Type": "bad_request"})
    if isinstance(exc, ResourceExhausted):
        retry_after = max(1, math.ceil(exc.retry_after_seconds))
        return HttpError(
            429,
            {"detail": exc.message, "error_type": "rate_limited", "limit": exc.limit},
            {"Retry-After": str(retry_after)},
        )
    status, error_type = _HTTP_STATUS.get(type(exc), (500, "internal_error"))
    return HttpError(status, {"detail": exc.message, "error_type": error_type}, {"X-Fal-Error-Type": error_type})


_HTTP_STATUS: dict[type[ServiceError], tuple[int, str]] = {
    NotFound: (404, "not_found"),
    ResultExpired: (404, "result_expired"),
    Unauthenticated: (401, "unauthorized"),
    AlreadyExists: (400, "bad_request"),
    FailedPrecondition: (400, "request_in_progress"),
    Unavailable: (503, "runner_scheduling_failure"),
    StoreDown: (503, "internal_error"),
}
