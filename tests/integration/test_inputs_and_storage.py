"""File inputs and object stores through the real service: URLs, data URIs, uploads, S3."""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
from PIL import Image
from ray import serve

from loraserve.client import AsyncClient, LoraServeError
from core.config import Settings
from loraserve.v1 import generation_pb2 as gen
from serving.app import build_app
from serving.tiny import TinyModel, make_tiny_embedding
from storage.object_store import tenant_folder
from tests.conftest import free_port, start_gateway
from tests.integration.test_generation_api import fetch, generate_pixels, request
from tests.integration.test_metrics import samples, scrape
from tests.s3_server import verify_presigned_url
from tests.storage.storage_testkit import FileServer, Route

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def lora_server(tiny_sdxl: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FileServer]:
    server = FileServer()
    body = tiny_sdxl.lora_paths[0].read_bytes()
    server.routes["/style.safetensors"] = Route(body)
    server.routes["/prefetched.safetensors"] = Route(body)
    embedding = make_tiny_embedding(tmp_path_factory.mktemp("embeddings"), "sdxl", seed=11)
    server.routes["/prefetched-embedding.safetensors"] = Route(embedding.read_bytes())
    server.routes["/not-a-checkpoint.safetensors"] = Route(body, chunked=True)
    server.routes["/to-private.safetensors"] = Route(status=302, headers={"Location": "http://10.0.0.1/x.safetensors"})
    server.routes["/to-metadata.safetensors"] = Route(
        status=302, headers={"Location": "http://169.254.169.254/latest/meta-data"}
    )
    server.start()
    yield server
    server.stop()


async def test_lora_by_url_data_uri_and_upload_match_the_path(
    target: str, stack_settings: Settings, tiny_sdxl: TinyModel, lora_server: FileServer
) -> None:
    lora_path = tiny_sdxl.lora_paths[0]
    by_path = await generate_pixels(target, stack_settings, request(tiny_sdxl, loras=[{"path": str(lora_path)}]))
    url = lora_server.url("/style.safetensors")
    by_url = await generate_pixels(target, stack_settings, request(tiny_sdxl, loras=[{"path": url}]))
    by_url_again = await generate_pixels(target, stack_settings, request(tiny_sdxl, loras=[{"path": url}]))
    data_uri = "data:application/octet-stream;base64," + base64.b64encode(lora_path.read_bytes()).decode()
    by_data = await generate_pixels(target, stack_settings, request(tiny_sdxl, loras=[{"path": data_uri}]))
    async with AsyncClient(target) as client:
        uploaded = await client.upload(lora_path, file_name="style.safetensors")
    by_upload = await generate_pixels(target, stack_settings, request(tiny_sdxl, loras=[{"path": uploaded.url}]))
    # A pathlib.Path in a dict input is uploaded by the client and sent as its URL.
    by_auto_upload = await generate_pixels(target, stack_settings, request(tiny_sdxl, loras=[{"path": lora_path}]))
    plain = await generate_pixels(target, stack_settings, request(tiny_sdxl))
    assert np.abs(by_path - plain).mean() > 1.0
    for other in (by_url, by_url_again, by_data, by_upload, by_auto_upload):
        assert np.array_equal(other, by_path)
    assert lora_server.hits["/style.safetensors"] == 1, "the weights cache downloaded the same URL twice"


async def host_tier(settings: Settings) -> tuple[float, float]:
    """The replica's host-RAM tier (parsed LoRAs and embeddings): (misses, hits) so far."""
    worker = samples(await scrape(f"http://127.0.0.1:{settings.worker_metrics_port}/metrics"))
    misses, hits = (worker.get((f"loraserve_cache_{name}_total", (("tier", "host"),)), 0.0) for name in ("misses", "hits"))
    return misses, hits


async def test_adapters_of_a_waiting_request_are_prefetched(
    target: str, stack_settings: Settings, tiny_sdxl: TinyModel, lora_server: FileServer
) -> None:
    url = lora_server.url("/prefetched.safetensors")
    embedding_url = lora_server.url("/prefetched-embedding.safetensors")
    misses_before, hits_before = await host_tier(stack_settings)
    async with AsyncClient(target) as client:
        busy = await client.submit(request(tiny_sdxl, num_inference_steps=150, image_size={"width": 128, "height": 128}))
        # One waits with a LoRA, one with only an embedding: each kind is prefetched on its own.
        with_lora = await client.submit(request(tiny_sdxl, loras=[{"path": url}]))
        with_embedding = await client.submit(
            request(
                tiny_sdxl,
                prompt="a photo of <s0> <s1> house",
                embeddings=[{"path": embedding_url, "tokens": ["<s0>", "<s1>"]}],
            )
        )
        for waiting in (with_lora, with_embedding):
            async for status in client.stream_status(waiting, logs=True):
                prefetched = [entry.message for entry in status.logs if entry.message.startswith("prefetched ")]
                if prefetched:
                    break
            # Downloaded and parsed into the replica's host RAM while still waiting behind the busy one.
            assert prefetched == ["prefetched 1 adapter(s) while waiting"]
            assert status.state == gen.REQUEST_STATE_IN_QUEUE
        assert lora_server.hits["/prefetched.safetensors"] == 1
        assert lora_server.hits["/prefetched-embedding.safetensors"] == 1
        misses_waiting, hits_waiting = await host_tier(stack_settings)
        assert (misses_waiting - misses_before) + (hits_waiting - hits_before) == 2
        await client.cancel(busy)
        finals = []
        for waiting in (with_lora, with_embedding):
            async for status in client.stream_status(waiting):
                final = status
            finals.append(final)
    assert all(f.state == gen.REQUEST_STATE_COMPLETED and not f.HasField("error") for f in finals), finals
    assert lora_server.hits["/prefetched.safetensors"] == 1, "the request downloaded its LoRA again"
    assert lora_server.hits["/prefetched-embedding.safetensors"] == 1, "the request downloaded its embedding again"
    misses_after, _ = await host_tier(stack_settings)
    assert misses_after == misses_waiting, "the request read an adapter file again instead of the parsed copy"


async def test_model_download_progress_reaches_the_request(
    target: str, tiny_sdxl: TinyModel, lora_server: FileServer
) -> None:
    """A LoRA file posing as a checkpoint: downloaded (with progress lines), then refused clearly."""
    url = lora_server.url("/not-a-checkpoint.safetensors")
    async with AsyncClient(target) as client:
        request_id = await client.submit(request(tiny_sdxl, model_name=url))
        async for status in client.stream_status(request_id, logs=True):
            final = status
        logs = [entry.message for entry in (await client.status(request_id, logs=True)).logs]
    assert final.error.type == "MODEL_LOAD_FAILED" and url in final.error.message
    assert any(line.startswith("downloading not-a-checkpoint.safetensors") for line in logs), logs


@pytest.mark.parametrize("route", ["/to-private.safetensors", "/to-metadata.safetensors"])
async def test_redirect_to_a_private_address_fails_the_request_naming_the_field(
    target: str, tiny_sdxl: TinyModel, lora_server: FileServer, route: str
) -> None:
    async with AsyncClient(target) as client:
        request_id = await client.submit(request(tiny_sdxl, loras=[{"path": lora_server.url(route)}]))
        async for status in client.stream_status(request_id):
            final = status
        with pytest.raises(LoraServeError) as info:
            await client.result(request_id)
    assert final.state == gen.REQUEST_STATE_COMPLETED and final.error.type == "INVALID_INPUT"
    assert "input.loras[0].path" in final.error.message and route in final.error.message
    assert info.value.reason == "INVALID_INPUT"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def s3_gateway(
    stack: object, stack_settings: Settings, s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Settings]:
    """A second Serve app and gateway that keep outputs and uploads in S3 (moto on loopback)."""
    settings = stack_settings.replace(
        data_dir=tmp_path_factory.mktemp("s3-gateway"),
        grpc_port=free_port(),
        http_port=free_port(),
        worker_metrics_port=0,
        serve_app_name="loraserve-s3",
        object_store="s3",
        s3_endpoint=s3_endpoint,
        s3_access_key="testing",
        s3_secret_key="testing",
        s3_bucket="loraserve-outputs",
        s3_secure=False,
        s3_presign_expiry_seconds=600,
    )
    await asyncio.to_thread(
        serve.run, build_app(settings), name=settings.serve_app_name, route_prefix=f"/{settings.serve_app_name}"
    )
    gateway = await start_gateway(settings)
    yield settings
    await gateway.stop()
    await asyncio.to_thread(serve.delete, settings.serve_app_name)


async def test_outputs_and_uploads_live_in_s3(s3_gateway: Settings, tiny_sdxl: TinyModel, s3_endpoint: str) -> None:
    async with AsyncClient(f"127.0.0.1:{s3_gateway.grpc_port}") as client:
        result = await client.subscribe(request(tiny_sdxl, loras=[{"path": str(tiny_sdxl.lora_paths[1])}]))
        png = io.BytesIO()
        Image.new("RGB", (32, 16), (10, 200, 30)).save(png, format="PNG")
        uploaded = await client.upload(png.getvalue(), file_name="control.png")
    image = result.data.images[0]
    assert image.url.startswith(f"http://{s3_endpoint}/loraserve-outputs/{tenant_folder('')}/outputs/")
    # Signed with the gateway's key for the S3 host (the server refuses a URL that fails this, too).
    for url in (image.url, uploaded.url):
        signed = verify_presigned_url(url, {"testing": "testing"}, host=s3_endpoint)
        assert signed.access_key == "testing" and signed.expires_seconds == 600
    served = await fetch(image.url)
    assert len(served) == image.file_size and Image.open(io.BytesIO(served)).size == (64, 64)
    assert not any(Path(s3_gateway.files_dir).rglob("*.png")), "an output was written to the local folder"
    assert await fetch(uploaded.url) == png.getvalue()
