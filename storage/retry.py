"""Object-store writes retried with backoff, for writes whose failure would throw finished work away.

A generation's outputs exist only in the worker's memory until they are stored: one S3
hiccup (a 503, a dropped connection, SlowDown) at that moment would otherwise fail a
request whose GPU time is already spent. Writes are retried a bounded number of times
with capped exponential backoff and jitter (core/backoff.py), so replicas hitting the same outage do
not retry in step; after the last attempt the caller gets `StorageUnavailable`, which
the worker reports as a failed worker attempt (the gateway may run it again elsewhere).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import urllib3
from minio.error import InvalidResponseError, S3Error, ServerError

from core.backoff import Backoff
from storage.object_store import ObjectStore, StoredObject

log = logging.getLogger(__name__)

# Answers that say "not now" rather than "never": the server is busy, overloaded or timed out.
_RETRY_STATUSES = frozenset({408, 429})
_RETRY_S3_CODES = frozenset({"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "OperationAborted"})


def is_transient(exc: BaseException) -> bool:
    """Whether the store (not the key, the data or the configuration) is at fault, so a retry may work.

    Local disk errors, connections urllib3 gave up on, and S3 5xx / throttling answers are;
    AccessDenied, NoSuchBucket, bad credentials, other 4xx answers and unwritable folders are
    not: retrying them only delays the error the operator has to fix.
    """
    if isinstance(exc, PermissionError):
        return False
    if isinstance(exc, (OSError, urllib3.exceptions.HTTPError)):
        return True
    if isinstance(exc, S3Error):
        return exc.code in _RETRY_S3_CODES or _retry_status(exc.response.status)
    if isinstance(exc, ServerError):
        return _retry_status(exc.status_code)
    if isinstance(exc, InvalidResponseError):
        # A proxy's error page in front of the store; minio keeps its status only in `_code`.
        return _retry_status(int(getattr(exc, "_code", 0)))
    return False


def _retry_status(status: int) -> bool:
    return status >= 500 or status in _RETRY_STATUSES


class StorageUnavailable(Exception):
    """The store failed a write through every attempt."""


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5
    base_delay_seconds: float = 0.5
    max_delay_seconds: float = 8.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"storage write attempts must be at least 1, got {self.attempts}")
        for name in ("base_delay_seconds", "max_delay_seconds"):
            if getattr(self, name) < 0:
                raise ValueError(f"storage retry {name} must not be negative, got {getattr(self, name)}")

    def delay(self, retry: int, rand: Callable[[], float] = random.random) -> float:
        """Before retry number `retry` (0-based): between half and all of min(cap, base * 2**retry)."""
        return Backoff(self.base_delay_seconds, max(self.base_delay_seconds, self.max_delay_seconds)).delay(
            retry + 1, rand
        )


def put_retrying(
    store: ObjectStore,
    key: str,
    data: bytes,
    content_type: str,
    policy: RetryPolicy,
    *,
    sleep: Callable[[float], None] = time.sleep,
    rand: Callable[[], float] = random.random,
) -> StoredObject:
    """`store.put`, retried on store failures; the same key each time, so a retry overwrites, never duplicates.

    Other errors (an invalid key, a refused write) are raised at once: retrying cannot fix them.
    """
    for attempt in range(1, policy.attempts + 1):
        try:
            return store.put(key, data, content_type)
        except Exception as exc:
            if not is_transient(exc):
                raise
            detail = f"{type(exc).__name__}: {exc}"
            if attempt == policy.attempts:
                raise StorageUnavailable(
                    f"could not store {key!r} after {attempt} attempt(s): {detail}"
                ) from exc
            delay = policy.delay(attempt - 1, rand)
            log.warning(
                "object store write failed; retrying",
                extra={"key": key, "attempt": attempt, "delay_seconds": round(delay, 3), "error": detail},
            )
            sleep(delay)
    raise AssertionError("unreachable: the loop returns or raises")
