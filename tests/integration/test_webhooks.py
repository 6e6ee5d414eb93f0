"""Webhooks through a running gateway, to a real receiver on loopback.

Each test starts its own gateway on the session's workers (the stack's settings, small backoffs)
and submits over gRPC with `webhook_url`. The receiver checks every delivery the way fal's docs
tell a receiver to: the X-Fal-Webhook-* headers, a timestamp within 5 minutes, and the Ed25519
signature over `request_id\\nuser_id\\ntimestamp\\nsha256hex(body)` verified with PyNaCl against
the keys of the gateway's own `/.well-known/jwks.json`, `x` decoded with
`base64.urlsafe_b64decode` without re-padding, exactly as the docs' snippet does.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import nacl.exceptions
import nacl.signing
import pytest
from aiohttp import web

from gateway.server import Gateway
from gateway.store import WebhookDelivery
from loraserve.client import AsyncClient, LoraServeError
from core.config import Settings
from loraserve.v1.generation_pb2 import REQUEST_STATE_COMPLETED as COMPLETED
from serving.tiny import TinyModel
from tests.conftest import free_port, gateway_for
from tests.integration.test_generation_api import request

pytestmark = pytest.mark.integration

WAIT_SECONDS = 120.0
HEADERS = ("X-Fal-Webhook-Request-Id", "X-Fal-Webhook-User-Id", "X-Fal-Webhook-Timestamp", "X-Fal-Webhook-Signature")


@dataclass(frozen=True)
class Received:
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    arrived: float

    def json(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.body)
        return parsed


class Receiver:
    """An HTTP server on loopback that records every POST and answers with the next of `statuses` (then 200)."""

    def __init__(self, statuses: tuple[int, ...] = ()) -> None:
        self._statuses = list(statuses)
        self.received: asyncio.Queue[Received] = asyncio.Queue()
        self.port = free_port()
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app)

    def url(self, path: str = "/hook?a=1&b=2", host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    async def _handle(self, req: web.Request) -> web.Response:
        body = await req.read()
        await self.received.put(Received(req.path, req.query_string, dict(req.headers), body, time.time()))
        return web.Response(status=self._statuses.pop(0) if self._statuses else 200, text="ok")

    async def next(self) -> Received:
        return await asyncio.wait_for(self.received.get(), WAIT_SECONDS)

    async def __aenter__(self) -> Receiver:
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self._runner.cleanup()


def fetch_jwks(http_port: int) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/.well-known/jwks.json", timeout=30) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("application/json")
        keys: list[dict[str, Any]] = json.load(response)["keys"]
    return keys


def verify_webhook_signature(
    request_id: str, user_id: str, timestamp: str, signature_hex: str, body: bytes, public_keys: list[dict[str, Any]]
) -> bool:
    """fal's documented Python verification ("Verifying Your Webhook"), with PyNaCl, unchanged but for
    the JWKS, which is the gateway's."""
    try:
        timestamp_int = int(timestamp)
        current_time = int(time.time())
        if abs(current_time - timestamp_int) > 300:
            return False
    except ValueError:
        return False
    message_parts = [request_id, user_id, timestamp, hashlib.sha256(body).hexdigest()]
    if any(part is None for part in message_parts):
        return False
    message_to_verify = "\n".join(message_parts).encode("utf-8")
    try:
        signature_bytes = bytes.fromhex(signature_hex)
    except ValueError:
        return False
    for key_info in public_keys:
        try:
            public_key_b64url = key_info.get("x")
            if isinstance(public_key_b64url, str):
                public_key_bytes = base64.urlsafe_b64decode(public_key_b64url)
                verify_key = nacl.signing.VerifyKey(public_key_bytes)
                verify_key.verify(message_to_verify, signature_bytes)
                return True
        except (nacl.exceptions.BadSignatureError, ValueError, TypeError):
            continue
    return False


def verified(delivery: Received, keys: list[dict[str, Any]]) -> bool:
    h = delivery.headers
    if not all(h.get(name) for name in HEADERS):
        return False
    return verify_webhook_signature(
        h["X-Fal-Webhook-Request-Id"],
        h["X-Fal-Webhook-User-Id"],
        h["X-Fal-Webhook-Timestamp"],
        h["X-Fal-Webhook-Signature"],
        delivery.body,
        keys,
    )


@pytest.fixture
def gateway_settings(stack: Any, stack_settings: Settings, postgres_dsn: str) -> Settings:
    """A gateway of its own on the session's workers (PostgreSQL store: no lock on the shared data dir)."""
    return stack_settings.replace(
        grpc_port=free_port(),
        http_port=free_port(),
        store_url=postgres_dsn,
        public_url=stack_settings.files_base_url,
        webhook_backoff_seconds=0.05,
        webhook_backoff_max_seconds=0.1,
        webhook_retries=3,
        webhook_timeout_seconds=10.0,
        # The receiver listens on loopback: allowed by name here, as an operator allows an internal receiver.
        fetch_allowed_hosts="127.0.0.1",
    )


async def until(check: Callable[[], Any], what: str) -> Any:
    """Polls the store-side condition `check` (a coroutine function) until it holds."""
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        if value := await check():
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def stored(gateway: Gateway, request_id: str, *, finished: bool) -> WebhookDelivery:
    async def check() -> WebhookDelivery | None:
        row = await gateway.store.webhook(request_id)
        if row is None or (finished and row.delivered_at is None and row.given_up_at is None):
            return None
        return row

    found: WebhookDelivery = await until(check, f"the webhook row of {request_id}")
    return found


def metric(gateway: Gateway, name: str, outcome: str) -> float:
    value = gateway.metrics.registry.get_sample_value(name, {"outcome": outcome})
    return value or 0.0


async def test_a_completed_request_is_delivered_with_fals_body_and_a_verifiable_signature(
    gateway_settings: Settings, tiny_sdxl: TinyModel
) -> None:
    async with Receiver() as receiver, gateway_for(gateway_settings) as gateway:
        async with AsyncClient(f"127.0.0.1:{gateway.grpc_port}") as client:
            request_id = await client.submit(request(tiny_sdxl, seed=31337), webhook_url=receiver.url())
            delivery = await receiver.next()
            result = await client.result(request_id)

        # POSTed to the URL as given, its own query string included.
        assert (delivery.path, delivery.query) == ("/hook", "a=1&b=2")
        assert delivery.headers["Content-Type"] == "application/json"
        body = delivery.json()
        # fal's template: keys sorted, Python's default separators, `error: null` on success.
        assert delivery.body == json.dumps(body, sort_keys=True).encode()
        assert set(body) == {"error", "gateway_request_id", "payload", "request_id", "status"}
        assert (body["request_id"], body["gateway_request_id"], body["status"], body["error"]) == (
            request_id,
            request_id,
            "OK",
            None,
        )
        payload = body["payload"]
        assert payload["seed"] == 31337 == result.data.seed and isinstance(payload["seed"], int)
        assert [(i["width"], i["height"]) for i in payload["images"]] == [(64, 64)]
        assert payload["images"][0]["url"].split("?")[0] == result.data.images[0].url.split("?")[0]
        assert payload["has_nsfw_concepts"] == [False]

        h = delivery.headers
        assert h["X-Fal-Webhook-Request-Id"] == request_id
        assert h["X-Fal-Webhook-User-Id"] == "anonymous"
        assert h["X-Fal-Webhook-Timestamp"].isdigit()
        assert abs(int(h["X-Fal-Webhook-Timestamp"]) - delivery.arrived) < 60
        signature = h["X-Fal-Webhook-Signature"]
        assert len(signature) == 128 and signature == signature.lower()

        keys = await asyncio.to_thread(fetch_jwks, gateway_settings.http_port)
        (key,) = keys
        assert {k: key[k] for k in ("kty", "crv", "alg", "use")} == {
            "kty": "OKP",
            "crv": "Ed25519",
            "alg": "EdDSA",
            "use": "sig",
        }
        assert key["kid"] and len(key["x"]) == 44 and key["x"].endswith("="), "padded, for the docs' Python snippet"
        assert verified(delivery, keys)
        tampered = Received(delivery.path, delivery.query, delivery.headers, delivery.body + b" ", delivery.arrived)
        assert not verified(tampered, keys)

        row = await stored(gateway, request_id, finished=True)
        assert row.delivered_at is not None and row.attempts == 1 and row.last_status == 200
        assert row.body == delivery.body
        assert metric(gateway, "loraserve_webhook_attempts_total", "delivered") == 1
        assert metric(gateway, "loraserve_webhooks_finished_total", "delivered") == 1


async def test_a_failed_request_is_delivered_as_fals_error(
    gateway_settings: Settings, tiny_sdxl: TinyModel, tmp_path: Path
) -> None:
    missing = str(tmp_path / "no-such-model")
    async with Receiver() as receiver, gateway_for(gateway_settings) as gateway:
        async with AsyncClient(f"127.0.0.1:{gateway.grpc_port}") as client:
            request_id = await client.submit(request(tiny_sdxl, model_name=missing), webhook_url=receiver.url())
            delivery = await receiver.next()
            with pytest.raises(LoraServeError) as failed:
                await client.result(request_id)
        assert failed.value.reason == "MODEL_LOAD_FAILED"
        body = delivery.json()
        assert delivery.body == json.dumps(body, sort_keys=True).encode()
        assert (body["request_id"], body["status"], body["error"]) == (request_id, "ERROR", "Invalid status code: 422")
        (detail,) = body["payload"]["detail"]
        assert detail["loc"] == ["body"] and missing in detail["msg"] and detail["type"] == "value_error"
        assert verified(delivery, await asyncio.to_thread(fetch_jwks, gateway_settings.http_port))


async def test_a_receiver_failing_gets_a_retry_with_the_same_body_and_a_fresh_signature(
    gateway_settings: Settings, tiny_sdxl: TinyModel
) -> None:
    # A backoff of 1-2 s puts the retry in a later second than the first attempt: a fresh timestamp.
    settings = gateway_settings.replace(webhook_backoff_seconds=2.0, webhook_backoff_max_seconds=2.0)
    async with Receiver(statuses=(500,)) as receiver, gateway_for(settings) as gateway:
        async with AsyncClient(f"127.0.0.1:{gateway.grpc_port}") as client:
            request_id = await client.submit(request(tiny_sdxl, seed=5), webhook_url=receiver.url())
            first = await receiver.next()
            second = await receiver.next()
        assert second.body == first.body
        assert int(second.headers["X-Fal-Webhook-Timestamp"]) > int(first.headers["X-Fal-Webhook-Timestamp"])
        assert second.headers["X-Fal-Webhook-Signature"] != first.headers["X-Fal-Webhook-Signature"]
        keys = await asyncio.to_thread(fetch_jwks, settings.http_port)
        assert verified(first, keys) and verified(second, keys)
        row = await stored(gateway, request_id, finished=True)
        assert (row.attempts, row.last_status, row.delivered_at is not None) == (2, 200, True)
        assert metric(gateway, "loraserve_webhook_attempts_total", "failed") == 1
        assert metric(gateway, "loraserve_webhook_attempts_total", "delivered") == 1


async def test_a_receiver_that_keeps_failing_is_given_up_after_the_last_retry(
    gateway_settings: Settings, tiny_sdxl: TinyModel
) -> None:
    settings = gateway_settings.replace(webhook_retries=2)
    async with Receiver(statuses=(503, 500, 404, 200)) as receiver, gateway_for(settings) as gateway:
        async with AsyncClient(f"127.0.0.1:{gateway.grpc_port}") as client:
            request_id = await client.submit(request(tiny_sdxl, seed=6), webhook_url=receiver.url())
        attempts = [await receiver.next() for _ in range(3)]
        row = await stored(gateway, request_id, finished=True)
        assert row.given_up_at is not None and row.delivered_at is None
        assert (row.attempts, row.last_status) == (3, 404)
        assert len({a.body for a in attempts}) == 1
        assert receiver.received.empty(), "nothing after the last retry"
        assert metric(gateway, "loraserve_webhooks_finished_total", "given_up") == 1


@pytest.mark.parametrize("engine", ["sqlite", "postgres"])
async def test_a_delivery_pending_when_the_gateway_stops_goes_out_after_it_restarts(
    engine: str, gateway_settings: Settings, tiny_sdxl: TinyModel, tmp_path: Path
) -> None:
    settings = gateway_settings
    if engine == "sqlite":
        settings = settings.replace(store_url="", data_dir=tmp_path / "gateway-data")
    async with Receiver() as receiver:
        async with gateway_for(settings) as gateway:
            # As if the gateway died right after the request ended: its sender never gets to the delivery.
            assert gateway.webhooks is not None
            await gateway.webhooks.stop()
            async with AsyncClient(f"127.0.0.1:{gateway.grpc_port}") as client:
                request_id = await client.submit(request(tiny_sdxl, seed=8), webhook_url=receiver.url())
                async for status in client.stream_status(request_id):
                    final = status
            assert final.state == COMPLETED and not final.HasField("error")
            pending = await stored(gateway, request_id, finished=False)
            assert pending.attempts == 0 and pending.delivered_at is None
        assert receiver.received.empty()

        async with gateway_for(settings) as restarted:
            delivery = await receiver.next()
            assert delivery.json()["request_id"] == request_id and delivery.json()["status"] == "OK"
            assert verified(delivery, await asyncio.to_thread(fetch_jwks, settings.http_port))
            assert (await stored(restarted, request_id, finished=True)).delivered_at is not None


async def test_webhook_urls_pass_the_input_guard(gateway_settings: Settings, tiny_sdxl: TinyModel) -> None:
    strict = gateway_settings.replace(fetch_allowed_hosts="", allow_private_networks=False)
    async with Receiver() as receiver, gateway_for(strict) as gateway:
        async with AsyncClient(f"127.0.0.1:{gateway.grpc_port}") as client:
            for url, why in (
                (receiver.url(), "loopback"),
                ("http://10.1.2.3/hook", "private"),
                ("http://169.254.169.254/latest", "metadata"),
                ("ftp://example.com/hook", "http and https"),
                ("https://user:pw@example.com/hook", "user name"),
                ("https://example.com/" + "x" * 3000, "longer than"),
            ):
                with pytest.raises(LoraServeError) as refused:
                    await client.submit(request(tiny_sdxl), webhook_url=url)
                assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT, url
                assert why in refused.value.field_violations["webhook_url"], (url, refused.value.field_violations)

            # A name is resolved when the webhook is sent: `localhost` passes Submit and is refused then.
            request_id = await client.submit(
                request(tiny_sdxl, seed=9), webhook_url=receiver.url(host="localhost")
            )
            row = await stored(gateway, request_id, finished=False)

            async def refused_once() -> WebhookDelivery | None:
                current = await gateway.store.webhook(request_id)
                return current if current is not None and current.attempts >= 1 else None

            row = await until(refused_once, "a refused attempt")
            assert "loopback" in row.last_error and row.last_status is None
            assert receiver.received.empty()
