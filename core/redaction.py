"""Keeping secrets that callers and operators put in strings out of logs and error messages.

Callers name inputs by URL, and a URL may carry a signature, a token or a password; operators
configure DSNs and keys. Whatever is written to a log line or sent back in an error goes
through here, so a secret that slipped into a message is cut before it is stored anywhere.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

MAX_SHOWN_URL_CHARS = 200
REDACTED = "***"

# A URL in free text ends at whitespace, a quote, an angle bracket or a backslash (JSON strings, reprs, HTML).
_URL_IN_TEXT = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>`\\]+")
# fal's `Authorization: Key <id>:<secret>` and bearer tokens: the id may stay, the secret may not.
_KEY_HEADER = re.compile(r"\b(Key\s+[A-Za-z0-9_.-]+:)[^\s'\",;]+")
_BEARER = re.compile(r"\b(Bearer\s+)[^\s'\",;]+", re.IGNORECASE)
# `secret_key=...`, `"password": "..."`, `token: ...` outside URLs.
_SECRET_ASSIGNMENT = re.compile(
    r"(?i)\b([a-z0-9_-]*(?:password|passwd|secret|token|api[_-]?key|access[_-]?key|signature|credential)[a-z0-9_-]*"
    r"[\"']?\s*[:=]\s*[\"']?)([^\s\"',;&}]+)"
)


def redact_url(url: str) -> str:
    """The URL without user info, query and fragment (where signatures, tokens and passwords go), shortened."""
    if url[:5].lower() == "data:":
        return f"{url.split(',', 1)[0][:60]},… ({len(url)} characters)"
    try:
        parts = urlsplit(url)
    except ValueError:
        return REDACTED
    shown = urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))
    return shown if len(shown) <= MAX_SHOWN_URL_CHARS else shown[: MAX_SHOWN_URL_CHARS - 1] + "…"


def redact_text(text: str) -> str:
    """Every URL in `text` redacted as `redact_url` does, and API-key secrets, bearer tokens and
    `password=`/`token:`-style values replaced by `***`."""
    text = _URL_IN_TEXT.sub(lambda match: redact_url(match.group(0)), text)
    text = _KEY_HEADER.sub(rf"\g<1>{REDACTED}", text)
    text = _BEARER.sub(rf"\g<1>{REDACTED}", text)
    return _SECRET_ASSIGNMENT.sub(rf"\g<1>{REDACTED}", text)
