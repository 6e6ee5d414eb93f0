"""The one place that turns errors into gRPC statuses, for unary and streaming calls alike.

Every error leaves as a `google.rpc.Status` with an `ErrorInfo` (domain "loraserve", a
reason) and, for bad input, a `BadRequest` naming each bad field. Nothing else reaches
a caller: an unexpected exception is logged here and answered INTERNAL without its trace.
"""

from __future__ import annotations

import datetime
import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from gateway.store import StoreUnavailable
from loraserve.errors import ErrorType

log = logging.getLogger(__name__)

DOMAIN = "loraserve"


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


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

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message, reason=error_type)
        self.code = REQUEST_ERROR_CODES.get(error_type, grpc.StatusCode.INTERNAL)


def to_status(exc: BaseException) -> status_pb2.Status:
    if isinstance(exc, StoreUnavailable):
        log.warning("request store unavailable", extra={"error": str(exc)})
        exc = StoreDown("the request store is unreachable; nothing was changed, retry shortly")
    if not isinstance(exc, ServiceError):
        log.exception("unexpected error", exc_info=exc)
        exc = ServiceError("internal error; see the gateway log")
    details = [error_details_pb2.ErrorInfo(reason=exc.reason, domain=DOMAIN)]
    if isinstance(exc, InvalidArgument):
        details.append(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=v.field, description=v.description
                    )
                    for v in exc.violations
                ]
            )
        )
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
        code=getattr(code_pb2, exc.code.name), message=exc.message, details=packed
    )


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

