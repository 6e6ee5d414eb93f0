"""fal's queue protocol over HTTP (gateway/fal_http.py) through a real gateway, spoken raw with aiohttp:
every route, the status codes, bodies and headers fal's clients depend on (spec §6), proxy mode,
CORS, forwarded headers and TLS. The workers are the test's own gRPC WorkerService on loopback
(tests/unit/worker_testkit.py), so no Ray is needed; test_fal_clients.py runs fal's real clients
against the whole stack.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from gateway import fal_http
from gateway.auth import new_key
from gateway.server import Gateway
from core.config import Settings
from loraserve.v1 import types_pb2, worker_pb2
from tests.conftest import free_port, gateway_for, own_gateway_settings, self_signed_cert
from tests.unit.worker_testkit import FakeWorker, WorkerServer, wait_until

pytestmark = pytest.mark.integration

BODY: dict[str, Any] = {"model_name": "org/model", "prompt": "a red house", "seed": 2**40}
JSON = "application/json"


class ImageWorker(FakeWorker):
    """Completes with one image record (its `file_size` and `seed` are int64 in the proto)."""

    image_url = "https://files.example/a.png"

    async def Generate(  # noqa: N802 - the gRPC method's name
        self, request: worker_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.GenerateResponse]:
        if self.default != "image":
            async for event in super().Generate(request, context):
                yield event
            return
        yield worker_pb2.GenerateResponse(log=types_pb2.LogEntry(message="working", source="worker", timestamp=1.0))
        yield worker_pb2.GenerateResponse(log=types_pb2.LogEntry(message="done", source="worker", timestamp=2.0))
        image = types_pb2.Image(
            url=self.image_url, content_type="image/png", file_name="a.png", file_size=5_000_000_000,
            width=64, height=64,
        )
        output = types_pb2.GenerateOutput(seed=request.seed, images=[image], has_nsfw_concepts=[False])
        yield worker_pb2.GenerateResponse(result=worker_pb2.WorkerResult(output=output, inference_seconds=0.25))


@pytest.fixture
async def worker() -> AsyncIterator[WorkerServer]:
    server = WorkerServer(ImageWorker())
    server.worker.default = "image"
    await server.start()
    yield server
    await server.stop()


def on_worker(tmp_path: Path, worker_port: int, **overrides: Any) -> Settings:
    """A gateway of its own in front of the worker at `worker_port`, which it retries quickly."""
    base = Settings(
        serve_grpc_port=worker_port,
        retry_backoff_seconds=0.01,
        retry_backoff_max_seconds=0.05,
        worker_unreachable_threshold=1,
    )
    return own_gateway_settings(base, tmp_path, **overrides)


@pytest.fixture
async def gateway(tmp_path: Path, worker: WorkerServer) -> AsyncIterator[Gateway]:
    async with gateway_for(on_worker(tmp_path, worker.port)) as running:
        yield running


@pytest.fixture
async def http(gateway: Gateway) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(f"http://127.0.0.1:{gateway.settings.http_port}") as session:
        yield session


async def call(session: aiohttp.ClientSession, method: str, path: str, **kwargs: Any) -> tuple[int, Any, Any]:
    """(status, JSON body, headers); every JSON reply must say application/json (JS reads others as text)."""
    async with session.request(method, path, allow_redirects=False, **kwargs) as response:
        assert response.headers["Content-Type"].startswith(JSON), await response.text()
        return response.status, await response.json(), response.headers


async def completed(session: aiohttp.ClientSession, status_url: str) -> dict[str, Any]:
    bodies: list[dict[str, Any]] = []

    async def done() -> bool:
        status, body, _ = await call(session, "GET", status_url)
        assert status == (200 if body["status"] == "COMPLETED" else 202)
        bodies.append(body)
        return bool(body["status"] == "COMPLETED")

    await wait_until(done, "the request completed")
    return bodies[-1]


async def test_submit_status_result_as_fal_clients_expect(http: aiohttp.ClientSession, gateway: Gateway) -> None:
    port = gateway.settings.http_port
    status, body, headers = await call(http, "POST", "/fal-ai/lora/", json=BODY)
    assert status == 200
    request_id = body["request_id"]
    base = f"http://127.0.0.1:{port}/fal-ai/lora/requests/{request_id}"
    assert body == {
        "status": "IN_QUEUE",
        "request_id": request_id,
        "response_url": base,
        "status_url": f"{base}/status",
        "cancel_url": f"{base}/cancel",
        "queue_position": 0,
        "gateway_request_id": request_id,
    }
    assert headers["X-Fal-Request-Id"] == request_id
    final = await completed(http, f"/fal-ai/lora/requests/{request_id}/status")
    assert final["logs"] is None and final["metrics"] == {"inference_time": 0.25}
    assert "error" not in final
    for logs in ("true", "1", "TRUE"):
        _, body, _ = await call(http, "GET", f"/fal-ai/lora/requests/{request_id}/status/", params={"logs": logs})
        assert [entry["message"] for entry in body["logs"]] == ["working", "done"]
        assert body["logs"][0]["timestamp"] == "1970-01-01T00:00:01+00:00"
    for logs in ("false", "0"):
        _, body, _ = await call(http, "GET", f"/fal-ai/lora/requests/{request_id}/status", params={"logs": logs})
        assert body["logs"] is None
    for path in (f"/fal-ai/lora/requests/{request_id}", f"/fal-ai/lora/requests/{request_id}/"):
        async with http.get(path, allow_redirects=False) as response:
            assert response.status == 200 and response.headers["X-Fal-Request-Id"] == request_id
            assert response.headers["Content-Type"].startswith(JSON)
            raw = await response.text()
    # Integers are JSON numbers, not proto JSON's strings.
    assert '"seed": 1099511627776' in raw and '"file_size": 5000000000' in raw
    assert json.loads(raw) == {
        "images": [
            {
                "url": "https://files.example/a.png",
                "content_type": "image/png",
                "file_name": "a.png",
                "file_size": 5_000_000_000,
                "width": 64,
                "height": 64,
            }
        ],
        "seed": 2**40,
        "has_nsfw_concepts": [False],
    }


async def test_sub_path_kept_on_submit_only(http: aiohttp.ClientSession, gateway: Gateway) -> None:
    status, body, _ = await call(http, "POST", "/fal-ai/lora/image-to-image", json={**BODY, "image_url": "https://x/a.png"})
    assert status == 200, body
    assert body["status_url"].endswith(f"/fal-ai/lora/requests/{body['request_id']}/status")
    record = await gateway.store.get(body["request_id"])
    assert record is not None and record.input.endpoint == types_pb2.ENDPOINT_IMAGE_TO_IMAGE
    status, body, _ = await call(http, "POST", "/fal-ai/lora/upscale", json=BODY)
    assert status == 404 and "upscale" in body["detail"]


async def test_the_family_paths_validate_their_own_fields(http: aiohttp.ClientSession) -> None:
    """/image-to-image and /inpaint refuse their bad fields with a 422 naming each."""
    status, body, _ = await call(http, "POST", "/fal-ai/lora/inpaint", json={**BODY, "noise_strength": 1.5})
    assert status == 422
    locs = [entry["loc"] for entry in body["detail"]]
    assert ["body", "noise_strength"] in locs and ["body", "image_url"] in locs and ["body", "mask_url"] in locs
    status, body, _ = await call(
        http, "POST", "/run/fal-ai/lora/image-to-image/", json={**BODY, "image_url": "https://x/a.png", "noise_strength": -0.1}
    )
    assert status == 422 and [entry["loc"] for entry in body["detail"]] == [["body", "noise_strength"]]
    status, body, _ = await call(http, "POST", "/fal-ai/lora", json={**BODY, "mask_url": "https://x/m.png"})
    assert status == 422 and [entry["loc"] for entry in body["detail"]] == [["body", "mask_url"]]


async def test_bad_input_is_422_naming_the_fields(http: aiohttp.ClientSession) -> None:
    status, body, headers = await call(
        http, "POST", "/fal-ai/lora", json={**BODY, "loras": [{"path": ""}], "num_images": 3}, headers={"X-Fal-Queue-Priority": "urgent"}
    )
    assert status == 422 and "X-Fal-Request-Id" not in headers
    locs = [entry["loc"] for entry in body["detail"]]
    assert ["body", "loras", 0, "path"] in locs
    status, body, _ = await call(http, "POST", "/fal-ai/lora", json={**BODY, "promt": "typo"})
    assert status == 422
    assert body["detail"] == [{"loc": ["body", "promt"], "msg": "extra fields not permitted", "type": "value_error.extra"}]
    status, body, _ = await call(http, "POST", "/fal-ai/lora", json=BODY, headers={"X-Fal-Queue-Priority": "urgent"})
    assert status == 422 and body["detail"][0]["loc"] == ["header", "x-fal-queue-priority"]
    status, body, _ = await call(http, "POST", "/fal-ai/lora", data=b"{not json", headers={"Content-Type": JSON})
    assert status == 422 and body["detail"][0]["loc"] == ["body"]


async def test_unknown_app_and_request_are_404_json(http: aiohttp.ClientSession) -> None:
    for path in ("/fal-ai/flux/dev", "/workflows/fal-ai/lora", "/nothing"):
        status, body, _ = await call(http, "POST", path, json=BODY)
        assert status == 404 and "fal-ai/lora" in body["detail"]
    status, body, headers = await call(http, "GET", "/fal-ai/lora/requests/no-such-id/status")
    assert status == 404 and headers["X-Fal-Request-Id"] == "no-such-id" and body["error_type"] == "not_found"


async def test_cancel_then_completed_with_error(http: aiohttp.ClientSession, worker: WorkerServer) -> None:
    worker.worker.default = "hold"
    _, body, _ = await call(http, "POST", "/fal-ai/lora", json=BODY)
    request_id = body["request_id"]
    await wait_until(lambda: request_id in worker.worker.holding, "the worker holds the request")
    status, body, _ = await call(http, "GET", f"/fal-ai/lora/requests/{request_id}/status")
    assert (status, body["status"], body["logs"], body["metrics"]) == (202, "IN_PROGRESS", None, {})
    status, body, _ = await call(http, "GET", f"/fal-ai/lora/requests/{request_id}")
    # 400, a status fal's clients do not retry (they retry 408, 409 and 429): the result is not there yet.
    assert (status, body["error_type"]) == (400, "request_in_progress") and body["detail"]
    status, body, headers = await call(http, "PUT", f"/fal-ai/lora/requests/{request_id}/cancel")
    assert (status, body, headers["X-Fal-Request-Id"]) == (202, {"status": "CANCELLATION_REQUESTED"}, request_id)
    final = await completed(http, f"/fal-ai/lora/requests/{request_id}/status")
    assert (final["error"], final["error_type"]) == ("Request cancelled", "client_cancelled")
    status, body, _ = await call(http, "GET", f"/fal-ai/lora/requests/{request_id}")
    assert status == 499 and body["error_type"] == "client_cancelled"
    status, body, _ = await call(http, "PUT", f"/fal-ai/lora/requests/{request_id}/cancel/")
    assert (status, body) == (400, {"status": "ALREADY_COMPLETED"})


async def test_failed_request_completes_with_error_and_result_422(http: aiohttp.ClientSession, worker: WorkerServer) -> None:
    worker.worker.default = "bad_adapter"
    _, body, _ = await call(http, "POST", "/fal-ai/lora", json=BODY)
    final = await completed(http, f"/fal-ai/lora/requests/{body['request_id']}/status")
    assert (final["status"], final["error"], final["error_type"]) == ("COMPLETED", "not a LoRA", "bad_request")
    status, result, headers = await call(http, "GET", f"/fal-ai/lora/requests/{body['request_id']}")
    assert status == 422 and result["detail"][0]["msg"] == "not a LoRA"
    assert headers["X-Fal-Request-Id"] == body["request_id"]


async def test_sse_stream_sends_new_logs_once_and_ends_with_completed(
    http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch, worker: WorkerServer
) -> None:
    _, body, _ = await call(http, "POST", "/fal-ai/lora", json=BODY)
    path = f"/fal-ai/lora/requests/{body['request_id']}/status/stream"
    events = await read_sse(http, path, {"logs": "1"})
    statuses = [json.loads(data) for kind, data in events if kind == "data"]
    assert statuses[-1]["status"] == "COMPLETED" and all(s["status"] != "COMPLETED" for s in statuses[:-1])
    messages = [entry["message"] for s in statuses for entry in s["logs"] or []]
    assert messages == ["working", "done"]
    # While nothing changes, comment pings keep proxies from closing the stream.
    monkeypatch.setattr(fal_http, "PING_SECONDS", 0.05)
    worker.worker.default = "hold"
    _, held, _ = await call(http, "POST", "/fal-ai/lora", json=BODY)
    async with http.get(f"/fal-ai/lora/requests/{held['request_id']}/status/stream") as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        pings = 0
        async for line in response.content:
            pings += line.startswith(b": ping")
            if pings == 2:
                break
    await call(http, "PUT", f"/fal-ai/lora/requests/{held['request_id']}/cancel")


async def read_sse(http: aiohttp.ClientSession, path: str, params: dict[str, str]) -> list[tuple[str, str]]:
    events: list[tuple[str, str]] = []
    async with http.get(path, params=params, headers={"Accept": "application/json, text/event-stream"}) as response:
        assert response.status == 200 and response.headers["Content-Type"].startswith("text/event-stream")
        async for raw in response.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("data: "):
                events.append(("data", line[6:]))
            elif line.startswith(":"):
                events.append(("comment", line))
    return events


async def test_run_answers_the_output_in_one_call(http: aiohttp.ClientSession, worker: WorkerServer) -> None:
    status, body, headers = await call(http, "POST", "/run/fal-ai/lora/", json=BODY)
    assert status == 200 and body["seed"] == 2**40 and headers["X-Fal-Request-Id"]
    worker.worker.default = "bad_adapter"
    status, body, headers = await call(http, "POST", "/run/fal-ai/lora", json=BODY)
    assert status == 422 and headers["X-Fal-Request-Id"]


async def test_proxy_mode_routes_by_target_url(http: aiohttp.ClientSession) -> None:
    proxy = "/api/fal/proxy"
    target = {"x-fal-target-url": "https://queue.fal.run/fal-ai/lora?fal_webhook=https%3A%2F%2Fexample.invalid%2Fhook"}
    status, body, _ = await call(http, "POST", proxy, json=BODY, headers=target)
    assert status == 200
    request_id = body["request_id"]
    status_target = f"https://queue.fal.run/fal-ai/lora/requests/{request_id}/status?logs=1"

    async def done() -> bool:
        _, status_body, _ = await call(http, "GET", proxy, headers={"x-fal-target-url": status_target})
        return bool(status_body["status"] == "COMPLETED" and status_body["logs"])

    await wait_until(done, "the request completed, seen through the proxy route")
    result_target = {"x-fal-target-url": f"https://queue.fal.run/fal-ai/lora/requests/{request_id}"}
    status, body, headers = await call(http, "GET", proxy, headers=result_target)
    assert status == 200 and body["seed"] == 2**40 and headers["X-Fal-Request-Id"] == request_id
    status, body, _ = await call(http, "POST", proxy, json=BODY, headers={"x-fal-target-url": "https://fal.run/fal-ai/lora"})
    assert status == 200 and body["seed"] == 2**40
    status, body, _ = await call(http, "POST", proxy, json=BODY, headers={"x-fal-target-url": "https://evil.example/x"})
    assert status == 400


async def test_cors_preflight_and_exposed_headers(tmp_path: Path, worker: WorkerServer) -> None:
    origin = "https://app.example"
    settings = on_worker(tmp_path, worker.port, cors_allowed_origins=f"{origin}, http://localhost:3000")
    async with gateway_for(settings) as allowing:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{allowing.settings.http_port}") as http:
            async with http.options(
                "/api/fal/proxy",
                headers={
                    "Origin": origin,
                    "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": "authorization, content-type, x-fal-target-url, x-custom",
                },
            ) as response:
                assert response.status == 204
                assert response.headers["Access-Control-Allow-Origin"] == origin
                allowed = response.headers["Access-Control-Allow-Headers"]
                assert "x-fal-target-url" in allowed and "x-custom" in allowed and "authorization" in allowed
            async with http.post("/fal-ai/lora", json=BODY, headers={"Origin": origin}) as response:
                assert response.status == 200
                exposed = response.headers["Access-Control-Expose-Headers"]
                assert response.headers["Access-Control-Allow-Origin"] == origin
                assert {"x-fal-request-id", "x-fal-error-type", "x-fal-request-timeout-type"} <= {
                    h.strip() for h in exposed.split(",")
                }


async def test_forwarded_headers_only_from_trusted_proxies(
    http: aiohttp.ClientSession, gateway: Gateway, tmp_path: Path, worker: WorkerServer
) -> None:
    forwarded = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "lora.example.com"}
    _, body, _ = await call(http, "POST", "/fal-ai/lora", json=BODY, headers=forwarded)
    assert body["status_url"].startswith("https://lora.example.com/fal-ai/lora/requests/")
    _, body, _ = await call(http, "POST", "/fal-ai/lora", json=BODY, headers={"Forwarded": 'proto=https;host="gw.example:8443"'})
    assert body["response_url"].startswith("https://gw.example:8443/fal-ai/lora/requests/")
    # The local store's file URLs in a result follow too (no public_url set).
    port = gateway.settings.http_port
    worker.worker.image_url = f"http://127.0.0.1:{port}/files/outputs/r/a.png?expires=1&signature=x"
    _, body, _ = await call(http, "POST", "/fal-ai/lora", json=BODY)
    await completed(http, f"/fal-ai/lora/requests/{body['request_id']}/status")
    _, result, _ = await call(http, "GET", f"/fal-ai/lora/requests/{body['request_id']}", headers=forwarded)
    assert result["images"][0]["url"].startswith("https://lora.example.com/files/outputs/r/a.png?expires=")
    _, result, _ = await call(http, "GET", f"/fal-ai/lora/requests/{body['request_id']}")
    assert result["images"][0]["url"].startswith(f"http://127.0.0.1:{port}/files/outputs/r/a.png?expires=")
    async with gateway_for(on_worker(tmp_path, worker.port, trusted_proxies="10.0.0.0/8")) as untrusting:
        port = untrusting.settings.http_port
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as other:
            _, body, _ = await call(other, "POST", "/fal-ai/lora", json=BODY, headers=forwarded)
        assert body["status_url"].startswith(f"http://127.0.0.1:{port}/fal-ai/lora/requests/")


async def test_keys_and_tenants(tmp_path: Path, worker: WorkerServer) -> None:
    async with gateway_for(on_worker(tmp_path, worker.port, grpc_host="0.0.0.0")) as guarded:
        keys = {}
        for tenant in ("team-a", "team-b"):
            key, secret = new_key(tenant)
            await guarded.store.add_key(key)
            keys[tenant] = {"Authorization": f"Key {key.id}:{secret}"}
        async with aiohttp.ClientSession(f"http://127.0.0.1:{guarded.settings.http_port}") as session:
            status, body, _ = await call(session, "POST", "/fal-ai/lora", json=BODY)
            assert status == 401 and body["detail"]
            status, body, _ = await call(session, "POST", "/fal-ai/lora", json=BODY, headers={"Authorization": "Key x:y"})
            assert status == 401
            status, body, _ = await call(session, "POST", "/fal-ai/lora", json=BODY, headers=keys["team-a"])
            assert status == 200
            path = f"/fal-ai/lora/requests/{body['request_id']}"
            assert (await call(session, "GET", f"{path}/status", headers=keys["team-a"]))[0] in (200, 202)
            for who in ({}, keys["team-b"]):
                status, _, _ = await call(session, "GET", f"{path}/status", headers=who)
                assert status == (404 if who else 401)
            status, _, _ = await call(session, "PUT", f"{path}/cancel", headers=keys["team-b"])
            assert status == 404


async def test_start_timeout_is_504_user_and_over_quota_is_429(tmp_path: Path) -> None:
    # No worker listens: requests wait in the queue.
    async with gateway_for(on_worker(tmp_path, free_port(), tenant_submits_per_second=0.01)) as stalled:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{stalled.settings.http_port}") as session:
            status, body, _ = await call(session, "POST", "/fal-ai/lora", json=BODY, headers={"X-Fal-Request-Timeout": "1.5"})
            assert status == 200
            request_id = body["request_id"]
            status, body, headers = await call(session, "POST", "/fal-ai/lora", json=BODY)
            assert status == 429 and int(headers["Retry-After"]) >= 1
            final = await completed(session, f"/fal-ai/lora/requests/{request_id}/status")
            assert final["error_type"] == "request_timeout"
            status, body, headers = await call(session, "GET", f"/fal-ai/lora/requests/{request_id}")
            assert status == 504 and headers["X-Fal-Request-Timeout-Type"] == "user"
            assert headers["X-Fal-Request-Id"] == request_id
            status, body, _ = await call(session, "POST", "/fal-ai/lora", json=BODY, headers={"X-Fal-Request-Timeout": "soon"})
            assert status == 422 and body["detail"][0]["loc"] == ["header", "x-fal-request-timeout"]


async def test_tls_on_the_http_port(tmp_path: Path, worker: WorkerServer) -> None:
    cert, key = self_signed_cert("localhost", tmp_path / "tls", ip="127.0.0.1")
    async with gateway_for(on_worker(tmp_path, worker.port, tls_cert_file=str(cert), tls_key_file=str(key))) as secure:
        context = ssl.create_default_context(cafile=str(cert))
        port = secure.settings.http_port
        async with aiohttp.ClientSession(f"https://127.0.0.1:{port}", connector=aiohttp.TCPConnector(ssl=context)) as session:
            status, body, _ = await call(session, "POST", "/fal-ai/lora", json=BODY)
            assert status == 200 and body["status_url"].startswith(f"https://127.0.0.1:{port}/")
            await completed(session, f"/fal-ai/lora/requests/{body['request_id']}/status")
