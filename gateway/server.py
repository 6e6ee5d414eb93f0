"""Wires the gateway together: gRPC API (+ health, reflection), dispatcher, HTTP files."""

from __future__ import annotations

import asyncio
import logging
import ssl
from pathlib import Path

import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from core import tracing
from core.backoff import Backoff
from gateway.caller_trace import CallerTrace, caller_trace
from gateway.circuit_breaker import CircuitBreaker
from gateway.auth import Authenticator, auth_required
from gateway.dispatcher import Dispatcher
from gateway.feed import ChangeFeed
from gateway.fal_storage import FalStorage, MultipartSweeper, add_storage_routes, signing_secret
from gateway.fal_http import FalHttp
from gateway.generation_service import GenerationService
from gateway.http_files import make_http_app
from gateway.metrics import GatewayMetrics
from gateway.scheduling import HotFirstOrder
from gateway.storage_service import StorageService
from gateway.lease_keeper import LeaseKeeper
from gateway.retention import RetentionSweeper
from gateway.quotas import Quotas
from gateway.webhook_signing import JWKS_PATH
from gateway.webhooks import WebhookSender, sender_from_settings
from gateway.store import RequestStore, open_store
from gateway.worker_client import WorkerClient
from core.config import Settings
from loraserve.v1 import generation_pb2, generation_pb2_grpc, storage_pb2, storage_pb2_grpc
from storage import from_settings
from storage.object_store import LocalObjectStore, uploads_prefix
from storage.uploads import UploadBudget, Uploads

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name,
    storage_pb2.DESCRIPTOR.services_by_name["StorageService"].full_name,
)


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS for the gRPC port when a certificate is set; with a client CA, callers must present a certificate it signed."""
    if not settings.tls_cert_file:
        return None
    if not settings.tls_key_file:
        raise ValueError("tls_cert_file is set but tls_key_file is not: both are needed for TLS")
    client_ca = Path(settings.tls_client_ca_file).read_bytes() if settings.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(Path(settings.tls_key_file).read_bytes(), Path(settings.tls_cert_file).read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def http_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """TLS on the HTTP port with the gRPC port's certificate: fal's Python client hard-codes https://."""
    if not settings.tls_cert_file:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file or None)
    return context


class Gateway:
    """Built in `start`: opening the store is async (PostgreSQL) and may fail; nothing listens before it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        tracing.setup(settings, "gateway")
        self.files = from_settings.object_store(settings)
        files = self.files
        # Read at scrape time, once `start` has built what they read.
        self.metrics = GatewayMetrics(
            queue_depth=lambda: self.store.known_queue_depth(),
            in_flight=lambda: self.dispatcher.in_flight,
            open_streams=lambda: self.feed.streams,
        )
        # What uploads hold on this gateway (both ports' uploads); retention tells it when uploads were deleted.
        self.upload_budget = UploadBudget(
            max_spools=settings.max_upload_spools,
            tenant_max_spools=settings.tenant_max_upload_spools,
            tenant_max_bytes=settings.tenant_max_upload_bytes,
            stored_bytes=lambda tenant: files.usage(uploads_prefix(tenant)),
            on_refused=self.metrics.refusal,
        )
        self.health = health.aio.HealthServicer()
        self.server = grpc.aio.server(
            interceptors=[CallerTrace()] if tracing.enabled() else None,
            options=[("grpc.max_receive_message_length", 32 * 1024 * 1024)],
        )
        self._http: web.AppRunner | None = None
        self._keeper: LeaseKeeper | None = None
        self.retention: RetentionSweeper | None = None
        self.webhooks: WebhookSender | None = None
        self._multipart_sweeper: MultipartSweeper | None = None
        self.grpc_port = 0

    def _build(self, store: RequestStore) -> None:
        settings = self.settings
        self.store = store
        self.quotas = Quotas(settings, store, on_refused=self.metrics.refusal)
        self.feed = ChangeFeed()
        self.worker = WorkerClient(
            f"{settings.serve_grpc_host}:{settings.serve_grpc_port}",
            settings.serve_app_name,
            call_timeout_seconds=settings.worker_call_timeout_seconds,
            keepalive_seconds=settings.worker_keepalive_seconds,
            keepalive_timeout_seconds=settings.worker_keepalive_timeout_seconds,
            shared_secret=settings.worker_shared_secret,
        )
        retry_backoff = Backoff(settings.retry_backoff_seconds, settings.retry_backoff_max_seconds)
        self.dispatcher = Dispatcher(
            self.store,
            self.feed,
            self.worker,
            self.metrics,
            capacity=settings.dispatch_capacity,
            max_attempts=settings.max_attempts,
            order=HotFirstOrder(
                max_skips=settings.max_queue_skips,
                hot_slots=settings.max_replicas * settings.max_pipelines_per_replica,
            ),
            retry_backoff=retry_backoff,
            breaker=CircuitBreaker(threshold=settings.worker_unreachable_threshold, backoff=retry_backoff),
            on_serving=self._dispatching_health,
            may_run=self.quotas.may_run if self.quotas.limits_running else None,
        )
        # One set of keys for both front doors: required when either port listens beyond loopback.
        required = any(auth_required(host, settings.insecure_no_auth) for host in (settings.grpc_host, settings.http_host))
        self.auth = Authenticator(store, required=required)
        self.generation = GenerationService(
            settings, self.store, self.feed, self.dispatcher, self.metrics, self.files, self.auth, self.quotas
        )
        self.webhooks = sender_from_settings(
            settings, self.store, self.files, self.metrics, on_error=lambda exc: self.metrics.upkeep_errors.inc()
        )
        self._keeper = LeaseKeeper(
            self.store,
            renew=self.dispatcher.renew_leases,
            max_attempts=settings.max_attempts,
            on_change=self._changed,
            on_error=lambda exc: self.metrics.upkeep_errors.inc(),
        )
        # Runs with retention 0 too: the previews of ended requests still go.
        self.retention = RetentionSweeper(
            self.store,
            self.files,
            settings.retention_seconds,
            on_error=lambda exc: self.metrics.upkeep_errors.inc(),
            on_uploads_deleted=self.upload_budget.forget_stored,
        )

    def _changed(self, request_ids: list[str]) -> None:
        """Leases taken back, start timeouts: requests moved in or out of the queue."""
        for request_id in request_ids:
            self.feed.changed(request_id)
        self.feed.queue_moved()
        self.dispatcher.wake()

    def _changed_elsewhere(self, request_id: str, moved_queue: bool) -> None:
        """A NOTIFY from the shared store: wake that request's streams (and the waiting ones when the queue
        moved) and the dispatcher; stop a run cancelled elsewhere. No id: anything may have changed."""
        if not request_id:
            self.feed.everything()
            self.dispatcher.wake()
            return
        self.feed.changed(request_id)
        if moved_queue:
            self.feed.queue_moved()
            self.dispatcher.wake()
        asyncio.get_running_loop().create_task(self.dispatcher.changed_elsewhere(request_id))

    async def start(self) -> None:
        self._build(await open_store(self.settings))
        recovered = await self.store.recover(self.settings.max_attempts)
        if recovered:
            log.info(
                "took back requests that were running when their gateway stopped",
                extra={"requeued": recovered.requeued, "failed": recovered.failed},
            )
        await self.store.listen(self._changed_elsewhere)
        generation_pb2_grpc.add_GenerationServiceServicer_to_server(self.generation, self.server)
        files = self.files
        uploads = Uploads(
            files,
            max_bytes=self.settings.max_upload_bytes,
            allowed_content_types=from_settings.upload_content_types(self.settings),
            spool_dir=self.settings.data_dir / "spool",
            budget=self.upload_budget,
        )
        storage_pb2_grpc.add_StorageServiceServicer_to_server(StorageService(uploads, auth=self.auth), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        address = f"{self.settings.grpc_host}:{self.settings.grpc_port}"
        credentials = server_credentials(self.settings)
        self.grpc_port = (
            self.server.add_secure_port(address, credentials)
            if credentials is not None
            else self.server.add_insecure_port(address)
        )
        await self.server.start()
        local_files = self.files if isinstance(self.files, LocalObjectStore) else None
        http_app = make_http_app(local_files, self.metrics)
        if tracing.enabled():
            http_app.middlewares.append(caller_trace)
        fal_http = FalHttp(self.generation, self.settings.trusted_proxies, keys_required=self.auth.required)
        storage = FalStorage(
            uploads,
            self.auth,
            secret=signing_secret(self.settings),
            public_base=fal_http.public_base,
            min_part_bytes=self.settings.upload_min_part_bytes,
        )
        self.fal_storage = storage
        self._multipart_sweeper = MultipartSweeper(storage, on_error=lambda exc: self.metrics.upkeep_errors.inc())
        add_storage_routes(http_app, storage)
        self._http = web.AppRunner(http_app, access_log=None)
        assert self.webhooks is not None
        self._http.app.router.add_get(JWKS_PATH, self.webhooks.signer.serve_jwks)
        # fal's queue routes are catch-alls at the root: mounted after every other route.
        fal_http.mount(self._http.app)
        await self._http.setup()
        await web.TCPSite(
            self._http, self.settings.http_host, self.settings.http_port, ssl_context=http_ssl_context(self.settings)
        ).start()
        self.dispatcher.start()
        self.dispatcher.wake()
        assert self._keeper is not None
        self._keeper.start()
        if self.retention is not None:
            self.retention.start()
        self._multipart_sweeper.start()
        # Deliveries left by a gateway that stopped (this one before a restart, or another) go out now.
        self.webhooks.start()
        for name in ("", *SERVICE_NAMES):
            await self._set_health(name, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "gateway started",
            extra={"grpc_port": self.grpc_port, "http_port": self.settings.http_port, "workers": self.worker_target},
        )

    @property
    def worker_target(self) -> str:
        return f"{self.settings.serve_grpc_host}:{self.settings.serve_grpc_port}"

    async def _dispatching_health(self, serving: bool) -> None:
        """While the dispatcher is paused (workers unreachable) the GenerationService reports NOT_SERVING:
        submits are still accepted and wait in the queue; the overall health and the files stay SERVING."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        await self._set_health(SERVICE_NAMES[0], status)

    async def _set_health(self, name: str, status: int) -> None:
        await self.health.set(name, status)

    async def stop(self, grace_seconds: float | None = None) -> None:
        """Stops accepting, lets running requests finish within the grace period, then closes."""
        grace = self.settings.shutdown_grace_seconds if grace_seconds is None else grace_seconds
        self.generation.accepting = False
        log.info("gateway stopping", extra={"grace_seconds": grace})
        for name in ("", *SERVICE_NAMES):
            await self._set_health(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.dispatcher.shutdown(grace)
        if self._keeper is not None:
            await self._keeper.stop()
        if self.retention is not None:
            await self.retention.stop()
        if self._multipart_sweeper is not None:
            await self._multipart_sweeper.stop()
        if self.webhooks is not None:
            await self.webhooks.stop()
        self.feed.close()
        await self.server.stop(grace=1.0)
        if self._http is not None:
            await self._http.cleanup()
        await self.worker.close()
        await self.store.close()
