"""Hostile inputs through the running service: local paths, served files, secrets in references."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from loraserve.client import AsyncClient
from core.config import Settings
from core.model_key import BaseModelRef
from loraserve.v1 import generation_pb2 as gen
from serving.tiny import TinyModel
from tests.integration.test_generation_api import request

pytestmark = pytest.mark.integration


@pytest.fixture
def outside() -> Iterator[Path]:
    """A folder outside the stack's allowed_local_roots (pytest's temp folders)."""
    folder = Path(tempfile.mkdtemp(prefix="loraserve-outside-"))
    yield folder
    shutil.rmtree(folder)


async def _failure(target: str, body: dict[str, object]) -> tuple[gen.RequestStatus, list[str]]:
    async with AsyncClient(target) as client:
        request_id = await client.submit(body)
        logs: list[str] = []
        async for status in client.stream_status(request_id, logs=True):
            logs.extend(entry.message for entry in status.logs)
            final = status
    return final, logs


async def test_a_path_outside_the_roots_fails_the_same_whether_or_not_it_exists(
    target: str, stack_settings: Settings, tiny_sdxl: TinyModel, outside: Path
) -> None:
    assert not outside.is_relative_to(stack_settings.local_roots[0])
    real = outside / "style.safetensors"
    shutil.copy(tiny_sdxl.lora_paths[0], real)
    (outside / "notes.safetensors").write_bytes(b"not weights")
    messages = []
    for path in (real, outside / "missing.safetensors", outside / "notes.safetensors", outside):
        final, _ = await _failure(target, request(tiny_sdxl, loras=[{"path": str(path)}]))
        assert final.error.type == "INVALID_INPUT"
        messages.append(final.error.message.replace(str(path), "<path>"))
    assert len(set(messages)) == 1, messages
    assert "input.loras[0].path" in messages[0] and "allowed_local_roots" in messages[0]
    final, _ = await _failure(target, request(tiny_sdxl, model_name=str(outside)))
    assert "allowed_local_roots" in final.error.message


async def test_an_html_named_json_upload_is_served_as_a_json_attachment_only_signed(target: str) -> None:
    async with AsyncClient(target) as client:
        uploaded = await client.upload(b'{"a": "<script>alert(1)</script>"}' + b" " * 64, file_name="x.html")

    def get(url: str) -> tuple[int, dict[str, str]]:
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                return response.status, dict(response.headers)
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers)

    status, headers = await asyncio.to_thread(get, uploaded.url)
    assert status == 200
    assert headers["Content-Type"].split(";")[0] == "application/json"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Content-Disposition"].startswith("attachment")
    parts = urlsplit(uploaded.url)
    unsigned, _ = await asyncio.to_thread(get, f"{parts.scheme}://{parts.netloc}{parts.path}")
    assert unsigned == 403


async def test_a_token_in_model_name_reaches_neither_errors_logs_nor_the_routing_key(
    target: str, stack_settings: Settings, tiny_sdxl: TinyModel
) -> None:
    model = "http://127.0.0.1:9/private/model.safetensors?token=tok_s3cr3t_42&X-Amz-Signature=sig_s3cr3t_42"
    final, logs = await _failure(target, request(tiny_sdxl, model_name=model))
    assert final.error.message and "s3cr3t" not in final.error.message
    assert "http://127.0.0.1:9/private/model.safetensors" in final.error.message
    assert not [line for line in logs if "s3cr3t" in line]
    # The key the dispatcher routes by (Serve's multiplexed_model_id), as the store keeps it.
    with sqlite3.connect(f"file:{stack_settings.store_path}?mode=ro", uri=True) as db:
        (key,) = db.execute("SELECT model_key FROM requests WHERE id = ?", (final.request_id,)).fetchone()
    assert key == BaseModelRef.normalised(model).key and "s3cr3t" not in key
