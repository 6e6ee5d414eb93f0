"""fal's own clients, unchanged, against the service: Python `fal-client` and JS `@fal-ai/client`.

Each client runs in its own process exactly as a user runs it, configured only through
what the docs' fal page ("fal's clients", docs/fal.md) says: Python through FAL_KEY, FAL_QUEUE_RUN_HOST,
FAL_RUN_HOST and SSL_CERT_FILE (fal-client hard-codes https, so the service serves TLS
with a certificate made here), JS through `createFalClient({credentials, proxyUrl})` with
NODE_EXTRA_CA_CERTS. The scenario scripts live in fal_py/ and fal_js/ and print one JSON
line that the tests below check. One gateway with its own Serve app (its own data dir, so
the files it hands out are the ones its workers wrote) serves every test of the module.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import importlib.util
import json
import os
import ssl
import sys
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import pytest_asyncio
from ray import serve

from gateway.auth import new_key
from core.config import Settings
from serving.app import build_app
from serving.tiny import TinyModel
from tests.conftest import free_port, gateway_for, require_tool, self_signed_cert
from tests.integration.test_conditioning import data_uri, picture
from tests.integration.test_generation_api import request

pytestmark = pytest.mark.integration

HERE = Path(__file__).parent
TOOLS_DIR = HERE.parents[1] / ".tools"
APP = "fal-ai/lora"
TENANT = "fal-clients"
# A run of one scenario script: several tiny generations and the client's own polling.
SCRIPT_TIMEOUT_SECONDS = 240.0
# fal's documented verification refuses a delivery whose timestamp is further off than this.
WEBHOOK_TOLERANCE_SECONDS = 300


@dataclass(frozen=True)
class FalService:
    """The gateway as fal's clients see it: one TLS port, a key and the certificate to trust."""

    settings: Settings
    cert_file: Path
    fal_key: str

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.settings.http_port}"


@pytest_asyncio.fixture(scope="module")
async def fal_service(
    stack: object, stack_settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[FalService]:
    """A gateway bound off loopback (keys required) serving TLS on its HTTP port, with its own Serve app."""
    directory = tmp_path_factory.mktemp("fal-clients")
    cert_file, key_file = self_signed_cert("localhost", directory / "tls", ip="127.0.0.1")
    http_port = free_port()
    settings = stack_settings.replace(
        data_dir=directory / "data",
        grpc_host="0.0.0.0",
        grpc_port=free_port(),
        http_port=http_port,
        public_url=f"https://127.0.0.1:{http_port}",
        tls_cert_file=str(cert_file),
        tls_key_file=str(key_file),
        worker_metrics_port=0,
        serve_app_name="loraserve-fal",
    )
    await asyncio.to_thread(
        serve.run, build_app(settings), name=settings.serve_app_name, route_prefix=f"/{settings.serve_app_name}"
    )
    async with gateway_for(settings) as gateway:
        key, secret = new_key(TENANT)
        await gateway.store.add_key(key)
        yield FalService(settings=settings, cert_file=cert_file, fal_key=f"{key.id}:{secret}")
    await asyncio.to_thread(serve.delete, settings.serve_app_name)


@dataclass
class Delivery:
    headers: dict[str, str]
    body: bytes
    verified: bool


@dataclass
class WebhookReceiver:
    """A user's webhook endpoint on loopback that checks each delivery the way fal's docs show."""

    jwks_url: str
    cert_file: Path
    url: str = ""
    deliveries: dict[str, list[Delivery]] = field(default_factory=dict)
    arrived: threading.Condition = field(default_factory=threading.Condition)

    def fetch_jwks(self) -> list[dict[str, Any]]:
        context = ssl.create_default_context(cafile=str(self.cert_file))
        with urllib.request.urlopen(self.jwks_url, timeout=10, context=context) as response:
            keys: list[dict[str, Any]] = json.loads(response.read()).get("keys", [])
            return keys

    def verify(self, request_id: str, user_id: str, timestamp: str, signature_hex: str, body: bytes) -> bool:
        """fal's documented Python verification, step by step; only the JWKS URL is the service's."""
        from nacl.exceptions import BadSignatureError
        from nacl.signing import VerifyKey

        try:
            if abs(int(time.time()) - int(timestamp)) > WEBHOOK_TOLERANCE_SECONDS:
                return False
        except ValueError:
            return False
        message = "\n".join([request_id, user_id, timestamp, hashlib.sha256(body).hexdigest()]).encode("utf-8")
        try:
            signature = bytes.fromhex(signature_hex)
        except ValueError:
            return False
        for key_info in self.fetch_jwks():
            x = key_info.get("x")
            if not isinstance(x, str):
                continue
            try:
                VerifyKey(base64.urlsafe_b64decode(x)).verify(message, signature)
                return True
            except (BadSignatureError, ValueError):
                continue
        return False

    def verify_delivery(self, delivery: Delivery, body: bytes | None = None) -> bool:
        h = delivery.headers
        return self.verify(
            h.get("x-fal-webhook-request-id", ""),
            h.get("x-fal-webhook-user-id", ""),
            h.get("x-fal-webhook-timestamp", ""),
            h.get("x-fal-webhook-signature", ""),
            delivery.body if body is None else body,
        )

    def receive(self, headers: dict[str, str], body: bytes) -> bool:
        delivery = Delivery(headers=headers, body=body, verified=False)
        delivery.verified = self.verify_delivery(delivery)
        request_id = json.loads(body).get("request_id", "")
        with self.arrived:
            self.deliveries.setdefault(request_id, []).append(delivery)
            self.arrived.notify_all()
        return delivery.verified

    def wait_for(self, request_id: str, timeout: float = 60.0) -> Delivery:
        """Blocks: call it off the event loop (the gateway delivering runs on it)."""
        with self.arrived:
            if not self.arrived.wait_for(lambda: request_id in self.deliveries, timeout=timeout):
                raise AssertionError(f"no webhook for {request_id} within {timeout} s: got {list(self.deliveries)}")
            return self.deliveries[request_id][0]


@pytest.fixture(scope="module")
def webhook_receiver(fal_service: FalService) -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver(jwks_url=f"{fal_service.base_url}/.well-known/jwks.json", cert_file=fal_service.cert_file)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            headers = {name.lower(): value for name, value in self.headers.items()}
            self.send_response(200 if receiver.receive(headers, body) else 401)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/fal?source=loraserve&kind=test"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield receiver
    server.shutdown()
    server.server_close()


def tools_ready() -> None:
    if importlib.util.find_spec("fal_client") is None:
        pytest.fail("fal-client is not installed (pyproject's test extra installs it)")


def fal_js_ready() -> str:
    node = require_tool("node")
    if not (TOOLS_DIR / "node_modules" / "@fal-ai" / "client" / "package.json").exists():
        if os.environ.get("LORASERVE_REQUIRE_TOOLS"):
            pytest.fail("@fal-ai/client is not installed under .tools (scripts/test.sh installs it)")
        pytest.skip("@fal-ai/client not installed; scripts/test.sh installs it")
    return node


async def run_script(command: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Runs a scenario script without blocking the event loop the gateway serves it from."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("FAL_") and "PROXY" not in k.upper()}
    process = await asyncio.create_subprocess_exec(
        *command,
        env={**base, "NO_PROXY": "127.0.0.1,localhost", **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), SCRIPT_TIMEOUT_SECONDS)
    assert process.returncode == 0, f"{command[1:3]} failed:\n{stderr.decode()[-6000:]}"
    output: dict[str, Any] = json.loads(stdout.decode().strip().splitlines()[-1])
    return output


async def python_client(service: FalService, scenario: str, args: dict[str, Any]) -> dict[str, Any]:
    """fal-client configured only by the environment docs/fal.md gives."""
    tools_ready()
    port = service.settings.http_port
    env = {
        "FAL_KEY": service.fal_key,
        "FAL_QUEUE_RUN_HOST": f"127.0.0.1:{port}",
        "FAL_RUN_HOST": f"127.0.0.1:{port}/run",
        "SSL_CERT_FILE": str(service.cert_file),
    }
    return await run_script([sys.executable, str(HERE / "fal_py" / "calls.py"), scenario, json.dumps(args)], env)


async def js_client(service: FalService, script: str, args: dict[str, Any]) -> dict[str, Any]:
    """@fal-ai/client configured with credentials and a proxyUrl to the service, as docs/fal.md gives."""
    node = fal_js_ready()
    env = {
        "FAL_KEY": service.fal_key,
        "FAL_PROXY_URL": f"{service.base_url}/api/fal/proxy",
        "NODE_EXTRA_CA_CERTS": str(service.cert_file),
        "LORASERVE_TOOLS_DIR": str(TOOLS_DIR),
    }
    return await run_script([node, str(HERE / "fal_js" / f"{script}.mjs"), json.dumps(args)], env)


def arguments(model: TinyModel, **overrides: Any) -> dict[str, Any]:
    """The input as a fal caller writes it."""
    return request(model, **overrides)


def blocker_arguments(model: TinyModel) -> dict[str, Any]:
    """A request that keeps the one worker busy while the client polls the next one, seen waiting first."""
    return arguments(model, num_inference_steps=30, seed=3)


def long_arguments(model: TinyModel) -> dict[str, Any]:
    """A request that is still waiting or running when the client cancels it right after submitting."""
    return arguments(model, num_inference_steps=150, image_size={"width": 128, "height": 128})


def invalid_arguments(model: TinyModel) -> dict[str, Any]:
    return arguments(model, image_size={"width": 65, "height": 64})


def check_output(service: FalService, output: dict[str, Any], image: dict[str, Any], seed: int = 7) -> None:
    """fal's output JSON with integers as numbers, and an image URL that opens over the service's TLS."""
    assert type(output["seed"]) is int and output["seed"] == seed
    assert output["has_nsfw_concepts"] == [False]
    (described,) = output["images"]
    assert described["url"].startswith(f"{service.base_url}/")
    assert (described["width"], described["height"], described["content_type"]) == (64, 64, "image/png")
    assert type(described["file_size"]) is int
    assert image["status"] == 200 and image["content_type"] == "image/png"
    assert image["bytes"] == described["file_size"]


def check_same_output(service: FalService, delivered: dict[str, Any], result: dict[str, Any]) -> None:
    """A webhook's payload is the result; its file URLs are signed afresh, so they name the same files."""

    def without_urls(output: dict[str, Any]) -> dict[str, Any]:
        return {**output, "images": [{k: v for k, v in image.items() if k != "url"} for image in output["images"]]}

    assert without_urls(delivered) == without_urls(result)
    delivered_paths = [urlsplit(image["url"]).path for image in delivered["images"]]
    assert delivered_paths == [urlsplit(image["url"]).path for image in result["images"]]
    assert all(image["url"].startswith(f"{service.base_url}/") for image in delivered["images"])


def check_refused_field(detail: Any, field_path: list[Any]) -> None:
    """fal's 422 body: a `detail` list whose entries name the field the way fal does (loc under "body")."""
    assert isinstance(detail, list) and detail, detail
    assert any(entry["loc"] == ["body", *field_path] for entry in detail), detail
    assert all({"loc", "msg", "type"} <= set(entry) for entry in detail), detail


# --- Python fal-client --------------------------------------------------------------------------


async def test_python_subscribe_with_logs_and_queue_updates(fal_service: FalService, tiny_sdxl: TinyModel) -> None:
    out = await python_client(
        fal_service,
        "subscribe",
        {"arguments": arguments(tiny_sdxl, num_inference_steps=4), "blocker_arguments": blocker_arguments(tiny_sdxl)},
    )
    updates = out["updates"]
    kinds = [u["kind"] for u in updates]
    assert kinds == sorted(kinds, key=["Queued", "InProgress", "Completed"].index), kinds
    assert kinds[0] == "Queued" and "InProgress" in kinds and kinds[-1] == "Completed" and kinds.count("Completed") == 1
    positions = [u["position"] for u in updates if u["kind"] == "Queued"]
    assert all(p >= 0 for p in positions) and positions == sorted(positions, reverse=True), positions
    assert out["blocker"]["kind"] == "Completed", "the request that waited finished before the one ahead of it"
    logs = [m for u in updates if u["kind"] == "InProgress" for m in u["logs"]] + updates[-1]["logs"]
    assert any("generating 1 image(s) 64x64" in m for m in logs), logs
    assert updates[-1]["error"] is None
    assert len(out["enqueued"]) == 1
    check_output(fal_service, out["result"], out["image"])
    assert out["image"]["size"] == [64, 64]


async def test_python_submit_with_webhook_then_status_result_cancel(
    fal_service: FalService, webhook_receiver: WebhookReceiver, tiny_sdxl: TinyModel
) -> None:
    out = await python_client(
        fal_service,
        "queue",
        {
            "arguments": arguments(tiny_sdxl, seed=11),
            "long_arguments": long_arguments(tiny_sdxl),
            "webhook_url": webhook_receiver.url,
        },
    )
    assert out["first"]["kind"] in ("Queued", "InProgress", "Completed")
    assert out["result"]["seed"] == 11 and out["again"] == out["result"]
    assert out["final"]["kind"] == "Completed" and out["final"]["error"] is None
    assert any(m.startswith("done:") for m in out["final"]["logs"]), out["final"]
    # Polled with logs off, fal's server answers "logs": null.
    assert out["quiet"] == {**out["final"], "logs": None}
    assert out["late_cancel"]["raised"] and out["late_cancel"]["status_code"] == 400

    # Cancelled before it could finish: still COMPLETED, with the error, and the result refuses.
    events = out["long_events"]
    assert [e["kind"] for e in events][-1] == "Completed"
    assert events[-1]["error"] and events[-1]["error_type"] == "client_cancelled"
    assert out["long_result"]["raised"] and out["long_result"]["status_code"] >= 400

    delivery = await asyncio.to_thread(webhook_receiver.wait_for, out["request_id"])
    body = json.loads(delivery.body)
    assert delivery.verified, delivery.headers
    # The check fetches the JWKS from the gateway: off the event loop it serves from.
    changed = await asyncio.to_thread(webhook_receiver.verify_delivery, delivery, delivery.body + b" ")
    assert not changed, "a changed body still verified"
    assert delivery.headers["x-fal-webhook-user-id"] == TENANT
    assert body["status"] == "OK" and body["request_id"] == out["request_id"]
    check_same_output(fal_service, body["payload"], out["result"])
    cancelled = await asyncio.to_thread(webhook_receiver.wait_for, out["long_request_id"])
    assert cancelled.verified and json.loads(cancelled.body)["status"] == "ERROR"


async def test_python_failing_requests_raise_422_naming_what_failed(
    fal_service: FalService, tiny_sdxl: TinyModel
) -> None:
    missing_model = str(tiny_sdxl.pipeline_dir.parent / "no-such-model")
    out = await python_client(
        fal_service,
        "failing",
        {
            "invalid_arguments": invalid_arguments(tiny_sdxl),
            "failing_arguments": arguments(tiny_sdxl, model_name=missing_model),
        },
    )
    invalid = out["invalid"]
    assert invalid["raised"] and invalid["status_code"] == 422, invalid
    check_refused_field(invalid["message"], ["image_size", "width"])
    # Accepted, then failed on the worker: COMPLETED with the error, and the 422 comes from the result.
    final = out["failing_final"]
    assert final["kind"] == "Completed" and final["error_type"] == "bad_request" and missing_model in final["error"]
    failed = out["failing_result"]
    assert failed["raised"] and failed["status_code"] == 422, failed
    assert failed["request_id"] == out["failing_request_id"]
    assert any(missing_model in entry["msg"] for entry in failed["message"]), failed


async def test_python_sync_run(fal_service: FalService, tiny_sdxl: TinyModel) -> None:
    out = await python_client(fal_service, "run", {"arguments": arguments(tiny_sdxl, seed=21)})
    check_output(fal_service, out["result"], out["image"], seed=21)


async def test_python_upload_file_then_its_url_as_an_input(fal_service: FalService, tiny_sdxl: TinyModel) -> None:
    out = await python_client(
        fal_service,
        "upload",
        {"base_url": fal_service.base_url, "lora_file": str(tiny_sdxl.lora_paths[0]), "arguments": arguments(tiny_sdxl)},
    )
    for url in (out["via_cdn"], out["via_storage"]):
        assert url.startswith(f"{fal_service.base_url}/")
    images = out["images"]
    assert images["via_cdn"]["sha256"] == images["local"]["sha256"]
    assert images["via_storage"]["sha256"] == images["local"]["sha256"]
    assert images["local"]["sha256"] != out["plain"]["sha256"], "the LoRA changed nothing: the check proves nothing"


# --- JS @fal-ai/client --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["polling", "streaming"])
async def test_js_subscribe_with_logs_and_queue_updates(
    fal_service: FalService, tiny_sdxl: TinyModel, mode: str
) -> None:
    out = await js_client(
        fal_service,
        "subscribe",
        {
            "arguments": arguments(tiny_sdxl, num_inference_steps=4),
            "blocker_arguments": blocker_arguments(tiny_sdxl),
            "mode": mode,
        },
    )
    updates = out["updates"]
    statuses = [u["status"] for u in updates]
    assert statuses == sorted(statuses, key=["IN_QUEUE", "IN_PROGRESS", "COMPLETED"].index), statuses
    assert statuses[0] == "IN_QUEUE" and "IN_PROGRESS" in statuses
    positions = [u["position"] for u in updates if u["status"] == "IN_QUEUE"]
    assert all(p >= 0 for p in positions) and positions == sorted(positions, reverse=True), positions
    assert out["blocker"]["status"] == "COMPLETED", "the request that waited finished before the one ahead of it"
    logs = [m for u in updates for m in (u["logs"] or [])]
    assert any("generating 1 image(s) 64x64" in m for m in logs), logs
    if mode == "streaming":
        # The stream carries each log line once; fal's client appends what each event brings.
        assert statuses[-1] == "COMPLETED"
        assert len(updates[-1]["logs"]) == len(set(updates[-1]["logs"])), updates[-1]["logs"]
    assert out["request_id"] == out["enqueued"]
    check_output(fal_service, out["data"], out["image"])


async def test_js_queue_submit_with_webhook_then_status_stream_result_cancel(
    fal_service: FalService, webhook_receiver: WebhookReceiver, tiny_sdxl: TinyModel
) -> None:
    out = await js_client(
        fal_service,
        "queue",
        {
            "arguments": arguments(tiny_sdxl, seed=12),
            "long_arguments": long_arguments(tiny_sdxl),
            "webhook_url": webhook_receiver.url,
        },
    )
    request_id = out["submitted"]["request_id"]
    assert out["submitted"]["status"] == "IN_QUEUE"
    for name in ("status_url", "response_url", "cancel_url"):
        assert out["submitted"][name].startswith(f"{fal_service.base_url}/{APP}/requests/{request_id}")
    assert out["first"]["status"] in ("IN_QUEUE", "IN_PROGRESS", "COMPLETED")
    streamed = [s["status"] for s in out["streamed"]]
    assert streamed and streamed[-1] == "COMPLETED" and "COMPLETED" not in streamed[:-1]
    assert out["last"]["status"] == "COMPLETED"
    assert out["result"]["request_id"] == request_id and out["result"]["data"]["seed"] == 12
    assert out["final"]["status"] == "COMPLETED" and out["final"]["logs"] is None
    assert out["late_cancel"]["raised"] and out["late_cancel"]["status"] == 400

    assert out["long_final"]["status"] == "COMPLETED" and out["long_final"]["error_type"] == "client_cancelled"
    assert out["long_result"]["raised"] and out["long_result"]["is_api_error"]

    delivery = await asyncio.to_thread(webhook_receiver.wait_for, request_id)
    assert delivery.verified
    check_same_output(fal_service, json.loads(delivery.body)["payload"], out["result"]["data"])


async def test_js_failing_requests_are_validation_errors_naming_what_failed(
    fal_service: FalService, tiny_sdxl: TinyModel
) -> None:
    missing_model = str(tiny_sdxl.pipeline_dir.parent / "no-such-model")
    out = await js_client(
        fal_service,
        "failing",
        {
            "invalid_arguments": invalid_arguments(tiny_sdxl),
            "failing_arguments": arguments(tiny_sdxl, model_name=missing_model),
        },
    )
    invalid = out["invalid"]
    assert invalid["raised"] and invalid["is_validation_error"] and invalid["status"] == 422, invalid
    check_refused_field(invalid["field_errors"], ["image_size", "width"])
    failed = out["failing"]
    assert failed["raised"] and failed["is_validation_error"] and failed["status"] == 422, failed
    assert failed["request_id"] == out["failing_enqueued"], "the result's X-Fal-Request-Id is missing or not exposed"
    assert any(missing_model in entry["msg"] for entry in failed["field_errors"]), failed


async def test_js_sync_run(fal_service: FalService, tiny_sdxl: TinyModel) -> None:
    out = await js_client(fal_service, "run", {"arguments": arguments(tiny_sdxl, seed=22)})
    check_output(fal_service, out["data"], out["image"], seed=22)
    assert out["request_id"]


async def test_js_storage_upload_then_its_url_as_an_input(fal_service: FalService, tiny_sdxl: TinyModel) -> None:
    out = await js_client(
        fal_service, "storage", {"lora_file": str(tiny_sdxl.lora_paths[0]), "arguments": arguments(tiny_sdxl)}
    )
    assert out["uploaded"].startswith(f"{fal_service.base_url}/")
    images = out["images"]
    assert images["uploaded"]["sha256"] == images["local"]["sha256"]
    assert images["in_input"]["sha256"] == images["local"]["sha256"]


def flux_arguments(seed: int) -> dict[str, Any]:
    """A fal-ai/flux-lora/image-to-image input as fal's examples write it (the base model is the server's)."""
    # 40x40: the output takes its size floored to a multiple of 16.
    return {"prompt": "a cat", "image_url": data_uri(picture(seed, 40)), "num_inference_steps": 2, "seed": seed, "enable_safety_checker": False}


def check_flux_output(service: FalService, output: dict[str, Any], image: dict[str, Any], seed: int) -> None:
    assert set(output) == {"images", "timings", "seed", "has_nsfw_concepts", "prompt"}, output
    assert output["seed"] == seed and output["prompt"] == "a cat" and output["has_nsfw_concepts"] == [False]
    (described,) = output["images"]
    assert described["url"].startswith(f"{service.base_url}/")
    assert (described["width"], described["height"], described["content_type"]) == (32, 32, "image/jpeg")
    assert image["status"] == 200 and image["content_type"] == "image/jpeg"


async def test_python_flux_lora_image_to_image(fal_service: FalService, tiny_flux: TinyModel) -> None:
    app = "fal-ai/flux-lora/image-to-image"
    out = await python_client(fal_service, "flux", {"app": app, "arguments": flux_arguments(31)})
    check_flux_output(fal_service, out["result"], out["image"], seed=31)


async def test_js_flux_lora_image_to_image(fal_service: FalService, tiny_flux: TinyModel) -> None:
    app = "fal-ai/flux-lora/image-to-image"
    out = await js_client(fal_service, "flux", {"app": app, "arguments": flux_arguments(32)})
    check_flux_output(fal_service, out["data"], out["image"], seed=32)
    assert out["request_id"]
