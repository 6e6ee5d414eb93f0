"""What a submit asks of the queue besides its input: fal's priority, start timeout and webhook URL.

These are the gateway's alone (the worker never sees them), so they are checked here, after the
request model has checked the input (loraserve/request/validation.py). The webhook URL is checked
against the same fetch policy as the inputs the workers fetch (storage/fetch.py).
"""

from __future__ import annotations

import math

from core.config import Settings
from gateway.errors import InvalidArgument
from loraserve.request.validation import ascii_url
from loraserve.request.violations import FieldViolation
from storage.fetch import InputFetchError, check_url
from storage.from_settings import image_fetch_policy

PRIORITIES = {"": 0, "normal": 0, "low": 1}


def priority_rank(priority: str) -> int:
    """fal's queue priorities as the store's rank (0 first); anything else is refused by name."""
    if priority not in PRIORITIES:
        raise InvalidArgument([FieldViolation("priority", f"must be 'normal' or 'low', got {priority!r}")])
    return PRIORITIES[priority]


def validate_start_timeout(seconds: float) -> None:
    """fal's clients refuse a start timeout of 1 s or less; 0 means none."""
    if not math.isfinite(seconds) or seconds < 0 or 0 < seconds <= 1:
        raise InvalidArgument(
            [FieldViolation("start_timeout", f"must be 0 (no limit) or more than 1 second, got {seconds}")]
        )


MAX_WEBHOOK_URL_CHARS = 2048


def validate_webhook_url(url: str, settings: Settings) -> str:
    """fal's `fal_webhook`, POSTed to when the request ends: refused now if it can never be used (scheme,
    credentials, a forbidden address written as an IP); each attempt checks the resolved addresses again.
    Returns it in the ASCII form it is sent to (`ascii_url`)."""
    if not url:
        return url
    if len(url) > MAX_WEBHOOK_URL_CHARS:
        raise InvalidArgument(
            [FieldViolation("webhook_url", f"is longer than {MAX_WEBHOOK_URL_CHARS} characters ({len(url)})")]
        )
    try:
        sent = ascii_url(url)
        check_url(sent, "webhook_url", image_fetch_policy(settings), resolve=False)
    except (InputFetchError, ValueError) as exc:
        reason = exc.reason if isinstance(exc, InputFetchError) else str(exc)
        raise InvalidArgument([FieldViolation("webhook_url", reason)]) from None
    return sent
