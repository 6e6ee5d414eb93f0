"""The local file server: signed, expiring URLs; the stored type, nosniff, attachments."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer

from gateway.http_files import make_http_app
from gateway.metrics import GatewayMetrics
from loraserve.v1 import types_pb2
from storage.object_store import LocalObjectStore
from storage.result_urls import with_fresh_urls
from storage.uploads import UploadWriter

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 100
JSON_AS_HTML = b'{"x": "<script>alert(1)</script>"}' + b" " * 80


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> LocalObjectStore:
    return LocalObjectStore(tmp_path / "files", "http://files.test", url_expiry_seconds=600, clock=clock)


@pytest_asyncio.fixture
async def client(store: LocalObjectStore) -> AsyncIterator[TestClient[object, object]]:
    app = make_http_app(store, GatewayMetrics(lambda: 0.0, lambda: 0.0))
    async with TestClient(TestServer(app)) as test_client:
        yield test_client


def _path(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}" if parts.query else parts.path


def _upload(store: LocalObjectStore, key: str, data: bytes, declared: str) -> str:
    with UploadWriter(store, key, max_bytes=10_000, declared_content_type=declared) as writer:
        writer.write(data)
        return writer.commit().url


async def test_an_html_named_upload_of_json_comes_back_as_a_json_attachment(
    store: LocalObjectStore, client: TestClient[object, object]
) -> None:
    url = _upload(store, "uploads/u1/x.html", JSON_AS_HTML, "text/html")
    response = await client.get(_path(url))
    assert response.status == 200
    assert response.headers["Content-Type"].split(";")[0] == "application/json"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Content-Disposition"] == 'attachment; filename="x.html"'
    assert "sandbox" in response.headers["Content-Security-Policy"]
    assert await response.read() == JSON_AS_HTML


async def test_images_are_shown_inline_with_their_type(store: LocalObjectStore, client: TestClient[object, object]) -> None:
    url = store.put("outputs/r1/a.jpeg", PNG, "image/png").url  # the name lies; the stored type wins
    response = await client.get(_path(url))
    assert response.status == 200 and response.headers["Content-Type"] == "image/png"
    assert "Content-Disposition" not in response.headers
    assert response.headers["X-Content-Type-Options"] == "nosniff"


async def test_unsigned_tampered_expired_and_other_key_urls_are_refused_alike(
    store: LocalObjectStore, client: TestClient[object, object], clock: Clock
) -> None:
    url = store.put("outputs/r1/a.png", PNG, "image/png").url
    other = store.put("outputs/r2/b.png", PNG, "image/png").url
    query = parse_qs(urlsplit(url).query)
    expires, signature = query["expires"][0], query["signature"][0]
    refused = [
        "/files/outputs/r1/a.png",
        f"/files/outputs/r1/a.png?expires={expires}",
        f"/files/outputs/r1/a.png?expires={int(expires) + 3600}&signature={signature}",
        f"/files/outputs/r1/a.png?expires={expires}&signature={'0' * 64}",
        f"/files/outputs/r2/b.png?{urlsplit(url).query}",  # a's signature on b
        f"/files/outputs/r1/missing.png?{urlsplit(url).query}",
        f"/files/outputs/nothing/here.png?expires={expires}&signature={'f' * 64}",
    ]
    for path in refused:
        response = await client.get(path)
        assert response.status == 403, path
    assert (await client.get(_path(other))).status == 200
    clock.now += 601
    assert (await client.get(_path(url))).status == 403
    fresh = store.url("outputs/r1/a.png")
    assert (await client.get(_path(fresh))).status == 200


async def test_a_signed_url_for_a_deleted_file_is_not_found(
    store: LocalObjectStore, client: TestClient[object, object]
) -> None:
    url = store.put("outputs/r1/gone.png", PNG, "image/png").url
    store.path("outputs/r1/gone.png").unlink()
    assert (await client.get(_path(url))).status == 404


def test_stored_results_are_re_signed_when_read_and_signed_urls_name_their_key(
    store: LocalObjectStore, clock: Clock
) -> None:
    stored = store.put("outputs/r1/a.png", PNG, "image/png")
    assert store.key_for_url(stored.url) == "outputs/r1/a.png"
    output = types_pb2.GenerateOutput(images=[types_pb2.Image(url=stored.url)])
    clock.now += 3600
    fresh = with_fresh_urls(output, store)
    assert output.images[0].url == stored.url  # the stored result is left as it was
    query = parse_qs(urlsplit(fresh.images[0].url).query)
    assert store.signature_valid("outputs/r1/a.png", query["expires"][0], query["signature"][0])
    assert not store.signature_valid("outputs/r1/a.png", *(parse_qs(urlsplit(stored.url).query)[k][0] for k in ("expires", "signature")))


def test_stores_sharing_a_secret_accept_each_others_urls(tmp_path: Path) -> None:
    from storage.object_store import load_or_create_secret

    secret = load_or_create_secret(tmp_path / "files-url.key")
    assert load_or_create_secret(tmp_path / "files-url.key") == secret and len(secret) == 32
    assert (tmp_path / "files-url.key").stat().st_mode & 0o077 == 0
    gateway = LocalObjectStore(tmp_path / "files", "http://h", signing_key=secret)
    worker = LocalObjectStore(tmp_path / "files", "http://h", signing_key=secret)
    stranger = LocalObjectStore(tmp_path / "files", "http://h")
    url = worker.put("outputs/r/a.png", PNG, "image/png").url
    query = parse_qs(urlsplit(url).query)
    assert gateway.signature_valid("outputs/r/a.png", query["expires"][0], query["signature"][0])
    assert not stranger.signature_valid("outputs/r/a.png", query["expires"][0], query["signature"][0])
    assert io.BytesIO(gateway.get("outputs/r/a.png")).read() == PNG
