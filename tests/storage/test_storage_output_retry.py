"""A store failure while a finished generation's outputs are written is retried, not a lost request.

The worker's own output-writing code (Worker._store_outputs) writes to moto's S3 server
through a wrapper whose first puts fail the way minio reports an S3 outage (ServerError).
"""

from __future__ import annotations

import io
import secrets
import urllib.request
from pathlib import Path
from typing import BinaryIO

import numpy as np
import PIL.Image
import pytest
import urllib3
from minio import Minio
from minio.error import InvalidResponseError, S3Error, ServerError

from core.config import Settings
from loraserve.errors import ErrorType
from serving.app import Worker, _failure
from serving.latents import OutputFile
from serving.pipelines import GenerationResult
from storage.object_store import InvalidKey, LocalObjectStore, ObjectStore, StoredObject
from storage.retry import RetryPolicy, StorageUnavailable, is_transient, put_retrying
from storage.s3 import S3ObjectStore, S3Settings


class FlakyStore:
    """Delegates to a real store; its first `failures` puts raise as an S3 outage would."""

    def __init__(self, inner: ObjectStore, failures: int) -> None:
        self.inner = inner
        self.failures = failures
        self.put_keys: list[str] = []

    def put(self, key: str, data: bytes, content_type: str) -> StoredObject:
        self.put_keys.append(key)
        if len(self.put_keys) <= self.failures:
            raise ServerError(f"server failed with HTTP status code 503 (put {len(self.put_keys)})", 503)
        return self.inner.put(key, data, content_type)

    def put_stream(self, key: str, readable: BinaryIO, length: int, content_type: str) -> StoredObject:
        return self.inner.put_stream(key, readable, length, content_type)

    def get(self, key: str) -> bytes:
        return self.inner.get(key)

    def url(self, key: str, expires_in_seconds: float | None = None) -> str:
        return self.inner.url(key, expires_in_seconds)

    def key_for_url(self, url: str) -> str | None:
        return self.inner.key_for_url(url)


@pytest.fixture(scope="module")
def worker(s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Worker:
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("worker-data"),
        device="cpu",
        object_store="s3",
        s3_endpoint=s3_endpoint,
        s3_access_key="writer",
        s3_secret_key="writer-secret",
        s3_bucket=f"outputs-{secrets.token_hex(4)}",
        s3_secure=False,
        output_write_attempts=4,
        output_write_backoff_seconds=0.001,
        output_write_max_backoff_seconds=0.002,
    )
    return Worker(settings)


def _result(images: int) -> GenerationResult:
    rng = np.random.default_rng(0)
    return GenerationResult(
        images=[PIL.Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)) for _ in range(images)],
        debug_latents=OutputFile(data=b"latents", content_type="application/octet-stream", file_name="l.safetensors"),
    )


def test_outputs_are_stored_after_failed_puts(worker: Worker) -> None:
    real = worker._store
    flaky = FlakyStore(real, failures=3)
    worker._store = flaky
    result = _result(images=2)
    try:
        output = worker._store_outputs("req-flaky", result, "png")
    finally:
        worker._store = real

    assert len(output.images) == 2
    for image, original in zip(output.images, result.images, strict=True):
        with urllib.request.urlopen(image.url, timeout=5) as response:
            stored = PIL.Image.open(io.BytesIO(response.read()))
        assert np.array_equal(np.asarray(stored), np.asarray(original))
    assert real.get(real.key_for_url(output.debug_latents.url) or "") == b"latents"
    # Three failures then three writes; each retry used the key of the write it repeats.
    assert len(flaky.put_keys) == 6
    assert flaky.put_keys[:4] == [flaky.put_keys[0]] * 4
    assert len(set(flaky.put_keys)) == 3


def test_a_store_that_stays_down_fails_the_attempt_as_worker_failed(worker: Worker) -> None:
    real = worker._store
    flaky = FlakyStore(real, failures=100)
    worker._store = flaky
    try:
        with pytest.raises(StorageUnavailable) as caught:
            worker._store_outputs("req-down", _result(images=1), "png")
    finally:
        worker._store = real

    assert len(flaky.put_keys) == 4, "bounded by output_write_attempts"
    failure = _failure(caught.value, "req-down").failure
    assert failure.type == ErrorType.WORKER_FAILED
    assert "after 4 attempt(s)" in failure.message and "503" in failure.message


def test_backoff_doubles_up_to_the_cap_with_jitter(tmp_path: Path) -> None:
    flaky = FlakyStore(LocalObjectStore(tmp_path, "http://files"), failures=4)
    slept: list[float] = []
    policy = RetryPolicy(attempts=5, base_delay_seconds=1.0, max_delay_seconds=3.0)

    stored = put_retrying(flaky, "a/b.png", b"x", "image/png", policy, sleep=slept.append, rand=lambda: 0.5)

    assert stored.key == "a/b.png" and (tmp_path / "a" / "b.png").read_bytes() == b"x"
    assert slept == [0.75, 1.5, 2.25, 2.25]
    assert [policy.delay(retry, rand=lambda: 1.0) for retry in range(4)] == [1.0, 2.0, 3.0, 3.0]
    assert policy.delay(2, rand=lambda: 0.0) == 1.5, "never less than half the ceiling"
    assert policy.delay(5000, rand=lambda: 1.0) == 3.0


def test_caller_errors_are_not_retried(tmp_path: Path) -> None:
    slept: list[float] = []
    with pytest.raises(InvalidKey):
        store = LocalObjectStore(tmp_path, "http://files")
        put_retrying(store, "../x", b"x", "text/plain", RetryPolicy(), sleep=slept.append)
    assert slept == []


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({"attempts": 0}, "attempts must be at least 1, got 0"),
        ({"base_delay_seconds": -1.0}, "base_delay_seconds must not be negative, got -1.0"),
        ({"max_delay_seconds": -1.0}, "max_delay_seconds must not be negative, got -1.0"),
    ],
)
def test_policy_refuses_nonsense(changes: dict[str, float], why: str) -> None:
    with pytest.raises(ValueError) as refused:
        RetryPolicy(**changes)  # type: ignore[arg-type]
    assert why in str(refused.value)


def _s3_error(status: int, code: str) -> S3Error:
    return S3Error(urllib3.HTTPResponse(status=status), code, "message", "/bucket/key", "req", "host")


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (_s3_error(503, "SlowDown"), True),
        (_s3_error(500, "InternalError"), True),
        (_s3_error(400, "RequestTimeout"), True),
        (_s3_error(403, "AccessDenied"), False),
        (_s3_error(404, "NoSuchBucket"), False),
        (_s3_error(403, "InvalidAccessKeyId"), False),
        (ServerError("server failed with HTTP status code 502", 502), True),
        (ServerError("server failed with HTTP status code 304", 304), False),
        (InvalidResponseError(503, "text/html", "<html>busy</html>"), True),
        (InvalidResponseError(403, "text/html", "<html>no</html>"), False),
        (urllib3.exceptions.MaxRetryError(None, "/bucket/key", "connection refused"), True),
        (OSError(28, "No space left on device"), True),
        (PermissionError(13, "Permission denied"), False),
        (ValueError("object 'k': expected 3 bytes, the source ended after 2"), False),
    ],
)
def test_which_store_errors_are_retried(error: Exception, transient: bool) -> None:
    assert is_transient(error) is transient


def test_a_refused_write_is_not_retried(s3_endpoint: str) -> None:
    """A write S3 refuses for good (here: the bucket was deleted) fails at once, with S3's own error."""
    settings = S3Settings(
        endpoint=s3_endpoint,
        access_key="writer",
        secret_key="writer-secret",
        bucket=f"gone-{secrets.token_hex(4)}",
        secure=False,
    )
    store = S3ObjectStore(settings)
    Minio(s3_endpoint, access_key="writer", secret_key="writer-secret", secure=False).remove_bucket(settings.bucket)
    slept: list[float] = []
    with pytest.raises(S3Error) as caught:
        put_retrying(store, "outputs/r/a.png", b"x", "image/png", RetryPolicy(), sleep=slept.append)
    assert caught.value.code == "NoSuchBucket"
    assert slept == []
