"""sync_mode through the running service: outputs inline as data URIs, the same pixels as stored ones,
and nothing written to the object store."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import safetensors.torch
from PIL import Image

from core.config import Settings
from loraserve.client import AsyncClient, LoraServeError
from loraserve.inputs import to_input
from loraserve.request.validation import validate_input
from loraserve.v1 import types_pb2
from serving.tiny import TinyModel
from tests.conftest import read_image_bytes
from tests.integration.test_generation_api import request

pytestmark = pytest.mark.integration


def files_of(files_dir: Path, request_id: str) -> list[Path]:
    return [path for path in files_dir.rglob("*") if request_id in str(path.relative_to(files_dir))]


def decoded_data_uri(url: str, content_type: str) -> bytes:
    prefix = f"data:{content_type};base64,"
    assert url.startswith(prefix), url[:60]
    return base64.b64decode(url[len(prefix) :], validate=True)


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)), dtype=np.int16)


async def test_sync_mode_returns_the_stored_pixels_inline_and_writes_nothing(
    target: str, tiny_sd15: TinyModel, stack_settings: Settings, files_dir: Path
) -> None:
    async with AsyncClient(target) as client:
        stored = await client.subscribe(request(tiny_sd15, num_images=2))
        inline = await client.subscribe(request(tiny_sd15, num_images=2, sync_mode=True, debug_latents=True))
        # Read again later: the stored result is returned as it was, not re-signed.
        again = await client.result(inline.request_id)

    assert files_of(files_dir, stored.request_id), "the stored result's files should be in the store"
    assert files_of(files_dir, inline.request_id) == []
    assert again.data == inline.data
    assert len(inline.data.images) == 2
    for stored_image, image in zip(stored.data.images, inline.data.images, strict=True):
        assert image.content_type == "image/png" and image.file_name.endswith(".png")
        data = decoded_data_uri(image.url, "image/png")
        assert data == image.file_data and image.file_size == len(data)
        assert (image.width, image.height) == (64, 64)
        assert np.array_equal(pixels(data), pixels(read_image_bytes(stack_settings, stored_image.url)))
    latents = inline.data.debug_latents
    assert latents.file_data == decoded_data_uri(latents.url, "application/octet-stream")
    assert safetensors.torch.load(latents.file_data)["latents"].shape == (2, 4, 32, 32)


async def test_sync_mode_jpeg(target: str, tiny_sdxl: TinyModel, files_dir: Path) -> None:
    async with AsyncClient(target) as client:
        result = await client.subscribe(request(tiny_sdxl, sync_mode=True, image_format="jpeg"))
    image = result.data.images[0]
    assert Image.open(io.BytesIO(decoded_data_uri(image.url, "image/jpeg"))).format == "JPEG"
    assert files_of(files_dir, result.request_id) == []


async def test_sync_mode_over_the_cap_or_with_every_steps_latents_is_refused(
    target: str, tiny_sd15: TinyModel, stack_settings: Settings
) -> None:
    side = 1024
    assert 8 * side * side > stack_settings.max_sync_mode_pixels
    async with AsyncClient(target) as client:
        with pytest.raises(LoraServeError) as too_large:
            await client.submit(
                request(tiny_sd15, sync_mode=True, num_images=8, image_size={"width": side, "height": side})
            )
        with pytest.raises(LoraServeError) as per_pass:
            await client.submit(request(tiny_sd15, sync_mode=True, debug_per_pass_latents=True))
    # The same sizes without sync_mode are fine.
    validate_input(
        to_input(request(tiny_sd15, num_images=8, image_size={"width": side, "height": side})), stack_settings.request_limits
    )
    assert "max_sync_mode_pixels" in too_large.value.field_violations["input.sync_mode"]
    assert "input.debug_per_pass_latents" in per_pass.value.field_violations


async def test_image_to_image_over_the_cap_fails_before_generating(target: str, tiny_sd15: TinyModel) -> None:
    """Its output size comes from the start image: the worker refuses it once the image is read."""
    start = io.BytesIO()
    Image.new("RGB", (1024, 1024), (200, 40, 40)).save(start, format="PNG")
    inp = types_pb2.GenerateInput(
        model_name=str(tiny_sd15.pipeline_dir),
        prompt="a red square",
        endpoint=types_pb2.ENDPOINT_IMAGE_TO_IMAGE,
        image_url="data:image/png;base64," + base64.b64encode(start.getvalue()).decode(),
        num_images=3,
        num_inference_steps=2,
        seed=5,
        sync_mode=True,
    )
    async with AsyncClient(target) as client:
        request_id = await client.submit(inp)
        statuses = [status async for status in client.stream_status(request_id, logs=True)]
    final = statuses[-1]
    assert final.error.type == "INVALID_INPUT"
    assert "input.sync_mode" in final.error.message and "max_sync_mode_pixels" in final.error.message
    logs = [entry.message for status in statuses for entry in status.logs]
    assert not any(message.startswith("generating") for message in logs), logs


async def test_sync_mode_over_fal_http(
    target: str, tiny_sd15: TinyModel, stack_settings: Settings, files_dir: Path
) -> None:
    """fal's JSON: `url` a data URI, `file_data` the same bytes in base64, from the synchronous /run/ route."""
    body = request(tiny_sd15, sync_mode=True)
    async with aiohttp.ClientSession() as http:
        async with http.post(f"http://127.0.0.1:{stack_settings.http_port}/run/fal-ai/lora", json=body) as response:
            assert response.status == 200, await response.text()
            request_id = response.headers["X-Fal-Request-Id"]
            output = await response.json()
    [image] = output["images"]
    data = decoded_data_uri(image["url"], "image/png")
    assert base64.b64decode(image["file_data"]) == data and image["file_size"] == len(data)
    assert Image.open(io.BytesIO(data)).size == (64, 64)
    assert files_of(files_dir, request_id) == []
