"""Live previews through the running service: a stream that asks gets JPEGs of the forming image, the
last of them like the final image; a stream that does not ask gets none."""

from __future__ import annotations

import asyncio
import io
from typing import Any

import numpy as np
import pytest
from PIL import Image

from loraserve.client import AsyncClient
from core.config import Settings
from loraserve.v1 import generation_pb2 as gen
from serving.tiny import TinyModel
from tests.conftest import read_image_bytes

pytestmark = pytest.mark.integration


def request(model: TinyModel, seed: int) -> dict[str, Any]:
    return {
        "model_name": str(model.pipeline_dir),
        "prompt": "a photo of a red house",
        "image_size": {"width": 64, "height": 64},
        "num_inference_steps": 8,
        "seed": seed,
    }


async def collect(client: AsyncClient, request_id: str, *, previews: bool) -> list[gen.RequestStatus]:
    return [status async for status in client.stream_status(request_id, previews=previews)]


def downscaled(data: bytes, size: tuple[int, int]) -> np.ndarray:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    return np.asarray(image.resize(size, Image.Resampling.BILINEAR), dtype=np.float64).ravel()


async def test_previews_only_where_asked_and_the_last_resembles_the_image(
    target: str, tiny_sdxl: TinyModel, stack_settings: Settings
) -> None:
    async with AsyncClient(target) as client:
        request_id = await client.submit(request(tiny_sdxl, seed=11))
        with_previews, without = await asyncio.gather(
            collect(client, request_id, previews=True), collect(client, request_id, previews=False)
        )
        result = await client.result(request_id)
        other = await client.subscribe(request(tiny_sdxl, seed=12))

    assert with_previews[-1].state == gen.REQUEST_STATE_COMPLETED
    assert without[-1].state == gen.REQUEST_STATE_COMPLETED
    assert not any(status.progress.preview_jpeg for status in without)
    previews = [status.progress for status in with_previews if status.progress.preview_jpeg]
    assert previews, "a stream that asked for previews got none"
    # Each preview is sent once, and the last one is of the final step's latents.
    assert len({p.preview_jpeg for p in previews}) == len(previews)
    last = previews[-1]
    assert (last.step, last.total) == (8, 8)
    preview = Image.open(io.BytesIO(last.preview_jpeg))
    assert preview.format == "JPEG"
    # The tiny VAE halves each side: the preview has the latents' 32x32.
    assert preview.size == (32, 32)

    final = downscaled(read_image_bytes(stack_settings, result.data.images[0].url), preview.size)
    other_seed = downscaled(read_image_bytes(stack_settings, other.data.images[0].url), preview.size)
    seen = downscaled(last.preview_jpeg, preview.size)
    like_final = float(np.corrcoef(seen, final)[0, 1])
    like_other = float(np.corrcoef(seen, other_seed)[0, 1])
    assert like_final > like_other + 0.2, (like_final, like_other)


async def test_subscribe_with_previews(target: str, tiny_sd15: TinyModel) -> None:
    seen: list[gen.RequestStatus] = []
    async with AsyncClient(target) as client:
        result = await client.subscribe(request(tiny_sd15, seed=3), on_queue_update=seen.append, previews=True)
        plain: list[gen.RequestStatus] = []
        await client.subscribe(request(tiny_sd15, seed=4), on_queue_update=plain.append)
    assert len(result.data.images) == 1
    assert any(status.progress.preview_jpeg for status in seen)
    assert plain and not any(status.progress.preview_jpeg for status in plain)
