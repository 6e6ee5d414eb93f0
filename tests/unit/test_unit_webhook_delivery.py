"""The webhook sender against real receivers on loopback, with the real SQLite store: one tenant's receiver
that never answers does not hold back another tenant's delivery, and an attempt that fails in an
unexpected way (a header that cannot be sent) is recorded and given up like any failed attempt."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.metrics import GatewayMetrics
from gateway.store import WebhookDelivery
from gateway.store_sqlite import SqliteStore
from gateway.webhook_signing import WebhookSigner
from gateway.webhooks import MAX_CONCURRENT, WebhookSender, webhook_policy
from core.backoff import Backoff
from core.config import Settings
from storage.object_store import LocalObjectStore
from tests.conftest import free_port
from tests.unit.test_unit_store import inp
from tests.unit.worker_testkit import wait_until

# Far longer than any test runs: an attempt to the hanging receiver ends only when the test releases it.
NEVER_SECONDS = 600.0
TENANT_CAP = 2


@dataclass
class Receivers:
    """`/hang` never answers until `release`; `/ok` answers 200 and sets `ok_arrived`."""

    port: int = field(default_factory=free_port)
    hanging: int = 0
    most_hanging: int = 0
    release: asyncio.Event = field(default_factory=asyncio.Event)
    ok_arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def hang(self, req: web.Request) -> web.Response:
        await req.read()
        self.hanging += 1
        self.most_hanging = max(self.most_hanging, self.hanging)
        try:
            await self.release.wait()
        finally:
            self.hanging -= 1
        return web.Response(text="late")

    async def ok(self, req: web.Request) -> web.Response:
        await req.read()
        self.ok_arrived.set()
        return web.Response(text="ok")


@pytest.fixture
async def receivers() -> AsyncIterator[Receivers]:
    found = Receivers()
    app = web.Application()
    app.router.add_post("/hang", found.hang)
    app.router.add_post("/ok", found.ok)
    runner = web.AppRunner(app, shutdown_timeout=0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", found.port).start()
    yield found
    found.release.set()
    await runner.cleanup()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    opened = SqliteStore(tmp_path / "requests.sqlite3")
    yield opened
    await opened.close()


def sender(store: SqliteStore, tmp_path: Path, *, retries: int, errors: list[BaseException]) -> WebhookSender:
    settings = Settings(fetch_allowed_hosts="127.0.0.1", webhook_timeout_seconds=NEVER_SECONDS)
    return WebhookSender(
        store,
        WebhookSigner(Ed25519PrivateKey.generate()),
        LocalObjectStore(tmp_path / "files", "http://127.0.0.1:1", signing_key=b"k" * 32),
        webhook_policy(settings),
        GatewayMetrics(lambda: 0, lambda: 0),
        timeout_seconds=NEVER_SECONDS,
        retries=retries,
        backoff=Backoff(0.01, 0.02),
        on_error=errors.append,
        tenant_max_concurrent=TENANT_CAP,
    )


async def ended_with_webhook(store: SqliteStore, tenant: str, url: str) -> str:
    """A request of `tenant` that was cancelled: its delivery is due at once."""
    record, _ = await store.add(inp(), seed=7, model_key="key", tenant=tenant, webhook_url=url)
    assert await store.cancel(record.id)
    return record.id


async def delivery(store: SqliteStore, request_id: str) -> WebhookDelivery:
    found = await store.webhook(request_id)
    assert found is not None
    return found


async def test_a_tenant_whose_receiver_hangs_does_not_hold_back_another_tenants_delivery(
    store: SqliteStore, receivers: Receivers, tmp_path: Path
) -> None:
    # More of the hanging tenant's deliveries than the gateway attempts at once, all older than the other's.
    for _ in range(MAX_CONCURRENT + 8):
        await ended_with_webhook(store, "hangs", receivers.url("/hang"))
    other = await ended_with_webhook(store, "answers", receivers.url("/ok"))
    errors: list[BaseException] = []
    running = sender(store, tmp_path, retries=3, errors=errors)
    running.start()
    try:
        await asyncio.wait_for(receivers.ok_arrived.wait(), 60)

        async def recorded() -> bool:
            return (await delivery(store, other)).delivered_at is not None

        await wait_until(recorded, "the other tenant's delivery is recorded as delivered")
        # The hanging tenant holds its share of attempts, no more.
        assert receivers.hanging <= TENANT_CAP and receivers.most_hanging <= TENANT_CAP
        assert not errors
    finally:
        receivers.release.set()
        await running.stop()


async def test_an_unexpected_error_in_an_attempt_is_recorded_and_the_delivery_given_up(
    store: SqliteStore, receivers: Receivers, tmp_path: Path
) -> None:
    """A tenant name that cannot go in an HTTP header (made before tenant names were checked) fails
    every attempt with UnicodeEncodeError: each is a failed attempt, and the last gives up."""
    request_id = await ended_with_webhook(store, "团队", receivers.url("/ok"))
    errors: list[BaseException] = []
    running = sender(store, tmp_path, retries=1, errors=errors)
    running.start()
    try:

        async def given_up() -> bool:
            return (await delivery(store, request_id)).given_up_at is not None

        await wait_until(given_up, "the delivery is given up")
    finally:
        await running.stop()
    ended = await delivery(store, request_id)
    assert ended.attempts == 2 and ended.delivered_at is None
    assert "UnicodeEncodeError" in ended.last_error
    assert not errors and not receivers.ok_arrived.is_set()
