"""The shared secret between the gateway and the workers.

Ray Serve's gRPC ingress has no authentication of its own and listens on every interface, so
anyone who reaches it could skip the gateway's queue, keys, quotas and validation. The gateway
sends `worker_shared_secret` as metadata on every call and the workers refuse a call without it.
Here, not in gateway/ or serving/, because both sides need the same name and comparison.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Iterable

from core.config import Settings

METADATA_KEY = "loraserve-worker-secret"


def with_generated_secret(settings: Settings) -> Settings:
    """`settings` with a fresh random secret when none is set: for a process that starts both sides."""
    if settings.worker_shared_secret:
        return settings
    return settings.replace(worker_shared_secret=secrets.token_urlsafe(32))


def caller_secret(metadata: Iterable[tuple[str, str | bytes]]) -> str:
    """The secret a call carries ("" when none)."""
    for key, value in metadata:
        if key.lower() == METADATA_KEY:
            return value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    return ""


def secret_matches(expected: str, presented: str) -> bool:
    """In constant time, so response times tell a caller nothing about how much of a guess was right.

    An empty `expected` accepts every caller (the operator set no secret).
    """
    if not expected:
        return True
    return hmac.compare_digest(expected.encode(), presented.encode())
