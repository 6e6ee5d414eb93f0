"""The public GenerationService: submit, status, stream, result, cancel, subscribe."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractContextManager

import grpc

from gateway.dispatcher import Dispatcher
from gateway.auth import Authenticator
from gateway.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    RequestFailed,
    ResultExpired,
    Unavailable,
    grpc_errors,
)
from gateway.feed import ChangeFeed
from gateway.metrics import GatewayMetrics
from gateway.previews import PreviewStream, without_preview
from gateway.status import build_status
from gateway.store import QueuedInput, RequestRecord, RequestStore, State, TenantFull
from gateway.quotas import Quotas
from gateway.queue_options import priority_rank, validate_start_timeout, validate_webhook_url
from core import tracing
from core.config import Settings
from core.model_key import BaseModelRef
from loraserve.request.validation import validate_input
from loraserve.request import flux
from loraserve.request.flux import validate_flux_input
from loraserve.request.violations import FieldViolation, InvalidInput
from loraserve.v1 import flux_pb2, generation_pb2, generation_pb2_grpc, types_pb2, worker_pb2
from storage.object_store import ObjectStore
from storage.result_urls import with_fresh_urls

MAX_SEED = 2**63 - 1


class GenerationService(generation_pb2_grpc.GenerationServiceServicer):
    def __init__(
        self,
        settings: Settings,
        store: RequestStore,
        feed: ChangeFeed,
        dispatcher: Dispatcher,
        metrics: GatewayMetrics,
        files: ObjectStore,
        auth: Authenticator,
        quotas: Quotas,
    ) -> None:
        self._settings = settings
        self.settings = settings
        self._auth = auth
        self._quotas = quotas
        self._files = files
        self._metrics = metrics
        self._store = store
        self._feed = feed
        self._dispatcher = dispatcher
        self.accepting = True

    async def tenant(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
        """The tenant of the caller's API key (UNAUTHENTICATED when it has none it may use)."""
        return await self._auth.tenant(metadata)

    async def tenant_of_header(self, header: str | None) -> str:
        """As `tenant`, from the HTTP side's `Authorization` header."""
        return await self._auth.tenant_of_header(header)

    async def _caller(self, context: grpc.aio.ServicerContext) -> str:
        return await self.tenant(context.invocation_metadata())

    # --- the core both front doors call (gRPC below, fal's HTTP in gateway/fal_http.py) -----------

    @tracing.traced("gateway.submit", tracing.SpanKind.SERVER)
    async def submit(
        self,
        inp: types_pb2.GenerateInput | flux_pb2.FluxInput,
        *,
        tenant: str,
        client_request_id: str = "",
        start_timeout: float = 0.0,
        priority: str = "",
        webhook_url: str = "",
    ) -> RequestRecord:
        """Validates, admits (quotas) and queues durably; once this returns the request is accepted.

        `inp` is a fal-ai/lora request (GenerateInput) or a fal-ai/flux-lora one (FluxInput), which runs on
        the operator's `flux_model` and is kept in the queue as a QueuedFluxInput."""
        if not self.accepting:
            raise Unavailable("the gateway is shutting down; submit to another gateway or retry")
        try:
            if isinstance(inp, flux_pb2.FluxInput):
                validate_flux_input(inp, self._settings.request_limits)
            else:
                validate_input(inp, self._settings.request_limits)
            validate_start_timeout(start_timeout)
            webhook_url = validate_webhook_url(webhook_url, self._settings)
            rank = priority_rank(priority)
        except (InvalidInput, InvalidArgument):
            self._metrics.rejected.inc()
            raise
        await self._quotas.admit(tenant)
        seed = inp.seed if inp.HasField("seed") else secrets.randbelow(2**32)
        queued: QueuedInput
        if isinstance(inp, flux_pb2.FluxInput):
            key = BaseModelRef.normalised(self._settings.flux_model, "", "").key
            queued = worker_pb2.QueuedFluxInput(input=inp)
        else:
            key = BaseModelRef.normalised(inp.model_name, inp.unet_name, inp.variant).key
            queued = inp
        limits = self._quotas.limits(tenant)
        try:
            record, created = await self._store.add(
                queued,
                seed=seed,
                model_key=key,
                client_request_id=client_request_id,
                start_timeout_seconds=start_timeout,
                tenant=tenant,
                priority=rank,
                weight=limits.weight,
                webhook_url=webhook_url,
                max_waiting=limits.max_waiting,
                trace_context=tracing.traceparent(),
            )
        except TenantFull as full:
            raise self._quotas.tenant_full(tenant, full.waiting) from None
        if not created and (record.flux_input if isinstance(inp, flux_pb2.FluxInput) else record.input) != inp:
            raise AlreadyExists(
                f"client_request_id {client_request_id!r} was used for request {record.id} with another input;"
                " a retry must send the same input, a new request a new client_request_id"
            )
        tracing.annotate(request_id=record.id, tenant=tenant)
        if created:
            self._metrics.accepted(tenant)
            # In fair order a new request may go ahead of others: their positions change.
            self._feed.queue_moved()
            self._dispatcher.prefetch(record)
            self._dispatcher.wake()
        return record

    async def get(self, request_id: str, tenant: str) -> RequestRecord:
        record = await self._store.get(request_id)
        # Another tenant's request is answered exactly like one that does not exist.
        if record is None or record.tenant != tenant:
            raise NotFound(f"no request with id {request_id!r}")
        return record

    async def status(self, record: RequestRecord, logs: bool = False) -> generation_pb2.RequestStatus:
        """Its status as of `record`; with `logs`, every log line so far."""
        entries = (await self._logs(record))[0] if logs else None
        return await build_status(self._store, record, entries)

    async def cancel(self, record: RequestRecord) -> RequestRecord:
        """Cancels a request that has not finished (a no-op for one that has); returns it as it is now."""
        if not record.finished and await self._store.cancel(record.id):
            self._metrics.outcome(record.tenant, "cancelled")
            if record.state == State.IN_PROGRESS:
                self._dispatcher.cancel_running(record.id)
            else:
                self._dispatcher.left_queue(record.id)
            self._feed.changed(record.id)
            if record.state == State.IN_QUEUE:
                self._feed.queue_moved()
            self._dispatcher.wake()
        return await self.get(record.id, record.tenant)

    def open_stream(self, tenant: str) -> AbstractContextManager[None]:
        """One open status stream, within the tenant's and the gateway's limits (RESOURCE_EXHAUSTED beyond)."""
        return self._quotas.stream(tenant)

    async def _logs(self, record: RequestRecord, after: int = 0) -> tuple[list[types_pb2.LogEntry], int]:
        rows = await self._store.logs(record.id, after)
        return [row.entry for row in rows], (rows[-1].seq if rows else after)

    # --- gRPC ---------------------------------------------------------------------------------

    @grpc_errors
    async def Submit(
        self, request: generation_pb2.SubmitRequest, context: grpc.aio.ServicerContext
    ) -> generation_pb2.SubmitResponse:
        record = await self.submit(
            _submitted_input(request),
            tenant=await self._caller(context),
            client_request_id=request.client_request_id,
            start_timeout=request.start_timeout,
            priority=request.priority,
            webhook_url=request.webhook_url,
        )
        return generation_pb2.SubmitResponse(request_id=record.id, status=await self.status(record))

    @grpc_errors
    async def GetStatus(
        self, request: generation_pb2.GetStatusRequest, context: grpc.aio.ServicerContext
    ) -> generation_pb2.GetStatusResponse:
        record = await self.get(request.request_id, await self._caller(context))
        return generation_pb2.GetStatusResponse(status=await self.status(record, request.logs))

    @grpc_errors
    async def StreamStatus(
        self, request: generation_pb2.StreamStatusRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generation_pb2.StreamStatusResponse]:
        tenant = await self._caller(context)
        record = await self.get(request.request_id, tenant)
        with self.open_stream(tenant):
            async for status in self.updates(record, request.logs, previews=request.previews):
                yield generation_pb2.StreamStatusResponse(status=status)

    @grpc_errors
    async def GetResult(
        self, request: generation_pb2.GetResultRequest, context: grpc.aio.ServicerContext
    ) -> generation_pb2.GetResultResponse:
        return self.result(await self.get(request.request_id, await self._caller(context)))

    @grpc_errors
    async def Cancel(
        self, request: generation_pb2.CancelRequest, context: grpc.aio.ServicerContext
    ) -> generation_pb2.CancelResponse:
        record = await self.get(request.request_id, await self._caller(context))
        return generation_pb2.CancelResponse(status=await self.status(await self.cancel(record)))

    @grpc_errors
    async def Subscribe(
        self, request: generation_pb2.SubscribeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generation_pb2.SubscribeResponse]:
        tenant = await self._caller(context)
        with self.open_stream(tenant):
            record = await self.submit(
                _submitted_input(request),
                tenant=tenant,
                client_request_id=request.client_request_id,
                start_timeout=request.start_timeout,
                priority=request.priority,
            )
            async for status in self.updates(record, request.logs, previews=request.previews):
                yield generation_pb2.SubscribeResponse(status=status)
        yield generation_pb2.SubscribeResponse(result=self.result(await self.get(record.id, tenant)))

    async def updates(
        self, record: RequestRecord, logs: bool, *, previews: bool = False
    ) -> AsyncIterator[generation_pb2.RequestStatus]:
        """`record` as just read (or just submitted: a Subscribe starts with IN_QUEUE even when a worker
        takes the request at once), then every change, until the request ends; logs sent once each.
        Woken only by this request's changes, and while it waits by the queue moving (gateway/feed.py)."""
        last: generation_pb2.RequestStatus | None = None
        log_seq = 0
        # Live previews, only to streams that asked (gateway/previews.py).
        preview_stream = PreviewStream(self._store) if previews else None
        with self._feed.watch(record.id) as watch:
            cursor = watch.cursor()
            first = True
            while True:
                if not first:
                    record = await self.get(record.id, record.tenant)
                new_logs: list[types_pb2.LogEntry] = []
                if logs:
                    new_logs, log_seq = await self._logs(record, log_seq)
                status = await build_status(self._store, record, new_logs)
                if preview_stream is not None:
                    await preview_stream.attach(status)
                if status != last:
                    yield status
                    last = generation_pb2.RequestStatus()
                    last.CopyFrom(status)
                    last.ClearField("logs")
                    without_preview(last)
                if record.finished:
                    return
                if self._feed.closed:
                    raise Unavailable("the gateway is shutting down; the request goes on, ask again later")
                if first:
                    # The given record may predate the cursor: read once more before waiting.
                    first = False
                    continue
                cursor = await watch.wait(cursor, in_queue=record.state == State.IN_QUEUE)

    def result(self, record: RequestRecord) -> generation_pb2.GetResultResponse:
        if not record.finished:
            raise FailedPrecondition(f"request {record.id} is {record.state}; its result is not ready")
        if record.error is not None:
            raise RequestFailed.of(record.error)
        if record.expired_at is not None:
            raise ResultExpired(
                f"the result of request {record.id} expired: it finished more than the retention period ago,"
                " and its output files and logs were deleted"
            )
        # Signed now from the stored keys: URLs signed when the request finished expire long before it is deleted.
        output = None if record.output is None else with_fresh_urls(record.output, self._files)
        flux_input = record.flux_input
        if flux_input is not None and output is not None:
            flux_output = flux.output_of(flux_input, output, record.inference_seconds)
            return generation_pb2.GetResultResponse(request_id=record.id, flux_output=flux_output)
        return generation_pb2.GetResultResponse(request_id=record.id, output=output)


def _submitted_input(
    request: generation_pb2.SubmitRequest | generation_pb2.SubscribeRequest,
) -> types_pb2.GenerateInput | flux_pb2.FluxInput:
    """The request's `flux_input` (fal-ai/flux-lora) or `input` (fal-ai/lora); never both."""
    if not request.HasField("flux_input"):
        return request.input
    if request.HasField("input"):
        why = "set either input (a fal-ai/lora request) or flux_input (a fal-ai/flux-lora request), not both"
        raise InvalidInput([FieldViolation("flux_input", why)])
    return request.flux_input
