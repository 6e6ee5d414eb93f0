"""The HTTP side refuses hostile or malformed requests with fal's JSON `detail`, never a 500, and a web page
the gateway's user opens can neither read from nor write to it: raw HTTP against a real gateway whose
workers are the test's own (tests/integration/test_fal_http.py's ImageWorker).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.fal_http import allowed_origins
from tests.conftest import gateway_for
from tests.integration.test_fal_http import BODY, JSON, call, gateway, http, on_worker, worker  # noqa: F401
from tests.unit.worker_testkit import WorkerServer

pytestmark = pytest.mark.integration

DEEP = b"[" * 100_000 + b"]" * 100_000


def body_with(raw_value: bytes, field: bytes = b"guidance_scale") -> bytes:
    return b'{"model_name": "org/model", "prompt": "a red house", "' + field + b'": ' + raw_value + b"}"


async def test_malformed_requests_are_4xx_in_fals_detail_shape(http: aiohttp.ClientSession) -> None:
    """Each of these was a 500 (a text page, or fal's JSON saying only "internal error")."""
    async def answer(method: str, path: str, status: int, **kwargs: Any) -> Any:
        got, body, _ = await call(http, method, path, **kwargs)
        assert got == status, (path, body)
        assert body["detail"], body
        return body["detail"]

    detail = await answer("POST", "/api/fal/proxy", 400, json=BODY, headers={"x-fal-target-url": "http://[::1"})
    assert "x-fal-target-url" in detail
    await answer("GET", "/files/uploads/a/b.png?expires=\u00b2&signature=x", 403)
    await answer("PUT", "/storage/upload/put/uploads/a/b.png?expires=\u00b2&signature=x", 403, data=b"x")
    _, started, _ = await call(http, "POST", "/storage/upload/initiate-multipart", json={"file_name": "a.png"})
    detail = await answer("PUT", started["upload_url"] + "/\u00b2", 400, data=b"x")
    assert "part number" in detail
    detail = await answer("POST", "/fal-ai/lora", 413, data=b" " * (32 * 1024 * 1024 + 1), headers={"Content-Type": JSON})
    assert "larger than" in detail
    for path in ("/fal-ai/lora", "/run/fal-ai/lora", "/storage/upload/initiate"):
        detail = await answer("POST", path, 422, data=DEEP, headers={"Content-Type": JSON})
        assert detail[0]["loc"] == ["body"] and "nests deeper" in detail[0]["msg"]
    detail = await answer("POST", "/fal-ai/lora", 422, data=body_with(b"9" * 400), headers={"Content-Type": JSON})
    assert [entry["loc"] for entry in detail] == [["body", "guidance_scale"]]
    detail = await answer("POST", "/fal-ai/lora", 422, data=body_with(b'"\\ud800"', b"negative_prompt"), headers={"Content-Type": JSON})
    assert detail == [
        {"loc": ["body", "negative_prompt"], "msg": "is not Unicode text: it holds a lone surrogate", "type": "value_error.str"}
    ]
    detail = await answer("POST", "/fal-ai/lora", 422, data=body_with(b"1", b"\\udfff"), headers={"Content-Type": JSON})
    assert [entry["loc"] for entry in detail] == [["body", "\\udfff"]]
    detail = await answer(
        "POST", "/fal-ai/lora", 422, data=body_with(b'[{"path": "x", "ip_adapter_image_url": ["\\ud83d"]}]', b"ip_adapter"),
        headers={"Content-Type": JSON},
    )
    assert ["body", "ip_adapter", 0, "ip_adapter_image_url", 0] in [entry["loc"] for entry in detail]


async def test_json_bodies_must_be_declared_json(http: aiohttp.ClientSession) -> None:
    """A page can POST text/plain across origins without a preflight; JSON it cannot."""
    import json

    for path in ("/fal-ai/lora", "/run/fal-ai/lora", "/storage/upload/initiate"):
        for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
            headers = {"Content-Type": content_type} if content_type else {}
            status, body, _ = await call(http, "POST", path, data=json.dumps(BODY).encode(), headers=headers)
            assert status == 415 and "application/json" in body["detail"], (path, content_type, body)
    status, body, _ = await call(http, "POST", "/fal-ai/lora", json=BODY, headers={"Content-Type": "application/json; charset=utf-8"})
    assert status == 200, body


async def test_pages_of_other_origins_get_no_cors_and_cannot_write(http: aiohttp.ClientSession) -> None:
    origin = "https://evil.example"
    status, body, headers = await call(http, "GET", "/fal-ai/lora/requests/x/status", headers={"Origin": origin})
    assert status == 404 and "Access-Control-Allow-Origin" not in headers
    for method, path in (("POST", "/fal-ai/lora"), ("POST", "/storage/upload/initiate"), ("POST", "/files/upload")):
        status, body, headers = await call(http, method, path, json=BODY, headers={"Origin": origin})
        assert status == 403 and "cors_allowed_origins" in body["detail"], (path, body)
        assert "Access-Control-Allow-Origin" not in headers
    preflight = {"Origin": origin, "Access-Control-Request-Method": "POST"}
    status, body, headers = await call(http, "OPTIONS", "/fal-ai/lora", headers=preflight)
    assert status == 403 and "Access-Control-Allow-Origin" not in headers
    with pytest.raises(ValueError, match="cors_allowed_origins.*app.example/path"):
        allowed_origins("https://ok.example, https://app.example/path")


async def test_keyless_gateway_answers_only_loopback_and_public_names(
    http: aiohttp.ClientSession, tmp_path: Path, worker: WorkerServer
) -> None:
    """DNS rebinding: a name the attacker controls resolves to 127.0.0.1, and the browser sends it as Host."""
    rebound = {"Host": "attacker.example:8080"}
    for method, path in (
        ("POST", "/fal-ai/lora"),
        ("GET", "/fal-ai/lora/requests/x/status"),
        ("POST", "/storage/upload/initiate"),
        ("GET", "/files/uploads/a/b.png?expires=1&signature=x"),
    ):
        status, body, _ = await call(http, method, path, json=BODY, headers=rebound)
        assert status == 421 and "public_url" in body["detail"], (path, body)
    async with http.get("/healthz", headers=rebound) as response:
        assert response.status == 200
    for host in ("localhost", "127.0.0.1:1234", "[::1]:80", "LOCALHOST:9"):
        status, body, _ = await call(http, "POST", "/fal-ai/lora", json=BODY, headers={"Host": host})
        assert status == 200, (host, body)
    async with (
        gateway_for(on_worker(tmp_path, worker.port, public_url="https://lora.example.com")) as named,
        gateway_for(on_worker(tmp_path, worker.port, grpc_host="0.0.0.0")) as keyed,
    ):
        async with aiohttp.ClientSession(f"http://127.0.0.1:{named.settings.http_port}") as session:
            status, _, _ = await call(session, "POST", "/fal-ai/lora", json=BODY, headers={"Host": "lora.example.com"})
            assert status == 200
            status, _, _ = await call(session, "POST", "/fal-ai/lora", json=BODY, headers=rebound)
            assert status == 421
        # With keys, the key proves the caller whatever Host it names.
        async with aiohttp.ClientSession(f"http://127.0.0.1:{keyed.settings.http_port}") as session:
            status, _, _ = await call(session, "POST", "/fal-ai/lora", json=BODY, headers=rebound)
            assert status == 401
