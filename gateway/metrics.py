"""The gateway's Prometheus metrics (names under `loraserve_`), served at `/metrics`.

Each Gateway has its own registry, so several gateways in one process (tests) do not
collide. Queue depth and in-flight counts are read at scrape time, never kept twice.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Tiny CPU jobs take milliseconds, SDXL at 1024² tens of seconds, queue waits minutes.
SECONDS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class GatewayMetrics:
    def __init__(
        self,
        queue_depth: Callable[[], float],
        in_flight: Callable[[], float],
        open_streams: Callable[[], float] = lambda: 0,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        Gauge(
            "loraserve_status_streams_open",
            "StreamStatus and Subscribe streams open on this gateway.",
            registry=self.registry,
        ).set_function(open_streams)
        Gauge(
            "loraserve_queue_depth", "Requests waiting in the gateway's queue.", registry=self.registry
        ).set_function(queue_depth)
        Gauge(
            "loraserve_requests_in_flight", "Requests handed to workers and not finished.", registry=self.registry
        ).set_function(in_flight)
        self.submitted = Counter("loraserve_requests_submitted", "Requests accepted into the queue.", registry=self.registry)
        # Labelled by tenant: tenant names are limited to a safe charset (gateway/auth.py) and tenants are a few
        # internal teams, so the series stay few; this is what an operator reads per team.
        self.tenant_submitted = Counter(
            "loraserve_tenant_requests_submitted",
            "Requests accepted into the queue, by tenant.",
            ["tenant"],
            registry=self.registry,
        )
        self.tenant_finished = Counter(
            "loraserve_tenant_requests_finished",
            "Requests that ended, by tenant and outcome (completed, failed, cancelled).",
            ["tenant", "outcome"],
            registry=self.registry,
        )
        self.refused = Counter(
            "loraserve_requests_refused",
            "Calls refused over a quota or cap (RESOURCE_EXHAUSTED / HTTP 429), by tenant, the limit (the"
            " QuotaFailure's description, e.g. max_waiting) and its scope (tenant: the tenant's own, gateway: shared).",
            ["tenant", "limit", "scope"],
            registry=self.registry,
        )
        self.rejected = Counter(
            "loraserve_requests_rejected", "Submits refused as invalid.", registry=self.registry
        )
        self.finished = Counter(
            "loraserve_requests_finished",
            "Requests that ended, by outcome (completed, failed, cancelled) and error type.",
            ["outcome", "error_type"],
            registry=self.registry,
        )
        self.retries = Counter(
            "loraserve_worker_retries", "Worker calls that broke and were retried.", registry=self.registry
        )
        self.upkeep_errors = Counter(
            "loraserve_lease_upkeep_errors",
            "Rounds of lease renewal / take-back / start-timeout upkeep that failed (the next one retries).",
            registry=self.registry,
        )
        self.unreached = Counter(
            "loraserve_worker_calls_unreached",
            "Worker calls that never reached a worker (Serve's ingress down or without the app); not attempts.",
            registry=self.registry,
        )
        self.dispatcher_errors = Counter(
            "loraserve_dispatcher_errors",
            "Errors inside the dispatcher (e.g. the store failing); it restarts or gives the request back.",
            registry=self.registry,
        )
        self.dispatch_paused = Gauge(
            "loraserve_dispatch_paused",
            "1 while dispatching is paused: workers unreachable (circuit breaker open) or the dispatcher failing.",
            registry=self.registry,
        )
        self.webhook_attempts = Counter(
            "loraserve_webhook_attempts",
            "Webhook POSTs, by outcome (delivered: a 2xx answer; failed: any other answer, none in time, refused).",
            ["outcome"],
            registry=self.registry,
        )
        self.webhooks_finished = Counter(
            "loraserve_webhooks_finished",
            "Webhook deliveries that ended, by outcome (delivered, given_up after their last retry).",
            ["outcome"],
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "loraserve_queue_wait_seconds",
            "Time from submit to the start on a worker.",
            buckets=SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.inference = Histogram(
            "loraserve_inference_seconds",
            "Generation time on the worker, as the worker measured it.",
            buckets=SECONDS_BUCKETS,
            registry=self.registry,
        )

    def accepted(self, tenant: str) -> None:
        self.submitted.inc()
        self.tenant_submitted.labels(tenant=tenant).inc()

    def outcome(self, tenant: str, outcome: str, error_type: str = "") -> None:
        self.finished.labels(outcome=outcome, error_type=error_type).inc()
        self.tenant_finished.labels(tenant=tenant, outcome=outcome).inc()

    def refusal(self, tenant: str, limit: str, subject: str) -> None:
        """One refusal of `tenant` over `limit`; `subject` as the QuotaFailure names it ("gateway", "tenant:<name>")."""
        self.refused.labels(tenant=tenant, limit=limit, scope=subject.partition(":")[0]).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
