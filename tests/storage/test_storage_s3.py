"""The S3 object store against moto's standalone server on loopback, through the real `minio` SDK."""

from __future__ import annotations

import io
import secrets
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pytest
from minio import Minio
from minio.error import S3Error
from storage_testkit import png_bytes, safetensors_bytes

from storage.factory import make_object_store
from storage.fetch import FetchPolicy, fetch_bytes
from storage.object_store import InvalidKey, LocalObjectStore, ObjectNotFound
from storage.s3 import S3ObjectStore, S3Settings
from storage.uploads import UploadRefused, UploadWriter
from storage.weights import WeightsCache
from tests.s3_server import ALL_KEYS, READERS, WRITERS, PresignedUrlRefused, verify_presigned_url


def _settings(endpoint: str, **changes: object) -> S3Settings:
    values: dict[str, object] = {
        "endpoint": endpoint,
        "access_key": "writer",
        "secret_key": "writer-secret",
        "bucket": f"test-{secrets.token_hex(4)}",
        "secure": False,
        "key_prefix": "loraserve",
        "presign_expiry_seconds": 120,
    }
    values.update(changes)
    return S3Settings(**values)  # type: ignore[arg-type]


def _raw_client(endpoint: str) -> Minio:
    return Minio(endpoint, access_key="writer", secret_key="writer-secret", secure=False, region="us-east-1")


def test_put_get_and_a_presigned_url_that_downloads(s3_endpoint: str) -> None:
    store = S3ObjectStore(_settings(s3_endpoint))
    stored = store.put("outputs/req1/image.png", png_bytes(), "image/png")
    assert stored.size == len(png_bytes()) and stored.content_type == "image/png"
    assert store.get("outputs/req1/image.png") == png_bytes()
    signed = verify_presigned_url(stored.url, WRITERS, host=s3_endpoint)
    assert signed.access_key == "writer" and signed.expires_seconds == 120
    with urllib.request.urlopen(stored.url, timeout=5) as response:
        assert response.read() == png_bytes()
        assert response.headers["Content-Type"] == "image/png"
    with pytest.raises(ObjectNotFound):
        store.get("outputs/req1/missing.png")


def test_bucket_is_created_when_missing_and_reused_when_present(s3_endpoint: str) -> None:
    settings = _settings(s3_endpoint)
    assert not _raw_client(s3_endpoint).bucket_exists(settings.bucket)
    S3ObjectStore(settings).put("a.txt", b"one", "text/plain")
    assert _raw_client(s3_endpoint).bucket_exists(settings.bucket)
    assert S3ObjectStore(settings).get("a.txt") == b"one"


def test_keys_never_leave_the_prefix(s3_endpoint: str) -> None:
    settings = _settings(s3_endpoint)
    store = S3ObjectStore(settings)
    for key in ("../escape.png", "a/../../b.png", "/abs.png", "a//b.png", "", ".hidden", "a/./b"):
        with pytest.raises(InvalidKey):
            store.put(key, b"x", "text/plain")
    store.put("uploads/x/in.png", b"x", "image/png")
    names = [obj.object_name for obj in _raw_client(s3_endpoint).list_objects(settings.bucket, recursive=True)]
    assert names == ["loraserve/uploads/x/in.png"]


def test_public_base_url_mode_and_own_url_recognition(s3_endpoint: str) -> None:
    store = S3ObjectStore(_settings(s3_endpoint, public_base_url="https://cdn.example.com/images/"))
    stored = store.put("outputs/r/img.png", b"x", "image/png")
    assert stored.url == "https://cdn.example.com/images/loraserve/outputs/r/img.png"
    assert store.key_for_url(stored.url) == "outputs/r/img.png"
    assert store.key_for_url("https://cdn.example.com/images/other/outputs/r/img.png") is None
    assert store.key_for_url("https://elsewhere.example.com/images/loraserve/outputs/r/img.png") is None


def test_presigning_for_the_public_host_with_read_only_credentials(s3_endpoint: str, tmp_path: Path) -> None:
    store = S3ObjectStore(
        _settings(
            s3_endpoint,
            presign_endpoint="http://files.invalid:9000",
            presign_access_key="reader",
            presign_secret_key="reader-secret",
        )
    )
    stored = store.put("outputs/r/img.png", png_bytes(), "image/png")
    assert stored.url.startswith("http://files.invalid:9000/")
    signed = verify_presigned_url(stored.url, READERS, host="files.invalid:9000")
    assert signed.access_key == "reader" and signed.expires_seconds == 120
    # The reader's keys may read what the URL names, and nothing more.
    reader = Minio(s3_endpoint, access_key="reader", secret_key="reader-secret", secure=False, region="us-east-1")
    assert reader.get_object(store.bucket, store.object_name("outputs/r/img.png")).read() == png_bytes()
    with pytest.raises(S3Error) as refused:
        reader.put_object(store.bucket, "loraserve/outputs/r/forged.png", io.BytesIO(b"x"), 1)
    assert refused.value.code == "AccessDenied"
    # Our own URL is read from the bucket directly: files.invalid never has to resolve.
    policy = FetchPolicy(timeout_seconds=2.0)
    assert fetch_bytes(stored.url, "image_url", policy, store=store) == png_bytes()
    cache = WeightsCache(tmp_path, policy, store=store)
    lora = store.put("uploads/u/lora.safetensors", safetensors_bytes(), "application/x-safetensors")
    assert cache.resolve(lora.url, "loras[0].path").read_bytes() == safetensors_bytes()


def test_put_stream_of_unknown_length(s3_endpoint: str) -> None:
    store = S3ObjectStore(_settings(s3_endpoint))
    data = secrets.token_bytes(6 * 1024 * 1024)
    stored = store.put_stream("big/blob.bin", io.BytesIO(data), -1, "application/octet-stream")
    assert stored.size == len(data)
    assert store.get("big/blob.bin") == data


def test_upload_writer_streams_to_s3_and_leaves_nothing_when_refused(s3_endpoint: str) -> None:
    settings = _settings(s3_endpoint)
    store = S3ObjectStore(settings)
    data = png_bytes((64, 64))
    with UploadWriter(store, "uploads/u2/in.png", max_bytes=10_000, declared_content_type="text/plain") as writer:
        for start in range(0, len(data), 100):
            writer.write(data[start : start + 100])
        stored = writer.commit()
    assert stored.content_type == "image/png" and store.get("uploads/u2/in.png") == data
    weights = safetensors_bytes()
    with (
        pytest.raises(UploadRefused, match="larger than 1000 bytes"),
        UploadWriter(store, "uploads/u3/lora.safetensors", max_bytes=1000) as writer,
    ):
        for start in range(0, len(weights), 100):
            writer.write(weights[start : start + 100])
    objects = _raw_client(s3_endpoint).list_objects(settings.bucket, prefix="loraserve/uploads/u3", recursive=True)
    assert list(objects) == []


def test_factory_and_settings_validation(s3_endpoint: str, tmp_path: Path) -> None:
    local = make_object_store("local", local_root=tmp_path, local_base_url="http://127.0.0.1:8080")
    assert isinstance(local, LocalObjectStore)
    remote = make_object_store("s3", local_root=tmp_path, local_base_url="", s3=_settings(s3_endpoint))
    assert isinstance(remote, S3ObjectStore)
    with pytest.raises(ValueError, match="needs S3 settings"):
        make_object_store("s3", local_root=tmp_path, local_base_url="")
    with pytest.raises(ValueError, match="must be one of local, s3"):
        make_object_store("gcs", local_root=tmp_path, local_base_url="")
    # Each refusal names the setting an operator gave.
    with pytest.raises(ValueError, match=r"s3_endpoint must be host\[:port\] without a scheme or path, got 'http://"):
        _settings("http://127.0.0.1:9000")
    with pytest.raises(ValueError, match=r"s3_presign_expiry_seconds must be between 1 and 604800, got 691200"):
        _settings(s3_endpoint, presign_expiry_seconds=8 * 24 * 3600)
    with pytest.raises(InvalidKey, match=r"s3_key_prefix: object key '\.\./up' is not a relative path"):
        _settings(s3_endpoint, key_prefix="../up")
    with pytest.raises(ValueError, match=r"s3_presign_endpoint must be an http\(s\) URL, got 'files\.example'"):
        _settings(s3_endpoint, presign_endpoint="files.example")
    with pytest.raises(ValueError, match="s3_presign_access_key and s3_presign_secret_key must be set together"):
        _settings(s3_endpoint, presign_access_key="reader")


def test_the_gateway_url_of_a_key_is_recognised_and_re_signed(s3_endpoint: str, tmp_path: Path) -> None:
    """fal's v3 multipart `access_url` is the gateway's unsigned name of the key: an input, re-signed in results."""
    store = make_object_store(
        "s3", local_root=tmp_path, local_base_url="http://gateway.test:8080/", s3=_settings(s3_endpoint)
    )
    key = "tenants/abc/uploads/x/in.png"
    store.put(key, png_bytes(), "image/png")
    unsigned = store.unsigned_url(key)
    assert unsigned == f"http://gateway.test:8080/files/{key}"
    assert store.key_for_url(unsigned) == key
    assert store.key_for_url(store.url(key)) == key and "X-Amz-Signature" in store.url(key)
    assert fetch_bytes(unsigned, "input.image_url", FetchPolicy(), store=store) == png_bytes()
    assert store.key_for_url("http://gateway.test:8080/elsewhere/in.png") is None


def _with_query(url: str, **changes: str) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True)) | changes
    return urlunsplit(parts._replace(query=urlencode(query)))


def _download_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code


def test_the_s3_server_checks_header_signatures_and_each_keys_policy(s3_endpoint: str) -> None:
    """moto runs with authentication on: a wrong secret, an unknown key or a read-only key cannot write."""
    store = S3ObjectStore(_settings(s3_endpoint))
    store.put("a.txt", b"one", "text/plain")
    for access_key, secret_key, code in (
        ("writer", "not-the-secret", "SignatureDoesNotMatch"),
        ("nobody", "writer-secret", "InvalidAccessKeyId"),
        ("reader", "reader-secret", "AccessDenied"),
    ):
        client = Minio(s3_endpoint, access_key=access_key, secret_key=secret_key, secure=False, region="us-east-1")
        with pytest.raises(S3Error) as refused:
            client.put_object(store.bucket, "loraserve/b.txt", io.BytesIO(b"two"), 3)
        assert refused.value.code == code, access_key
    # The store's own client is refused too (a HEAD answers with a bare 403, so no code to compare).
    with pytest.raises(S3Error):
        S3ObjectStore(_settings(s3_endpoint, bucket=store.bucket, secret_key="not-the-secret")).put(
            "c.txt", b"x", "text/plain"
        )
    assert [obj.object_name for obj in _raw_client(s3_endpoint).list_objects(store.bucket, recursive=True)] == [
        "loraserve/a.txt"
    ]


def test_a_tampered_expired_wrong_key_or_wrong_host_url_is_refused(s3_endpoint: str) -> None:
    """The verifier the URL checks rely on refuses each kind of bad URL, and so does the S3 server it fronts."""
    store = S3ObjectStore(_settings(s3_endpoint))
    store.put("outputs/r/a.png", png_bytes(), "image/png")
    store.put("outputs/r/b.png", png_bytes((8, 8)), "image/png")
    url = store.url("outputs/r/a.png")
    signed = verify_presigned_url(url, WRITERS, host=s3_endpoint)
    assert _download_status(url) == 200
    parts = urlsplit(url)
    bad = {
        "another object": urlunsplit(parts._replace(path=parts.path.replace("a.png", "b.png"))),
        "a longer expiry": _with_query(url, **{"X-Amz-Expires": "604800"}),
        "a zeroed signature": _with_query(url, **{"X-Amz-Signature": "0" * 64}),
        "an unknown key": _with_query(
            url, **{"X-Amz-Credential": dict(parse_qsl(parts.query))["X-Amz-Credential"].replace("writer", "nobody")}
        ),
        "another key's name": _with_query(
            url, **{"X-Amz-Credential": dict(parse_qsl(parts.query))["X-Amz-Credential"].replace("writer", "reader")}
        ),
        "a date in 2000": _with_query(url, **{"X-Amz-Date": "20000101T000000Z"}),
        "another host": urlunsplit(parts._replace(netloc=f"localhost:{parts.port}")),
    }
    for what, tampered in bad.items():
        with pytest.raises(PresignedUrlRefused):
            verify_presigned_url(tampered, ALL_KEYS)
        assert _download_status(tampered) == 403, what
    with pytest.raises(PresignedUrlRefused, match="signature does not match"):
        verify_presigned_url(url, {"writer": "not-the-secret"})
    with pytest.raises(PresignedUrlRefused, match="unknown access key"):
        verify_presigned_url(url, READERS)
    with pytest.raises(PresignedUrlRefused, match="expired"):
        verify_presigned_url(url, WRITERS, now=signed.valid_until + timedelta(seconds=1))
    with pytest.raises(PresignedUrlRefused, match="host"):
        verify_presigned_url(url, WRITERS, host="files.invalid:9000")
    assert verify_presigned_url(url, WRITERS, now=datetime.now(UTC)) == signed
