"""fal's storage upload routes and the tenant isolation of files, through the running embedded service.

Raw HTTP as fal's clients send it (spec/fal-queue-protocol.md §2.7, §3.6, §6.4); the uploaded
files are then named as inputs of real generations, and another tenant naming them gets the
answer a missing file gets.
"""

from __future__ import annotations

import io
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import numpy as np
import pytest
import pytest_asyncio
from PIL import Image

from gateway.auth import new_key
from gateway.server import Gateway
from loraserve.client import AsyncClient, LoraServeError
from core.config import Settings
from serving.tiny import TinyModel
from storage.object_store import tenant_folder
from tests.conftest import gateway_for, own_gateway_settings, read_image_bytes
from tests.integration.test_generation_api import fetch, request

pytestmark = pytest.mark.integration

PNG = Image.new("RGB", (8, 8), (200, 10, 10))


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    PNG.save(buffer, format="PNG")
    return buffer.getvalue()


async def make_key(gateway: Gateway, tenant: str) -> str:
    key, secret = new_key(tenant)
    await gateway.store.add_key(key)
    return f"{key.id}:{secret}"


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Key {key}"}


@pytest_asyncio.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def call(
    http: aiohttp.ClientSession, method: str, url: str, **kwargs: Any
) -> tuple[int, Any, Any]:
    async with http.request(method, url, **kwargs) as response:
        assert response.content_type == "application/json", (url, response.status, await response.text())
        return response.status, await response.json(), response.headers


async def upload_every_way(
    http: aiohttp.ClientSession, base: str, key: str, data: bytes, name: str
) -> dict[str, str]:
    """The same bytes through each of fal's upload flows; the URL each returns, by flow."""
    urls: dict[str, str] = {}
    status, token, _ = await call(http, "POST", f"{base}/storage/auth/token?storage_type=fal-cdn-v3", json={}, headers=auth(key))
    assert status == 200 and token["token_type"] == "Bearer" and token["base_url"] == base
    expires = datetime.fromisoformat(token["expires_at"])
    assert token["expires_at"].endswith("+00:00") and expires > datetime.now(UTC)
    bearer = {"Authorization": f"{token['token_type']} {token['token']}"}
    status, body, _ = await call(
        http,
        "POST",
        f"{base}/files/upload",
        data=data,
        headers={**bearer, "Content-Type": "application/octet-stream", "X-Fal-File-Name": name},
    )
    assert status == 200, body
    urls["cdn"] = body["access_url"]

    # v3 multipart: parts to {access_url}/multipart/{id}/{n}, answered with an ETag header.
    status, created, _ = await call(
        http,
        "POST",
        f"{token['base_url']}/files/upload/multipart",
        headers={**bearer, "Content-Type": "application/octet-stream", "X-Fal-File-Name": name},
    )
    assert status == 200 and "?" not in created["access_url"], created
    half = len(data) // 2
    parts = []
    for number, chunk in ((2, data[half:]), (1, data[:half])):
        part_url = f"{created['access_url']}/multipart/{created['uploadId']}/{number}"
        status, _, headers = await call(http, "PUT", part_url, data=chunk, headers={**bearer, "Accept-Encoding": "identity"})
        assert status == 200 and headers["ETag"]
        parts.append({"partNumber": number, "etag": headers["ETag"]})
    complete = f"{created['access_url']}/multipart/{created['uploadId']}/complete"
    status, body, _ = await call(http, "POST", complete, json={"parts": sorted(parts, key=lambda p: p["partNumber"])}, headers=bearer)
    assert status == 200, body
    urls["cdn-multipart"] = created["access_url"]

    # initiate + PUT: JS through its proxyUrl (x-fal-target-url) with no credentials on the PUT,
    # Python's fallback with them.
    initiate = "/storage/upload/initiate?storage_type="
    for url, extra, put_headers in (
        (f"{base}/api/fal/proxy", {"x-fal-target-url": f"https://rest.fal.ai{initiate}fal-cdn-v3"}, {}),
        (f"{base}{initiate}gcs", {}, auth(key)),
    ):
        status, initiated, _ = await call(
            http,
            "POST",
            url,
            json={"file_name": name, "content_type": "application/octet-stream"},
            headers={**auth(key), **extra},
        )
        assert status == 200, initiated
        status, body, _ = await call(
            http, "PUT", initiated["upload_url"], data=data, headers={**put_headers, "Content-Type": "application/octet-stream"}
        )
        assert status == 200, body
        urls["initiate-proxied" if extra else "initiate"] = initiated["file_url"]

    # JS multipart: PUT {upload_url}/{n} answers JSON {partNumber, etag}, then POST …/complete.
    status, initiated, _ = await call(
        http,
        "POST",
        f"{base}/storage/upload/initiate-multipart?storage_type=fal-cdn-v3",
        json={"file_name": name, "content_type": "application/octet-stream"},
        headers=auth(key),
    )
    assert status == 200, initiated
    upload_url = urlsplit(initiated["upload_url"])
    answers = []
    for number, chunk in ((1, data[:half]), (2, data[half:])):
        part_url = f"{upload_url.scheme}://{upload_url.netloc}{upload_url.path}/{number}"
        status, answer, _ = await call(http, "PUT", part_url, data=chunk)
        assert status == 200 and answer["partNumber"] == number and answer["etag"], answer
        answers.append(answer)
    status, body, _ = await call(
        http, "POST", f"{upload_url.scheme}://{upload_url.netloc}{upload_url.path}/complete", json={"parts": answers}
    )
    assert status == 200, body
    urls["initiate-multipart"] = initiated["file_url"]
    return urls


def stored_key(url: str) -> str:
    return urlsplit(url).path.split("/files/", 1)[1]


async def outcome(target: str, key: str, body: dict[str, Any]) -> tuple[str, str]:
    """(error type, message with URLs blanked) of a request that failed; ("", "") if it completed."""
    async with AsyncClient(target, key=key) as client:
        try:
            await client.subscribe(body)
        except LoraServeError as error:
            return error.reason, re.sub(r"https?://\S+", "<url>", error.message)
    return "", ""


async def test_every_upload_route_lands_a_file_its_tenant_and_only_its_tenant_can_use(
    stack: Any, target: str, stack_settings: Settings, tiny_sdxl: TinyModel, http: aiohttp.ClientSession
) -> None:
    gateway: Gateway = stack.gateway
    key_a, key_b = await make_key(gateway, "team-a"), await make_key(gateway, "team-b")
    base = f"http://127.0.0.1:{stack_settings.http_port}"
    lora = tiny_sdxl.lora_paths[0].read_bytes()
    urls = await upload_every_way(http, base, key_a, lora, "style.safetensors")
    async with AsyncClient(target, key=key_a) as client:
        urls["grpc"] = (await client.upload(lora, file_name="style.safetensors")).url
    for flow, url in urls.items():
        assert stored_key(url).startswith(tenant_folder("team-a") + "/uploads/"), (flow, url)
        if "?" in url:  # signed: downloadable as it is, like an S3 presigned URL
            assert await fetch(url) == lora, flow

    async with AsyncClient(target, key=key_a) as client:
        expected = await client.subscribe(request(tiny_sdxl, loras=[{"path": str(tiny_sdxl.lora_paths[0])}]))
    want = read_image_bytes(stack_settings, expected.data.images[0].url)
    for flow, url in urls.items():
        async with AsyncClient(target, key=key_a) as client:
            result = await client.subscribe(request(tiny_sdxl, loras=[{"path": url}]))
        image = result.data.images[0]
        # A's outputs land in A's folder, so they too are A's inputs only.
        assert stored_key(image.url).startswith(f"{tenant_folder('team-a')}/outputs/{result.request_id}/"), image.url
        got = np.asarray(Image.open(io.BytesIO(read_image_bytes(stack_settings, image.url))))
        assert np.array_equal(got, np.asarray(Image.open(io.BytesIO(want)))), flow

    # Tenant B: A's files (uploads and outputs) are answered as a file that does not exist.
    # A file that does not exist, in B's own folder.
    missing = urls["grpc"].replace(tenant_folder("team-a"), tenant_folder("team-b")).replace("/uploads/", "/uploads/0", 1)
    answers = {
        name: await outcome(target, key_b, request(tiny_sdxl, loras=[{"path": url}]))
        for name, url in {**urls, "output": result.data.images[0].url, "missing": missing}.items()
    }
    assert answers["missing"][0] == "INVALID_INPUT" and "no such stored file" in answers["missing"][1]
    assert all(answer == answers["missing"] for answer in answers.values()), answers
    # Without a key (the anonymous tenant on loopback) the same.
    assert await outcome(target, "", request(tiny_sdxl, loras=[{"path": urls["cdn"]}])) == answers["missing"]


@pytest_asyncio.fixture
async def capped(stack: object, stack_settings: Settings, tmp_path: Path) -> AsyncIterator[Gateway]:
    """A gateway that requires keys (bound to every interface) and takes uploads of at most 1,000 bytes."""
    settings = own_gateway_settings(stack_settings, tmp_path, grpc_host="0.0.0.0", max_upload_bytes=1000)
    async with gateway_for(settings) as gateway:
        yield gateway


async def test_caps_types_and_keys_answer_json(capped: Gateway, http: aiohttp.ClientSession) -> None:
    base = f"http://127.0.0.1:{capped.settings.http_port}"
    key = await make_key(capped, "team-a")
    too_big, html = png_bytes() + b"\0" * 1000, b"<html><script>alert(1)</script></html>"

    # Keys: none, wrong; a token this service did not issue.
    for headers in ({}, auth("lsk_0000000000000000:nope")):
        status, body, _ = await call(http, "POST", f"{base}/storage/auth/token?storage_type=fal-cdn-v3", json={}, headers=headers)
        assert status == 401 and body["detail"], body
        status, body, _ = await call(http, "POST", f"{base}/storage/upload/initiate", json={}, headers=headers)
        assert status == 401, body
    status, body, _ = await call(http, "POST", f"{base}/files/upload", data=b"x", headers={"Authorization": "Bearer forged.00"})
    assert status == 401, body

    # Behind a TLS-terminating proxy (loopback is trusted by default) the URLs carry the caller's scheme and host.
    forwarded = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "images.example"}
    status, token, _ = await call(http, "POST", f"{base}/storage/auth/token", json={}, headers={**auth(key), **forwarded})
    assert token["base_url"] == "https://images.example", token
    bearer = {"Authorization": f"Bearer {token['token']}"}

    async def chunked(data: bytes) -> AsyncIterator[bytes]:
        for start in range(0, len(data), 100):
            yield data[start : start + 100]

    # Too large: with a Content-Length, and streamed without one.
    for data in (too_big, chunked(too_big)):
        status, body, _ = await call(http, "POST", f"{base}/files/upload", data=data, headers=bearer)
        assert status == 413 and "1000 bytes" in body["detail"], body
    status, body, _ = await call(http, "POST", f"{base}/files/upload", data=html, headers={**bearer, "Content-Type": "text/html"})
    assert status == 415 and "text/html" in body["detail"], body
    status, body, _ = await call(http, "POST", f"{base}/files/upload", data=b"", headers=bearer)
    assert status == 400, body

    status, initiated, _ = await call(
        http, "POST", f"{base}/storage/upload/initiate", json={"file_name": "x.png", "content_type": "image/png"}, headers=auth(key)
    )
    upload_url = initiated["upload_url"]
    status, body, _ = await call(http, "PUT", upload_url, data=too_big)
    assert status == 413, body
    status, body, _ = await call(http, "PUT", upload_url, data=html, headers={"Content-Type": "text/html"})
    assert status == 415, body
    # The URL is the capability: a changed key or signature is refused whether or not a key is sent.
    forged = upload_url.replace("/uploads/", "/uploads/0", 1)
    status, body, _ = await call(http, "PUT", forged, data=png_bytes(), headers=auth(key))
    assert status == 403, body
    status, body, _ = await call(http, "PUT", re.sub(r"signature=\w+", "signature=00", upload_url), data=png_bytes())
    assert status == 403, body
    status, body, _ = await call(http, "PUT", upload_url, data=png_bytes())
    assert status == 200 and await fetch(initiated["file_url"]) == png_bytes(), body

    # Multipart: the parts together are capped; an unknown upload id is 404.
    status, initiated, _ = await call(http, "POST", f"{base}/storage/upload/initiate-multipart", json={}, headers=auth(key))
    part_base = initiated["upload_url"]
    status, body, _ = await call(http, "PUT", f"{part_base}/1", data=b"\0" * 600)
    assert status == 200, body
    status, body, _ = await call(http, "PUT", f"{part_base}/2", data=b"\0" * 600)
    assert status == 413, body
    status, body, _ = await call(http, "PUT", f"{part_base}/0", data=b"\0")
    assert status == 400, body
    status, body, _ = await call(http, "POST", f"{part_base}/complete", json={"parts": [{"partNumber": 1, "etag": "x"}]})
    assert status == 400 and "part 1" in body["detail"], body
    status, body, _ = await call(http, "PUT", f"{base}/storage/upload/multipart/no-such-upload/1", data=b"x")
    assert status == 404, body

    async with AsyncClient(f"127.0.0.1:{capped.grpc_port}", key=key) as client:
        with pytest.raises(LoraServeError) as refused:
            await client.upload(too_big, file_name="big.png")
    assert refused.value.reason == "INVALID_ARGUMENT" and "1000 bytes" in refused.value.message
