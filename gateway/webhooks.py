"""Webhook delivery: when a request ends, its result (or error) is POSTed to the URL it was submitted
with (fal's `fal_webhook`, SubmitRequest.webhook_url), as fal delivers it.

The body is fal's: `{"error", "gateway_request_id", "payload", "request_id", "status"}` (plus
`payload_error` when the output cannot be serialised), keys sorted, Python's default separators;
the payload is the output JSON the result route returns, or for a failed request the error body
it returns with `error: "Invalid status code: <its HTTP status>"`. It is built once, at the first
attempt, and stored: every retry sends the same bytes, signed again with a fresh timestamp
(gateway/webhook_signing.py).

Deliveries are rows of the store, made in the transaction that ends the request, so a gateway
that dies loses none: any gateway (the same one restarted, or another on PostgreSQL) claims due
deliveries, one sender at a time per delivery, and a claim left by a dead sender runs out. A
non-2xx answer, no answer within `webhook_timeout_seconds`, or a refused or unreachable target
is retried with backoff `webhook_retries` times (about 2 hours by default), then given up; both
are recorded on the row and counted in metrics, as is any unexpected error of an attempt. Due
deliveries are taken in turns across tenants, at most `webhook_tenant_max_concurrent` in flight per
tenant on a gateway, so a tenant whose receiver hangs delays only its own. The target passes the same guard as file inputs
(storage/fetch.py): private addresses only with `allow_private_networks` or `fetch_allowed_hosts`.
Receivers must be idempotent on `request_id`: a sender that dies after the receiver answered but
before the row was updated sends the delivery again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from gateway.errors import RequestFailed, ResultExpired, to_http
from gateway.fal_output import output_json
from gateway.metrics import GatewayMetrics
from gateway.periodic import Periodic
from gateway.store import RequestRecord, RequestStore, WebhookDelivery
from loraserve.request import flux
from gateway.webhook_signing import WebhookSigner
from core.backoff import Backoff
from core.config import Settings
from core.redaction import redact_url
from storage import from_settings
from storage.fetch import FetchPolicy, InputFetchError, post
from storage.object_store import ObjectStore
from storage.result_urls import with_fresh_urls

log = logging.getLogger(__name__)

FIELD = "webhook_url"
# fal's words when the output is not JSON-serialisable (the delivery still goes out, without the payload).
PAYLOAD_ERROR = (
    "Response payload is not JSON serializable. Either return a JSON serializable object or use the queue"
    " endpoint to retrieve the response."
)
# The X-Fal-Webhook-User-Id of requests made without an API key (a verifier refuses an empty header).
ANONYMOUS_USER = "anonymous"
# Deliveries attempted at once by one gateway; more wait for the next round.
MAX_CONCURRENT = 32
# Threads for the POSTs: an attempt that timed out may hold its thread until its socket times out too,
# so there are more than MAX_CONCURRENT (the default executor has as few as 6 on a small machine).
POST_THREADS = 2 * MAX_CONCURRENT
# A round looks for due retries this often, at most (a request ending wakes it at once).
MAX_PERIOD_SECONDS = 1.0
# How long the file URLs of a payload stay valid after the last retry could have been sent.
RECEIVER_URL_GRACE_SECONDS = 24 * 3600.0


def webhook_body(record: RequestRecord, files: ObjectStore, url_seconds: float | None = None) -> bytes:
    """fal's webhook body for a finished request, as the bytes every attempt sends; its file URLs are
    valid for `url_seconds` (None: the store's setting)."""
    body: dict[str, Any] = {"request_id": record.id, "gateway_request_id": record.id, "error": None}
    failure: RequestFailed | ResultExpired | None = None
    if record.error is not None:
        failure = RequestFailed.of(record.error)
    elif record.output is None:
        failure = ResultExpired(f"the result of request {record.id} expired before its webhook was sent")
    if failure is not None:
        answer = to_http(failure)
        body.update(status="ERROR", error=f"Invalid status code: {answer.status}", payload=answer.body)
        return json.dumps(body, sort_keys=True).encode()
    assert record.output is not None
    body["status"] = "OK"
    try:
        output = with_fresh_urls(record.output, files, url_seconds)
        flux_input = record.flux_input
        if flux_input is not None:
            body["payload"] = flux.output_json(flux.output_of(flux_input, output, record.inference_seconds))
        else:
            body["payload"] = output_json(output)
        return json.dumps(body, sort_keys=True).encode()
    except Exception:  # noqa: BLE001 - any output that cannot become JSON is fal's payload_error, not a lost delivery
        log.exception("a webhook payload could not be serialised", extra={"request_id": record.id})
        body.update(payload=None, payload_error=PAYLOAD_ERROR)
        return json.dumps(body, sort_keys=True).encode()


class WebhookSender(Periodic):
    name = "webhook delivery"

    def __init__(
        self,
        store: RequestStore,
        signer: WebhookSigner,
        files: ObjectStore,
        policy: FetchPolicy,
        metrics: GatewayMetrics,
        *,
        timeout_seconds: float,
        retries: int,
        backoff: Backoff,
        on_error: Callable[[BaseException], None],
        tenant_max_concurrent: int = 0,
    ) -> None:
        super().__init__(min(MAX_PERIOD_SECONDS, max(0.05, backoff.initial_seconds / 2)), on_error)
        self._store = store
        self._signer = signer
        self._files = files
        self._policy = policy
        self._metrics = metrics
        self._timeout = timeout_seconds
        self._retries = retries
        self._backoff = backoff
        # Long enough for building the body and one attempt; a sender that dies holds a delivery no longer.
        self._claim_seconds = timeout_seconds + 60.0
        # Every attempt sends the body built for the first, so its file URLs must outlast the last retry,
        # and then leave the receiver a day to fetch them.
        self._url_seconds = (
            sum(backoff.ceiling(n) for n in range(1, retries + 1))
            + (retries + 1) * (timeout_seconds + self._claim_seconds)
            + RECEIVER_URL_GRACE_SECONDS
        )
        self._sending: set[asyncio.Task[None]] = set()
        # Attempts in flight per tenant: a tenant at `tenant_max_concurrent` gets no more until one ends,
        # so its receiver hanging delays only its own deliveries.
        self._tenant_max = tenant_max_concurrent
        self._per_tenant: dict[str, int] = {}
        self._threads = ThreadPoolExecutor(POST_THREADS, thread_name_prefix="webhook")

    @property
    def signer(self) -> WebhookSigner:
        return self._signer

    async def run_once(self) -> int:
        """Claims the due deliveries there is room for and starts sending them; returns how many."""
        room = MAX_CONCURRENT - len(self._sending)
        if room <= 0:
            return 0
        claimed = await self._store.claim_webhooks(
            room, self._claim_seconds, per_tenant=self._tenant_max, sending=dict(self._per_tenant)
        )
        for delivery in claimed:
            task = asyncio.get_running_loop().create_task(self._deliver(delivery), name="webhook")
            self._sending.add(task)
            self._per_tenant[delivery.tenant] = self._per_tenant.get(delivery.tenant, 0) + 1
            task.add_done_callback(functools.partial(self._sent, delivery.tenant))
        return len(claimed)

    def _sent(self, tenant: str, task: asyncio.Task[None]) -> None:
        self._sending.discard(task)
        left = self._per_tenant.pop(tenant, 0) - 1
        if left > 0:
            self._per_tenant[tenant] = left
        if not task.cancelled() and task.exception() is not None:
            # The store failed while recording: the claim runs out and the delivery is tried again.
            self._on_error(task.exception() or RuntimeError("webhook task failed"))
        # Room for more: due deliveries left waiting go now.
        self.wake()

    async def stop(self) -> None:
        """Stops looking for deliveries and abandons attempts in flight (their claims run out; they are sent again)."""
        await super().stop()
        for task in list(self._sending):
            task.cancel()
        await asyncio.gather(*self._sending, return_exceptions=True)
        self._threads.shutdown(wait=False, cancel_futures=True)

    async def _deliver(self, delivery: WebhookDelivery) -> None:
        token = delivery.claim_token
        body = delivery.body
        if body is None:
            record = await self._store.get(delivery.request_id)
            if record is None:
                await self._record(delivery, status=None, error="the request no longer exists", give_up=True)
                return
            body = await self._store.set_webhook_body(
                delivery.request_id,
                token,
                await asyncio.to_thread(webhook_body, record, self._files, self._url_seconds),
            )
            if body is None:
                return  # the claim ran out and another sender has it
        status, error = await self._attempt(delivery, body)
        if status is not None and 200 <= status < 300:
            await self._record(delivery, status=status, error="", delivered=True)
            return
        await self._record(delivery, status=status, error=error, give_up=delivery.attempts + 1 > self._retries)

    async def _attempt(self, delivery: WebhookDelivery, body: bytes) -> tuple[int | None, str]:
        """(HTTP status, error) of one POST: status None when no answer came."""
        try:
            headers = {
                "Content-Type": "application/json",
                **self._signer.headers(delivery.request_id, delivery.tenant or ANONYMOUS_USER, body),
            }
            sending = asyncio.get_running_loop().run_in_executor(
                self._threads, post, delivery.url, body, headers, FIELD, self._policy
            )
            status = await asyncio.wait_for(sending, self._timeout)
        except TimeoutError:
            return None, f"no answer within {self._timeout:g} s"
        except InputFetchError as exc:
            return None, exc.reason
        except Exception as exc:  # noqa: BLE001 - a failed attempt, retried and given up like any other
            log.exception("webhook attempt failed unexpectedly", extra={"request_id": delivery.request_id})
            return None, f"the delivery failed: {type(exc).__name__}: {exc}"
        return status, "" if 200 <= status < 300 else f"the receiver answered HTTP {status}"

    async def _record(
        self,
        delivery: WebhookDelivery,
        *,
        status: int | None,
        error: str,
        delivered: bool = False,
        give_up: bool = False,
    ) -> None:
        attempts = delivery.attempts + 1
        retry_in = None if delivered or give_up else self._backoff.delay(attempts)
        recorded = await self._store.webhook_attempted(
            delivery.request_id,
            delivery.claim_token,
            status=status,
            error=error,
            delivered=delivered,
            retry_in_seconds=retry_in,
        )
        outcome = "delivered" if delivered else "given_up" if give_up else "retrying"
        self._metrics.webhook_attempts.labels(outcome="delivered" if delivered else "failed").inc()
        if delivered or give_up:
            self._metrics.webhooks_finished.labels(outcome=outcome).inc()
        extra = {
            "request_id": delivery.request_id,
            "url": redact_url(delivery.url),
            "attempt": attempts,
            "status": status,
            "error": error,
            "recorded": recorded,
        }
        if delivered:
            log.info("webhook delivered", extra=extra)
        elif give_up:
            log.warning("webhook given up", extra=extra)
        else:
            log.info("webhook attempt failed; retrying", extra={**extra, "retry_in": retry_in})


def webhook_policy(settings: Settings) -> FetchPolicy:
    """The input guard (allow_private_networks, fetch_allowed_hosts) with the webhook's timeout."""
    return dataclasses.replace(
        from_settings.image_fetch_policy(settings),
        timeout_seconds=settings.webhook_timeout_seconds,
        total_timeout_seconds=settings.webhook_timeout_seconds,
    )


def sender_from_settings(
    settings: Settings,
    store: RequestStore,
    files: ObjectStore,
    metrics: GatewayMetrics,
    on_error: Callable[[BaseException], None],
) -> WebhookSender:
    """The gateway's sender, woken by the store whenever a request with a webhook ends."""
    sender = WebhookSender(
        store,
        WebhookSigner.from_settings(settings),
        files,
        webhook_policy(settings),
        metrics,
        timeout_seconds=settings.webhook_timeout_seconds,
        retries=settings.webhook_retries,
        backoff=Backoff(settings.webhook_backoff_seconds, settings.webhook_backoff_max_seconds),
        on_error=on_error,
        tenant_max_concurrent=settings.webhook_tenant_max_concurrent,
    )
    store.on_webhook_due(sender.wake)
    return sender
