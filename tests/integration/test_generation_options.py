"""fal generation options through the real service: each reaches the worker and has its effect."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load

from loraserve.client import AsyncClient
from core.config import Settings
from serving.tiny import TinyModel
from tests.conftest import read_image_bytes
from tests.integration.test_generation_api import generate_pixels, pixels, request

pytestmark = pytest.mark.integration


async def test_every_option_on_then_plain_gives_the_plain_bytes(
    target: str, stack_settings: Settings, tiny_sdxl: TinyModel
) -> None:
    plain_before = await generate_pixels(target, stack_settings, request(tiny_sdxl))
    everything = request(
        tiny_sdxl,
        prompt="a (photo:1.4) of a red++ house",
        prompt_weighting=True,
        scheduler="Euler A",
        clip_skip=1,
        num_images=2,
        image_format="jpeg",
        loras=[{"path": str(tiny_sdxl.lora_paths[0]), "scale": 0.7}],
        enable_safety_checker=True,
        debug_latents=True,
        debug_per_pass_latents=True,
        image_size={"width": 96, "height": 64},
        tile_width=128,
        tile_height=128,
        tile_stride_width=64,
        tile_stride_height=64,
    )
    async with AsyncClient(target) as client:
        result = await client.subscribe(everything)
    out = result.data
    assert list(out.has_nsfw_concepts) == [True, True]
    for image in out.images:
        assert (image.width, image.height, image.content_type) == (96, 64, "image/jpeg")
        assert pixels(stack_settings, image.url).max() <= 1, "a flagged image was not replaced by a black one"
    final = load(read_image_bytes(stack_settings, out.debug_latents.url))["latents"]
    per_pass = load(read_image_bytes(stack_settings, out.debug_per_pass_latents.url))["latents"]
    # The tiny VAE downsamples by 2 (a real SD VAE by 8).
    assert final.shape == (2, 4, 32, 48) and per_pass.shape == (3, 2, 4, 32, 48)
    assert out.debug_latents.file_name.endswith(".safetensors")
    plain_after = await generate_pixels(target, stack_settings, request(tiny_sdxl))
    assert np.array_equal(plain_after, plain_before), "an option leaked into the next request"


@pytest.mark.parametrize(
    "option",
    [
        {"scheduler": "Euler"},
        {"scheduler": "DPM++ 2M Karras"},
        {"prompt": "a (photo:1.5) of a red house", "prompt_weighting": True},
        {"clip_skip": 2},
        {"sigmas": {"method": "array", "array": [14.6, 6.0, 1.0, 0.0]}, "scheduler": "Euler"},
    ],
    ids=["euler", "dpm-karras", "weighting", "clip-skip", "sigmas"],
)
async def test_option_changes_the_image(
    target: str, stack_settings: Settings, tiny_sd15: TinyModel, option: dict[str, object]
) -> None:
    """The tiny SD 1.5 model's own scheduler is DDIM; every option here must move pixels."""
    plain = await generate_pixels(target, stack_settings, request(tiny_sd15))
    changed = await generate_pixels(target, stack_settings, request(tiny_sd15, **option))
    assert not np.array_equal(changed, plain)


async def test_png_is_png(target: str, stack_settings: Settings, tiny_sd15: TinyModel) -> None:
    async with AsyncClient(target) as client:
        result = await client.subscribe(request(tiny_sd15, image_format="png"))
    data = read_image_bytes(stack_settings, result.data.images[0].url)
    assert Image.open(io.BytesIO(data)).format == "PNG" and result.data.images[0].file_name.endswith(".png")
