"""Typed Python clients (sync and asyncio) over the generated stubs.

The verbs are fal's: `subscribe`, `submit`, `status`, `stream_status`, `result`,
`cancel`, `upload`. Inputs are GenerateInput messages or fal-style dicts. Errors are
raised as LoraServeError carrying the gRPC code, the reason and the bad fields.
"""

from __future__ import annotations

import functools
import mimetypes
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

from loraserve.inputs import Input, InputLike, file_payload, find_local_files, replace_local_files, to_input
from loraserve.request.fal_json import APP_ID
from loraserve.v1 import flux_pb2, generation_pb2, generation_pb2_grpc, storage_pb2, storage_pb2_grpc, types_pb2

DEFAULT_TARGET = "127.0.0.1:50051"
UPLOAD_CHUNK_BYTES = 1024 * 1024
_STATUS_DETAILS_KEY = "grpc-status-details-bin"

RequestStatus = generation_pb2.RequestStatus
QueueUpdate = Callable[[RequestStatus], Any]


@dataclass
class LoraServeError(Exception):
    code: grpc.StatusCode
    message: str
    reason: str = ""
    field_violations: dict[str, str] = field(default_factory=dict)
    # Over a quota (RESOURCE_EXHAUSTED): when to try again, and which limits (subject → limit).
    retry_after_seconds: float | None = None
    quota_violations: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"

    @classmethod
    def from_rpc_error(cls, exc: grpc.RpcError) -> LoraServeError:
        code: grpc.StatusCode = exc.code()  # type: ignore[attr-defined]
        error = cls(code, exc.details() or "")  # type: ignore[attr-defined]
        for key, value in exc.trailing_metadata() or ():  # type: ignore[attr-defined]
            if key != _STATUS_DETAILS_KEY:
                continue
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                bad = error_details_pb2.BadRequest()
                retry = error_details_pb2.RetryInfo()
                quota = error_details_pb2.QuotaFailure()
                if detail.Unpack(info):
                    error.reason = info.reason
                elif detail.Unpack(bad):
                    error.field_violations.update({v.field: v.description for v in bad.field_violations})
                elif detail.Unpack(retry):
                    error.retry_after_seconds = retry.retry_delay.ToTimedelta().total_seconds()
                elif detail.Unpack(quota):
                    error.quota_violations.update({v.subject: v.description for v in quota.violations})
        return error


@dataclass(frozen=True)
class Result:
    request_id: str
    # A FluxOutput for a fal-ai/flux-lora request.
    data: types_pb2.GenerateOutput | flux_pb2.FluxOutput

    @classmethod
    def of(cls, response: generation_pb2.GetResultResponse) -> Result:
        output = response.flux_output if response.HasField("flux_output") else response.output
        return cls(response.request_id, output)


def _carried(inp: Input) -> dict[str, Any]:
    """The Submit/Subscribe field that carries `inp`: `flux_input` for a FluxInput, else `input`."""
    return {"flux_input": inp} if isinstance(inp, flux_pb2.FluxInput) else {"input": inp}


def _upload_messages(source: str | Path | bytes, file_name: str | None, content_type: str | None) -> Iterator[
    storage_pb2.UploadRequest
]:
    if isinstance(source, bytes):
        data, name = source, file_name or "upload.bin"
    else:
        path = Path(source)
        data, name = path.read_bytes(), file_name or path.name
    content_type = content_type or mimetypes.guess_type(name)[0] or ""
    yield storage_pb2.UploadRequest(file_name=name, content_type=content_type, chunk=data[:UPLOAD_CHUNK_BYTES])
    for start in range(UPLOAD_CHUNK_BYTES, len(data), UPLOAD_CHUNK_BYTES):
        yield storage_pb2.UploadRequest(chunk=data[start : start + UPLOAD_CHUNK_BYTES])


class _Authorized:
    """A stub whose every call carries the API key, so no call site can forget it."""

    def __init__(self, stub: Any, metadata: tuple[tuple[str, str], ...]) -> None:
        self._stub = stub
        self._metadata = metadata

    def __getattr__(self, name: str) -> Any:
        return functools.partial(getattr(self._stub, name), metadata=self._metadata)


@dataclass(frozen=True)
class Connection:
    """Where and how to reach a gateway: its API key (default: `LORASERVE_KEY`), and for TLS the CA
    certificates to trust (PEM; empty: the system's) and optionally a client certificate and key."""

    target: str = DEFAULT_TARGET
    key: str | None = None
    tls: bool = False
    root_certificates: bytes | None = None
    client_cert_chain: bytes | None = None
    client_private_key: bytes | None = None

    def metadata(self) -> tuple[tuple[str, str], ...]:
        key = self.key if self.key is not None else os.environ.get("LORASERVE_KEY", "")
        if not key:
            return ()
        return (("authorization", key if key.lower().startswith("key ") else f"Key {key}"),)

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not (self.tls or self.root_certificates or self.client_cert_chain):
            return None
        return grpc.ssl_channel_credentials(self.root_certificates, self.client_private_key, self.client_cert_chain)


class Client:
    """Blocking client; one channel per instance. `key` is `<id>:<secret>` (or set `LORASERVE_KEY`)."""

    def __init__(self, target: str = DEFAULT_TARGET, *, key: str | None = None, **tls: Any) -> None:
        how = Connection(target, key, **tls)
        credentials = how.credentials()
        self._channel = (
            grpc.secure_channel(target, credentials) if credentials is not None else grpc.insecure_channel(target)
        )
        self._generation = _Authorized(generation_pb2_grpc.GenerationServiceStub(self._channel), how.metadata())
        self._storage = _Authorized(storage_pb2_grpc.StorageServiceStub(self._channel), how.metadata())

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _prepare(self, input: InputLike, app: str) -> Input:
        """Uploads the local files found in a dict input and refers to them by URL; a dict is `app`'s body."""
        if isinstance(input, (types_pb2.GenerateInput, flux_pb2.FluxInput)):
            return input
        urls = {}
        for value in find_local_files(input):
            data, name = file_payload(value)
            urls[id(value)] = self.upload(data, file_name=name).url
        return to_input(replace_local_files(input, urls), app)

    def submit(
        self,
        input: InputLike,
        *,
        app: str = APP_ID,
        client_request_id: str = "",
        start_timeout: float = 0.0,
        priority: str = "",
        webhook_url: str = "",
    ) -> str:
        """`app`: whose body a dict input is (fal's endpoint id, e.g. `fal-ai/flux-lora/image-to-image`); a
        GenerateInput or FluxInput says it itself.
        `start_timeout`: seconds the request may wait for a worker before it fails unstarted (0: no limit);
        `priority`: "normal" or "low" (starts only when no normal request waits); `webhook_url`: where the
        result is POSTed, signed, when the request ends (fal's webhooks)."""
        request = generation_pb2.SubmitRequest(
            **_carried(self._prepare(input, app)),
            client_request_id=client_request_id,
            start_timeout=start_timeout,
            priority=priority,
            webhook_url=webhook_url,
        )
        return _call(self._generation.Submit, request).request_id

    def status(self, request_id: str, *, logs: bool = False) -> RequestStatus:
        request = generation_pb2.GetStatusRequest(request_id=request_id, logs=logs)
        return _call(self._generation.GetStatus, request).status

    def stream_status(
        self, request_id: str, *, logs: bool = False, previews: bool = False
    ) -> Iterator[RequestStatus]:
        """`previews`: live previews of the image as it forms, in `status.progress.preview_jpeg`."""
        request = generation_pb2.StreamStatusRequest(request_id=request_id, logs=logs, previews=previews)
        try:
            for message in self._generation.StreamStatus(request):
                yield message.status
        except grpc.RpcError as exc:
            raise LoraServeError.from_rpc_error(exc) from None

    def result(self, request_id: str) -> Result:
        response = _call(self._generation.GetResult, generation_pb2.GetResultRequest(request_id=request_id))
        return Result.of(response)

    def cancel(self, request_id: str) -> RequestStatus:
        return _call(self._generation.Cancel, generation_pb2.CancelRequest(request_id=request_id)).status

    def subscribe(
        self, input: InputLike, *, on_queue_update: QueueUpdate | None = None, logs: bool = False,
        client_request_id: str = "", start_timeout: float = 0.0, priority: str = "", previews: bool = False,
        app: str = APP_ID,
    ) -> Result:
        request = generation_pb2.SubscribeRequest(
            **_carried(self._prepare(input, app)),
            logs=logs,
            previews=previews,
            client_request_id=client_request_id,
            start_timeout=start_timeout,
            priority=priority,
        )
        try:
            for message in self._generation.Subscribe(request):
                if message.HasField("status") and on_queue_update is not None:
                    on_queue_update(message.status)
                elif message.HasField("result"):
                    return Result.of(message.result)
        except grpc.RpcError as exc:
            raise LoraServeError.from_rpc_error(exc) from None
        raise LoraServeError(grpc.StatusCode.INTERNAL, "the stream ended without a result")

    def upload(
        self, source: str | Path | bytes, *, file_name: str | None = None, content_type: str | None = None
    ) -> types_pb2.File:
        return _call(self._storage.Upload, _upload_messages(source, file_name, content_type)).file


def _call(method: Callable[[Any], Any], request: Any) -> Any:
    try:
        return method(request)
    except grpc.RpcError as exc:
        raise LoraServeError.from_rpc_error(exc) from None


class AsyncClient:
    """asyncio client; create it inside the event loop that uses it."""

    def __init__(self, target: str = DEFAULT_TARGET, *, key: str | None = None, **tls: Any) -> None:
        """As Client: `key`, and TLS with `tls=True`, `root_certificates`, `client_cert_chain`, `client_private_key`."""
        how = Connection(target, key, **tls)
        credentials = how.credentials()
        self._channel = (
            grpc.aio.secure_channel(target, credentials)
            if credentials is not None
            else grpc.aio.insecure_channel(target)
        )
        self._generation = _Authorized(generation_pb2_grpc.GenerationServiceStub(self._channel), how.metadata())
        self._storage = _Authorized(storage_pb2_grpc.StorageServiceStub(self._channel), how.metadata())

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _prepare(self, input: InputLike, app: str) -> Input:
        """Uploads the local files found in a dict input and refers to them by URL; a dict is `app`'s body."""
        if isinstance(input, (types_pb2.GenerateInput, flux_pb2.FluxInput)):
            return input
        urls = {}
        for value in find_local_files(input):
            data, name = file_payload(value)
            urls[id(value)] = (await self.upload(data, file_name=name)).url
        return to_input(replace_local_files(input, urls), app)

    async def submit(
        self,
        input: InputLike,
        *,
        app: str = APP_ID,
        client_request_id: str = "",
        start_timeout: float = 0.0,
        priority: str = "",
        webhook_url: str = "",
    ) -> str:
        request = generation_pb2.SubmitRequest(
            **_carried(await self._prepare(input, app)),
            client_request_id=client_request_id,
            start_timeout=start_timeout,
            priority=priority,
            webhook_url=webhook_url,
        )
        return (await _acall(self._generation.Submit(request))).request_id

    async def status(self, request_id: str, *, logs: bool = False) -> RequestStatus:
        request = generation_pb2.GetStatusRequest(request_id=request_id, logs=logs)
        return (await _acall(self._generation.GetStatus(request))).status

    async def stream_status(
        self, request_id: str, *, logs: bool = False, previews: bool = False
    ) -> AsyncIterator[RequestStatus]:
        """`previews`: live previews of the image as it forms, in `status.progress.preview_jpeg`."""
        request = generation_pb2.StreamStatusRequest(request_id=request_id, logs=logs, previews=previews)
        try:
            async for message in self._generation.StreamStatus(request):
                yield message.status
        except grpc.RpcError as exc:
            raise LoraServeError.from_rpc_error(exc) from None

    async def result(self, request_id: str) -> Result:
        response = await _acall(self._generation.GetResult(generation_pb2.GetResultRequest(request_id=request_id)))
        return Result.of(response)

    async def cancel(self, request_id: str) -> RequestStatus:
        return (await _acall(self._generation.Cancel(generation_pb2.CancelRequest(request_id=request_id)))).status

    async def subscribe(
        self,
        input: InputLike,
        *,
        on_queue_update: Callable[[RequestStatus], Any] | None = None,
        logs: bool = False,
        client_request_id: str = "",
        start_timeout: float = 0.0,
        priority: str = "",
        previews: bool = False,
        app: str = APP_ID,
    ) -> Result:
        """`on_queue_update` may be a plain function or a coroutine function; with `previews` its statuses
        carry live previews in `progress.preview_jpeg`."""
        request = generation_pb2.SubscribeRequest(
            **_carried(await self._prepare(input, app)),
            logs=logs,
            previews=previews,
            client_request_id=client_request_id,
            start_timeout=start_timeout,
            priority=priority,
        )
        try:
            async for message in self._generation.Subscribe(request):
                if message.HasField("status") and on_queue_update is not None:
                    outcome = on_queue_update(message.status)
                    if isinstance(outcome, Awaitable):
                        await outcome
                elif message.HasField("result"):
                    return Result.of(message.result)
        except grpc.RpcError as exc:
            raise LoraServeError.from_rpc_error(exc) from None
        raise LoraServeError(grpc.StatusCode.INTERNAL, "the stream ended without a result")

    async def upload(
        self, source: str | Path | bytes, *, file_name: str | None = None, content_type: str | None = None
    ) -> types_pb2.File:
        return (await _acall(self._storage.Upload(_upload_messages(source, file_name, content_type)))).file


async def _acall(call: Awaitable[Any]) -> Any:
    try:
        return await call
    except grpc.RpcError as exc:
        raise LoraServeError.from_rpc_error(exc) from None
