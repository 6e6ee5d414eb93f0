"""Results stay downloadable after their first presigned URLs expire: reading a result signs them anew.

Against moto's S3 server through the real `minio` SDK, with every presigned URL's signature,
key, host and expiry checked (tests.s3_server); the old URL is made as the store made it at
generation time, by signing with a request date two hours back.
"""

from __future__ import annotations

import base64
import secrets
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from minio import Minio
from storage_testkit import png_bytes, safetensors_bytes

from loraserve.v1 import types_pb2
from storage.object_store import LocalObjectStore
from storage.result_urls import data_uri, with_fresh_urls
from storage.s3 import S3ObjectStore, S3Settings
from tests.s3_server import WRITERS, PresignedUrlRefused, verify_presigned_url

EXPIRY_SECONDS = 3600


def _store(endpoint: str, **changes: object) -> S3ObjectStore:
    values: dict[str, object] = {
        "endpoint": endpoint,
        "access_key": "writer",
        "secret_key": "writer-secret",
        "bucket": f"results-{secrets.token_hex(4)}",
        "secure": False,
        "key_prefix": "loraserve",
        "presign_expiry_seconds": EXPIRY_SECONDS,
    }
    values.update(changes)
    return S3ObjectStore(S3Settings(**values))  # type: ignore[arg-type]


def _signed_at(store: S3ObjectStore, key: str, when: datetime) -> str:
    """The URL the store handed out for `key` when it was signed at `when`."""
    signer = Minio(
        store.settings.endpoint, access_key="writer", secret_key="writer-secret", secure=False, region="us-east-1"
    )
    return signer.presigned_get_object(
        store.bucket, store.object_name(key), expires=timedelta(seconds=EXPIRY_SECONDS), request_date=when
    )


def _download(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200
        data: bytes = response.read()
        return data


def test_expired_result_urls_are_signed_again_and_download(s3_endpoint: str) -> None:
    store = _store(s3_endpoint)
    image_key, latents_key = "outputs/req1/img.png", "outputs/req1/latents.safetensors"
    store.put(image_key, png_bytes(), "image/png")
    store.put(latents_key, safetensors_bytes(), "application/octet-stream")
    generated_at = datetime.now(UTC) - timedelta(hours=2)
    output = types_pb2.GenerateOutput(seed=7, has_nsfw_concepts=[False, False])
    output.images.add(url=_signed_at(store, image_key, generated_at), file_name="img.png", width=16, height=12)
    output.images.add(url="https://elsewhere.example.com/img.png", file_name="other.png")
    output.debug_latents.CopyFrom(types_pb2.File(url=_signed_at(store, latents_key, generated_at)))
    stored = types_pb2.GenerateOutput()
    stored.CopyFrom(output)
    now = datetime.now(UTC)
    verify_presigned_url(output.images[0].url, WRITERS, host=s3_endpoint, now=generated_at)
    with pytest.raises(PresignedUrlRefused, match="expired"):
        verify_presigned_url(output.images[0].url, WRITERS, host=s3_endpoint)
    with pytest.raises(urllib.error.HTTPError) as refused:
        _download(output.images[0].url)
    assert refused.value.code == 403

    fresh = with_fresh_urls(output, store)

    assert output == stored, "the stored result is not modified"
    image_url, latents_url = fresh.images[0].url, fresh.debug_latents.url
    assert store.key_for_url(image_url) == image_key and store.key_for_url(latents_url) == latents_key
    for url in (image_url, latents_url):
        signed = verify_presigned_url(url, WRITERS, host=s3_endpoint)
        assert signed.access_key == "writer" and signed.expires_seconds == EXPIRY_SECONDS
        assert signed.valid_until > now
    assert _download(image_url) == png_bytes()
    assert _download(latents_url) == safetensors_bytes()
    # A URL the store did not make is not its to re-sign; everything else is kept as it was.
    assert fresh.images[1].url == "https://elsewhere.example.com/img.png"
    fresh.images[0].url, fresh.debug_latents.url = output.images[0].url, output.debug_latents.url
    assert fresh == output
    assert not fresh.HasField("debug_per_pass_latents")


def test_each_read_signs_with_the_current_expiry_setting(s3_endpoint: str) -> None:
    """A 1 s expiry (the shortest allowed) shows the URL is signed at read time, not copied."""
    store = _store(s3_endpoint, presign_expiry_seconds=1)
    store.put("outputs/r/a.png", png_bytes(), "image/png")
    output = types_pb2.GenerateOutput()
    output.images.add(url=_signed_at(store, "outputs/r/a.png", datetime.now(UTC) - timedelta(days=3)))

    before = datetime.now(UTC).replace(microsecond=0)
    fresh_url = with_fresh_urls(output, store).images[0].url

    # Checked at its signing time: a download could come after its one second.
    query = parse_qs(urlsplit(fresh_url).query)
    signed_at = datetime.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    assert signed_at >= before
    assert verify_presigned_url(fresh_url, WRITERS, host=s3_endpoint, now=signed_at).expires_seconds == 1


def test_public_and_local_urls_stay_as_they_are(s3_endpoint: str, tmp_path: Path) -> None:
    public = _store(s3_endpoint, public_base_url="https://cdn.example.com/")
    local = LocalObjectStore(tmp_path, "http://127.0.0.1:8080")
    for store in (public, local):
        stored = store.put("outputs/r/a.png", png_bytes(), "image/png")
        output = types_pb2.GenerateOutput()
        output.images.add(url=stored.url)
        output.debug_per_pass_latents.CopyFrom(types_pb2.File(url=stored.url))
        assert with_fresh_urls(output, store) == output


def test_inline_results_are_left_as_they_are(s3_endpoint: str, tmp_path: Path) -> None:
    """sync_mode: data URIs name no object and are returned as stored, bytes and all."""
    data = png_bytes()
    inline = "data:image/png;base64," + base64.b64encode(data).decode()
    for store in (_store(s3_endpoint), LocalObjectStore(tmp_path, "http://127.0.0.1:8080")):
        output = types_pb2.GenerateOutput()
        output.images.add(url=inline, file_data=data)
        latents = types_pb2.File(url="data:application/octet-stream;base64,AAAA", file_data=b"\0\0\0")
        output.debug_latents.CopyFrom(latents)
        assert with_fresh_urls(output, store) == output


def test_data_uri_round_trip() -> None:
    uri = data_uri(b"\x89PNG\r\n", "image/png")
    assert uri.startswith("data:image/png;base64,")
    assert base64.b64decode(uri.split(",", 1)[1]) == b"\x89PNG\r\n"
