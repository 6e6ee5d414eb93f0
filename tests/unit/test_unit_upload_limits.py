"""What uploads may hold on a running gateway (its gRPC and HTTP ports on loopback, keys required; no workers
are needed to take files): descriptors while thousands of parts arrive, one reservation shared by parts sent
at once, spools open at once per tenant and per gateway, a tenant's byte quota (given back as its uploads expire),
and credentials that die with the key they were minted under."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from gateway.auth import KEY_CACHE_SECONDS, new_key
from gateway.server import Gateway
from loraserve.client import AsyncClient, LoraServeError
from core.config import Settings
from storage.object_store import uploads_prefix
from tests.conftest import free_port, gateway_for, own_gateway_settings

MIN_PART = 64
MAX_UPLOAD = 1024 * 1024


def png(padding: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (1, 2, 3)).save(buffer, format="PNG")
    return buffer.getvalue() + b"\0" * padding


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def running_gateway(tmp_path: Path, **settings: Any) -> contextlib.AbstractAsyncContextManager[Gateway]:
    base = Settings(
        grpc_host="0.0.0.0",
        serve_grpc_port=free_port(),
        upload_min_part_bytes=MIN_PART,
        max_upload_bytes=MAX_UPLOAD,
        tenant_max_upload_bytes=3 * MAX_UPLOAD,
    )
    return gateway_for(own_gateway_settings(base, tmp_path, **settings))


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[Gateway]:
    async with running_gateway(tmp_path) as running:
        yield running


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def make_key(gateway: Gateway, tenant: str) -> tuple[str, str]:
    """(key id, `Key …` header value)."""
    key, secret = new_key(tenant)
    await gateway.store.add_key(key)
    return key.id, f"Key {key.id}:{secret}"


def base(gateway: Gateway) -> str:
    return f"http://127.0.0.1:{gateway.settings.http_port}"


async def call(http: aiohttp.ClientSession, method: str, url: str, **kwargs: Any) -> tuple[int, Any, Any]:
    async with http.request(method, url, **kwargs) as response:
        return response.status, await response.json(), response.headers


async def start_multipart(http: aiohttp.ClientSession, gateway: Gateway, key: str) -> str:
    status, body, _ = await call(
        http, "POST", f"{base(gateway)}/storage/upload/initiate-multipart", json={}, headers={"Authorization": key}
    )
    assert status == 200, body
    return str(body["upload_url"])


async def test_thousands_of_tiny_parts_hold_no_descriptors_and_leave_other_tenants_served(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    _, key_a = await make_key(gateway, "team-a")
    _, key_b = await make_key(gateway, "team-b")
    uploads = [await start_multipart(http, gateway, key_a) for _ in range(8)]
    before = open_descriptors()

    async def flood(upload_url: str) -> list[int]:
        statuses = []
        for number in range(1, 251):
            data = png(MIN_PART)[:MIN_PART] if number == 1 else b"\x01" * MIN_PART
            status, _, _ = await call(http, "PUT", f"{upload_url}/{number}", data=data)
            statuses.append(status)
        # Parts below the minimum: one may be the last; the next is refused as it comes.
        for number in (251, 252):
            status, _, _ = await call(http, "PUT", f"{upload_url}/{number}", data=b"\x01")
            statuses.append(status)
        return statuses

    answers = await asyncio.gather(*(flood(url) for url in uploads))
    assert all(statuses[:251] == [200] * 251 and statuses[251] == 400 for statuses in answers)
    # 2,008 parts are held, none of them open: what is open is the sessions' sockets and the like.
    held = sum(len(list(Path(folder).iterdir())) for folder in gateway.fal_storage.parts_dir.iterdir())
    assert held == 8 * 251
    assert open_descriptors() - before < 32
    assert gateway.upload_budget.open_spools == 0

    # Another tenant: health, a submit and an upload are answered as ever.
    async with http.get(f"{base(gateway)}/healthz") as response:
        assert response.status == 200
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    async with AsyncClient(f"127.0.0.1:{gateway.grpc_port}", key=key_b.removeprefix("Key ")) as client:
        assert await client.submit({"model_name": "org/model", "prompt": "a red house"})
        assert (await client.upload(png(), file_name="b.png")).file_size == len(png())

    # The whole upload assembles from its parts, each read once.
    parts = [{"partNumber": n, "etag": ""} for n in range(1, 252)]
    url = uploads[0]
    status, body, _ = await call(http, "POST", f"{url}/complete", json={"parts": parts})
    assert status == 200, body
    assert open_descriptors() - before < 32


async def test_parts_sent_at_once_share_the_upload_cap(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    _, key = await make_key(gateway, "team-a")
    upload_url = await start_multipart(http, gateway, key)
    budget = gateway.upload_budget
    gate = asyncio.Event()
    part = 200_000  # eight of them: 1.6 MB against a 1 MiB cap

    async def body() -> AsyncIterator[bytes]:
        yield b"\x02" * 1000
        await gate.wait()
        yield b"\x02" * (part - 1000)

    sends = [asyncio.create_task(call(http, "PUT", f"{upload_url}/{n}", data=body())) for n in range(1, 9)]
    # Every part has started arriving before any goes on (a deadline, not a sleep, bounds the wait).
    deadline = time.monotonic() + 30
    while budget.open_spools < 8:
        assert time.monotonic() < deadline, "the parts never all started"
        await asyncio.sleep(0.01)
    gate.set()
    statuses = [status for status, _, _ in await asyncio.gather(*sends)]
    accepted = statuses.count(200)
    assert statuses.count(413) == 8 - accepted and accepted * part <= MAX_UPLOAD and accepted >= 1
    spooled = sum(path.stat().st_size for path in gateway.fal_storage.parts_dir.rglob("*") if path.is_file())
    assert spooled == accepted * part


async def test_a_tenant_over_its_upload_bytes_is_told_to_wait_on_both_ports(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    _, key_a = await make_key(gateway, "team-a")
    _, key_b = await make_key(gateway, "team-b")
    big = png(MAX_UPLOAD - 200)  # three fit in the tenant's 3 MiB, with under 1,000 bytes to spare
    async with AsyncClient(f"127.0.0.1:{gateway.grpc_port}", key=key_a.removeprefix("Key ")) as client:
        for name in ("1.png", "2.png", "3.png"):
            await client.upload(big, file_name=name)
        with pytest.raises(LoraServeError) as refused:
            await client.upload(png(1000), file_name="4.png")
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused.value.quota_violations == {"tenant:team-a": "tenant_max_upload_bytes"}
    assert refused.value.retry_after_seconds is not None and refused.value.retry_after_seconds > 0

    status, body, headers = await call(
        http, "POST", f"{base(gateway)}/storage/auth/token", json={}, headers={"Authorization": key_a}
    )
    bearer = {"Authorization": f"Bearer {body['token']}"}
    status, body, headers = await call(http, "POST", f"{base(gateway)}/files/upload", data=png(1000), headers=bearer)
    assert status == 429 and body["limit"] == "tenant_max_upload_bytes" and int(headers["Retry-After"]) >= 1, body
    # Another tenant's files are its own.
    async with AsyncClient(f"127.0.0.1:{gateway.grpc_port}", key=key_b.removeprefix("Key ")) as client:
        assert (await client.upload(big, file_name="b.png")).file_size == len(big)


async def test_revoking_a_key_ends_its_upload_tokens_urls_and_multipart_uploads(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    key_id, key = await make_key(gateway, "team-a")
    _, other_key = await make_key(gateway, "team-a")
    auth = {"Authorization": key}
    status, token, _ = await call(http, "POST", f"{base(gateway)}/storage/auth/token", json={}, headers=auth)
    bearer = {"Authorization": f"Bearer {token['token']}"}
    status, initiated, _ = await call(
        http, "POST", f"{base(gateway)}/storage/upload/initiate", json={"file_name": "a.png"}, headers=auth
    )
    put_url = initiated["upload_url"]
    multipart = await start_multipart(http, gateway, key)
    # All three work while the key does.
    assert (await call(http, "POST", f"{base(gateway)}/files/upload", data=png(), headers=bearer))[0] == 200
    assert (await call(http, "PUT", f"{multipart}/1", data=png()))[0] == 200
    status, initiated, _ = await call(
        http, "POST", f"{base(gateway)}/storage/upload/initiate", json={"file_name": "b.png"}, headers=auth
    )
    second_put_url = initiated["upload_url"]
    assert (await call(http, "PUT", put_url, data=png()))[0] == 200

    assert await gateway.store.revoke_key(key_id)
    # As long after as a remembered key is trusted: the key itself is refused now, and so is all it minted.
    gateway.auth.clock = lambda: time.monotonic() + KEY_CACHE_SECONDS
    assert (await call(http, "POST", f"{base(gateway)}/storage/auth/token", json={}, headers=auth))[0] == 401
    status, body, _ = await call(http, "POST", f"{base(gateway)}/files/upload", data=png(), headers=bearer)
    assert status == 401 and "revoked" in body["detail"], body
    status, body, _ = await call(http, "PUT", second_put_url, data=png())
    assert status == 403 and "revoked" in body["detail"], body
    for method, url, kwargs in (
        ("PUT", f"{multipart}/2", {"data": png()}),
        ("POST", f"{multipart}/complete", {"json": {"parts": [{"partNumber": 1, "etag": ""}]}}),
    ):
        status, body, _ = await call(http, method, url, **kwargs)
        assert status == 403 and "revoked" in body["detail"], body
    # The tenant's other key goes on.
    status, _, _ = await call(
        http, "POST", f"{base(gateway)}/storage/auth/token", json={}, headers={"Authorization": other_key}
    )
    assert status == 200


async def test_spools_open_at_once_are_capped_per_tenant_and_per_gateway(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    async with running_gateway(tmp_path, max_upload_spools=3, tenant_max_upload_spools=2) as gateway:
        _, key_a = await make_key(gateway, "team-a")
        _, key_b = await make_key(gateway, "team-b")
        _, key_c = await make_key(gateway, "team-c")

        async def upload_url(key: str) -> str:
            status, body, _ = await call(
                http, "POST", f"{base(gateway)}/storage/upload/initiate", json={}, headers={"Authorization": key}
            )
            assert status == 200, body
            return str(body["upload_url"])

        gate = asyncio.Event()

        async def held_body() -> AsyncIterator[bytes]:
            data = png()
            yield data[:16]
            await gate.wait()
            yield data[16:]

        async def hold(urls: list[str], open_spools: int) -> list[asyncio.Task[tuple[int, Any, Any]]]:
            """PUTs whose bodies stop after a few bytes until the gate opens, each holding a spool meanwhile."""
            sends = [asyncio.create_task(call(http, "PUT", url, data=held_body())) for url in urls]
            deadline = time.monotonic() + 30
            while gateway.upload_budget.open_spools < open_spools:
                assert time.monotonic() < deadline, "the held uploads never all started"
                await asyncio.sleep(0.01)
            return sends

        urls_a = [await upload_url(key_a) for _ in range(3)]
        multipart_c = await start_multipart(http, gateway, key_c)
        assert (await call(http, "PUT", f"{multipart_c}/1", data=png()))[0] == 200
        complete_c = {"parts": [{"partNumber": 1, "etag": ""}]}
        client_c = AsyncClient(f"127.0.0.1:{gateway.grpc_port}", key=key_c.removeprefix("Key "))
        held: list[asyncio.Task[tuple[int, Any, Any]]] = []
        try:
            held += await hold(urls_a[:2], 2)
            # Team A sends two at once, its limit: its third is told to come back.
            status, body, headers = await call(http, "PUT", urls_a[2], data=png())
            assert (status, body["limit"]) == (429, "tenant_max_upload_spools") and int(headers["Retry-After"]) >= 1
            # Team C sends none, but the gateway receives three (team B's too), its limit.
            held += await hold([await upload_url(key_b)], 3)
            with pytest.raises(LoraServeError) as refused:
                await client_c.upload(png(), file_name="c.png")
            assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert refused.value.quota_violations == {"gateway": "max_upload_spools"}
            assert refused.value.retry_after_seconds is not None and refused.value.retry_after_seconds > 0
            # A part sent again is refused a spool and the one sent before is kept; assembling the upload needs a
            # spool too: refused, the upload kept for the retry.
            status, body, _ = await call(http, "PUT", f"{multipart_c}/1", data=png())
            assert (status, body["limit"]) == (429, "max_upload_spools"), body
            status, body, _ = await call(http, "POST", f"{multipart_c}/complete", json=complete_c)
            assert (status, body["limit"]) == (429, "max_upload_spools"), body
        finally:
            gate.set()
        async with client_c:
            assert [status for status, _, _ in await asyncio.gather(*held)] == [200, 200, 200]
            # Once those are stored, the refused ones go through.
            assert (await call(http, "PUT", urls_a[2], data=png()))[0] == 200
            assert (await client_c.upload(png(), file_name="c.png")).file_size == len(png())
            status, body, _ = await call(http, "POST", f"{multipart_c}/complete", json=complete_c)
            assert status == 200, body
        assert gateway.upload_budget.open_spools == 0


async def test_uploads_expire_under_retention_and_give_their_tenant_its_bytes_back(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    _, key = await make_key(gateway, "team-a")
    big = png(MAX_UPLOAD - 200)
    assert gateway.retention is not None
    async with AsyncClient(f"127.0.0.1:{gateway.grpc_port}", key=key.removeprefix("Key ")) as client:
        stored = [await client.upload(big, file_name=f"{n}.png") for n in range(3)]
        with pytest.raises(LoraServeError) as refused:
            await client.upload(big, file_name="4.png")
        assert refused.value.quota_violations == {"tenant:team-a": "tenant_max_upload_bytes"}

        await gateway.retention.run_once()
        assert gateway.files.usage(uploads_prefix("team-a")) == 3 * len(big), "none is older than the retention"
        await gateway.retention.run_once(now=time.time() + gateway.settings.retention_seconds + 1)
        assert gateway.files.usage(uploads_prefix("team-a")) == 0
        async with http.get(stored[0].url) as response:
            assert response.status == 404
        # At once, not when the gateway's measure of the tenant's stored bytes would have gone stale.
        assert (await client.upload(big, file_name="4.png")).file_size == len(big)
