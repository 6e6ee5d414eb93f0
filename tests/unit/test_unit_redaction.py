"""Secrets out of logs and errors: core.redaction and the log formatters."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from core.logs import ConsoleFormatter, JsonFormatter, redact_log_records
from core.redaction import redact_text, redact_url

SECRETS = ("s3cr3tSig", "hunter2", "tok_ABC", "k3ysecret", "dbpass", "bearerTOKEN")


@pytest.mark.parametrize(
    ("text", "kept"),
    [
        ("cannot use https://h.example/m.safetensors?X-Amz-Signature=s3cr3tSig&x=1: 404", "https://h.example/m.safetensors"),
        ("model https://user:hunter2@h.example/a/b.safetensors loaded", "https://h.example/a/b.safetensors"),
        ("http://127.0.0.1:8080/files/outputs/r/a.png?expires=1&signature=tok_ABC", "/files/outputs/r/a.png"),
        ("authorization: Key key_1:k3ysecret", "Key key_1:***"),
        ("store postgresql://loraserve:dbpass@db:5432/q", "postgresql://db:5432/q"),
        ('{"s3_secret_key": "hunter2", "steps": 4}', '"steps": 4'),
        ("Authorization: Bearer bearerTOKEN", "Bearer ***"),
    ],
)
def test_redact_text_cuts_secrets_and_keeps_the_rest(text: str, kept: str) -> None:
    shown = redact_text(text)
    assert kept in shown
    assert not any(secret in shown for secret in SECRETS)


def test_plain_references_pass_unchanged() -> None:
    for text in ("org/model", "/models/sdxl/unet", "request started attempt=1", "loaded base model org/m in 2.00s"):
        assert redact_text(text) == text
    uri = "data:application/octet-stream;base64,QUJD"
    assert redact_url(uri) == f"data:application/octet-stream;base64,… ({len(uri)} characters)"


def test_log_lines_are_redacted_in_the_file_and_on_the_console() -> None:
    try:
        raise ValueError("fetch failed for https://h.example/x.safetensors?token=tok_ABC")
    except ValueError:
        record = logging.LogRecord(
            "gateway", logging.WARNING, __file__, 1, "request failed: %s", ("password=hunter2",), sys.exc_info()
        )
    record.url = "https://u:dbpass@h.example/m.safetensors?X-Amz-Signature=s3cr3tSig"
    line = JsonFormatter().format(record)
    entry = json.loads(line)
    assert entry["url"] == "https://h.example/m.safetensors"
    console = ConsoleFormatter(tracebacks=True).format(record)
    for shown in (line, console):
        assert not any(secret in shown for secret in SECRETS), shown
        assert "https://h.example/x.safetensors" in shown


def test_records_are_redacted_when_made_whatever_handler_writes_them() -> None:
    """Ray Serve replicas log through Serve's handlers, not ours: the record itself must be clean."""
    before = logging.getLogRecordFactory()
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(logging.Formatter("%(message)s").format(record))

    logger = logging.getLogger("serving.redaction-test")
    logger.addHandler(Keep())
    try:
        redact_log_records()
        redact_log_records()  # once only
        logger.warning("fetching %s", "https://h.example/m.safetensors?token=tok_ABC")
        logger.warning("plain %d", 3)
    finally:
        logging.setLogRecordFactory(before)
        logger.handlers.clear()
    assert seen == ["fetching https://h.example/m.safetensors", "plain 3"]
