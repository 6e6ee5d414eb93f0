"""fal's storage routes on their own (a real aiohttp server on loopback, a clock the test moves):
what expires, what is bounded, and that a tenant's token and upload URLs stay its own."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway import fal_storage
from gateway.auth import Authenticator
from gateway.errors import Unauthenticated
from gateway.fal_storage import FalStorage, MultipartSweeper, add_storage_routes
from storage.object_store import LocalObjectStore, tenant_folder
from storage.uploads import Uploads

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 64


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class KeyPerTenant(Authenticator):
    """`Key <tenant>:x` is that tenant, under key `key-<tenant>`; no header is the anonymous tenant (a keyless
    loopback gateway)."""

    def __init__(self) -> None:
        self.required = False
        self.revoked: set[str] = set()

    async def caller_of_header(self, header: str | None) -> tuple[str, str]:
        if header is None:
            return "", ""
        tenant = header.split(" ", 1)[1].split(":", 1)[0]
        return tenant, f"key-{tenant}"

    async def key_tenant(self, key_id: str) -> str:
        if key_id in self.revoked:
            raise Unauthenticated(f"API key {key_id} was revoked")
        return key_id.removeprefix("key-")


@pytest_asyncio.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[TestClient[Any, Any], Clock, LocalObjectStore]]:
    clock = Clock()
    store = LocalObjectStore(tmp_path / "files", "http://files.test", clock=clock)
    uploads = Uploads(store, max_bytes=1000, spool_dir=tmp_path / "spool")
    app = web.Application()
    add_storage_routes(app, FalStorage(uploads, KeyPerTenant(), secret=b"s" * 32, clock=clock))
    async with TestClient(TestServer(app)) as client:
        yield client, clock, store


async def test_tokens_and_upload_urls_expire_and_name_their_tenant(
    served: tuple[TestClient[Any, Any], Clock, LocalObjectStore],
) -> None:
    client, clock, store = served
    token = await (await client.post("/storage/auth/token", json={}, headers={"Authorization": "Key team-a:x"})).json()
    bearer = {"Authorization": f"Bearer {token['token']}"}
    uploaded = await client.post("/files/upload", data=PNG, headers=bearer)
    assert uploaded.status == 200
    key = store.key_for_url((await uploaded.json())["access_url"])
    assert key is not None and key.startswith(tenant_folder("team-a") + "/uploads/") and store.get(key) == PNG
    # A token edited to name another tenant is not this service's.
    body, signature = token["token"].split(".")
    forged = await client.post("/files/upload", data=PNG, headers={"Authorization": f"Bearer {body}x.{signature}"})
    assert forged.status == 401

    initiated = await (
        await client.post("/storage/upload/initiate", json={"file_name": "a.png"}, headers={"Authorization": "Key team-b:x"})
    ).json()
    put_path = initiated["upload_url"].split("://", 1)[1].split("/", 1)[1]
    assert tenant_folder("team-b") in put_path
    clock.now += fal_storage.TOKEN_SECONDS + 1
    assert (await client.post("/files/upload", data=PNG, headers=bearer)).status == 401
    expired = await client.put("/" + put_path, data=PNG)
    assert expired.status == 403 and "expired" in (await expired.json())["detail"]


async def test_multipart_uploads_are_bounded_and_expire(
    served: tuple[TestClient[Any, Any], Clock, LocalObjectStore],
) -> None:
    client, clock, store = served
    key = {"Authorization": "Key team-a:x"}
    opened = []
    for _ in range(fal_storage.MAX_OPEN_MULTIPART_PER_TENANT):
        response = await client.post("/storage/upload/initiate-multipart", json={}, headers=key)
        assert response.status == 200
        opened.append((await response.json())["upload_url"].split("/storage/", 1)[1])
    refused = await client.post("/storage/upload/initiate-multipart", json={}, headers=key)
    assert refused.status == 429 and refused.headers["Retry-After"]
    # Another tenant still may.
    assert (await client.post("/storage/upload/initiate-multipart", json={}, headers={"Authorization": "Key b:x"})).status == 200

    first = f"/storage/{opened[0]}"
    assert (await client.put(f"{first}/{fal_storage.MAX_PARTS + 1}", data=b"x")).status == 400
    part = await client.put(f"{first}/1", data=PNG)
    answer = await part.json()
    assert part.headers["ETag"] == f'"{answer["etag"]}"' and answer["partNumber"] == 1
    # Sending part 1 again replaces it: its bytes count once against the cap.
    for _ in range(20):
        assert (await client.put(f"{first}/1", data=PNG)).status == 200
    done = await client.post(f"{first}/complete", json={"parts": [answer]})
    assert done.status == 200
    stored = store.key_for_url((await done.json())["file_url"])
    assert stored is not None and store.get(stored) == PNG and store.content_type(stored) == "image/png"
    assert (await client.post(f"{first}/complete", json={"parts": [answer]})).status == 404

    # An hour later the others are gone, and their places free again.
    clock.now += fal_storage.MULTIPART_SECONDS + 1
    assert (await client.put(f"/storage/{opened[1]}/1", data=PNG)).status == 404
    assert (await client.post("/storage/upload/initiate-multipart", json={}, headers=key)).status == 200


async def test_a_sweeper_on_a_timer_drops_expired_uploads_and_leftover_parts(tmp_path: Path) -> None:
    """No route is called: the sweeper alone deletes the parts of uploads that expired, and part folders a
    stopped gateway left behind."""
    clock = Clock()
    store = LocalObjectStore(tmp_path / "files", "http://files.test", clock=clock)
    uploads = Uploads(store, max_bytes=1000, spool_dir=tmp_path / "spool")
    storage = FalStorage(uploads, KeyPerTenant(), secret=b"s" * 32, clock=clock, min_part_bytes=1)
    app = web.Application()
    add_storage_routes(app, storage)
    leftover = storage.parts_dir / "left-by-a-stopped-gateway"
    leftover.mkdir()
    (leftover / "1").write_bytes(b"x")
    long_ago = time.time() - fal_storage.MULTIPART_SECONDS - 60
    os.utime(leftover, (long_ago, long_ago))
    errors: list[BaseException] = []
    sweeper = MultipartSweeper(storage, on_error=errors.append, period_seconds=0.01)
    async with TestClient(TestServer(app)) as client:
        opened = await client.post("/storage/upload/initiate-multipart", json={}, headers={"Authorization": "Key a:x"})
        part_url = "/storage/" + (await opened.json())["upload_url"].split("/storage/", 1)[1]
        for number in (1, 2):
            assert (await client.put(f"{part_url}/{number}", data=PNG)).status == 200
        assert sorted(len(list(folder.iterdir())) for folder in storage.parts_dir.iterdir()) == [1, 2]

        sweeper.start()
        try:
            deadline = time.monotonic() + 30
            # The leftover goes at once; the live upload stays until its hour is over.
            while leftover.exists():
                assert time.monotonic() < deadline, "the leftover was never swept"
                await asyncio.sleep(0.01)
            assert len(list(storage.parts_dir.iterdir())) == 1
            clock.now += fal_storage.MULTIPART_SECONDS + 1
            while list(storage.parts_dir.iterdir()):
                assert time.monotonic() < deadline, "the expired upload was never swept"
                await asyncio.sleep(0.01)
        finally:
            await sweeper.stop()
        assert (await client.put(f"{part_url}/3", data=PNG)).status == 404
    assert errors == [] and uploads.budget.open_spools == 0


async def test_a_body_that_is_not_json_is_a_422_naming_the_body(
    served: tuple[TestClient[Any, Any], Clock, LocalObjectStore],
) -> None:
    """The request model's JSON reader refuses it (InvalidInput); answered as the queue routes answer it."""
    client, _clock, _store = served
    headers = {"Authorization": "Key team-a:x", "Content-Type": "application/json"}
    refused = await client.post("/storage/upload/initiate", data=b"{nope", headers=headers)
    assert refused.status == 422
    [entry] = (await refused.json())["detail"]
    assert entry["loc"] == ["body"] and "not valid JSON" in entry["msg"] and entry["type"] == "value_error.jsondecode"
