"""unet_name, variant, kohya LoRAs and embeddings through the real service (gateway → Ray Serve worker)."""

from __future__ import annotations

import base64
import shutil
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from loraserve.client import AsyncClient, LoraServeError
from core.config import Settings
from serving.tiny import TinyModel, make_tiny_embedding, make_tiny_lora, make_tiny_unet, make_tiny_variant
from tests.integration.test_generation_api import COMPLETED, generate_pixels, request

pytestmark = pytest.mark.integration

# The same LoRA in two formats: float rounding only.
MAX_PIXEL_DIFFERENCE = 2


async def failure(target: str, body: dict[str, Any]) -> tuple[str, str]:
    """(error type, message) of a request that was accepted and then failed in the worker."""
    async with AsyncClient(target) as client:
        request_id = await client.submit(body)
        async for status in client.stream_status(request_id):
            final = status
    assert final.state == COMPLETED and final.HasField("error"), final
    return final.error.type, final.error.message


async def test_unet_name_swaps_the_unet(
    target: str, stack_settings: Settings, tiny_sd15: TinyModel, tmp_path: Path
) -> None:
    other = make_tiny_unet(tmp_path / "other-unet", "sd15", seed=9)
    plain = await generate_pixels(target, stack_settings, request(tiny_sd15))
    swapped = await generate_pixels(target, stack_settings, request(tiny_sd15, unet_name=str(other)))
    assert not np.array_equal(swapped, plain)
    kind, message = await failure(
        target, request(tiny_sd15, unet_name=str(make_tiny_unet(tmp_path / "sdxl-unet", "sdxl")))
    )
    assert kind == "MODEL_LOAD_FAILED" and "does not fit" in message and "sdxl-unet" in message
    assert np.array_equal(await generate_pixels(target, stack_settings, request(tiny_sd15)), plain)


async def test_variant_picks_the_variant_files(
    target: str, stack_settings: Settings, tiny_sd15: TinyModel, tmp_path: Path
) -> None:
    folder = tmp_path / "with-fp16"
    shutil.copytree(tiny_sd15.pipeline_dir, folder)
    make_tiny_variant(folder, "fp16", seed=4)
    body = request(tiny_sd15, model_name=str(folder))
    plain = await generate_pixels(target, stack_settings, body)
    fp16 = await generate_pixels(target, stack_settings, {**body, "variant": "fp16"})
    assert not np.array_equal(fp16, plain)
    kind, message = await failure(target, {**body, "variant": "bf16"})
    assert kind == "MODEL_LOAD_FAILED" and "no 'bf16' variant" in message


async def test_kohya_lora_through_the_service(
    target: str, stack_settings: Settings, tiny_sdxl: TinyModel, tmp_path: Path
) -> None:
    kohya = make_tiny_lora(tmp_path / "kohya.safetensors", "sdxl", lora_format="kohya", alpha=8, seed=21)
    peft = make_tiny_lora(tmp_path / "peft.safetensors", "sdxl", alpha=8, seed=21)
    sd15_kohya = make_tiny_lora(tmp_path / "sd15-kohya.safetensors", "sd15", lora_format="kohya", seed=21)
    plain = await generate_pixels(target, stack_settings, request(tiny_sdxl))
    with_kohya = await generate_pixels(target, stack_settings, request(tiny_sdxl, loras=[{"path": str(kohya)}]))
    with_peft = await generate_pixels(target, stack_settings, request(tiny_sdxl, loras=[{"path": str(peft)}]))
    assert np.abs(with_kohya - plain).mean() > 1.0
    assert np.abs(with_kohya - with_peft).max() <= MAX_PIXEL_DIFFERENCE
    kind, message = await failure(target, request(tiny_sdxl, loras=[{"path": str(sd15_kohya)}]))
    assert kind == "ADAPTER_LOAD_FAILED" and "sd15-kohya.safetensors" in message
    assert np.array_equal(await generate_pixels(target, stack_settings, request(tiny_sdxl)), plain)


async def test_embedding_through_the_service(
    target: str, stack_settings: Settings, tiny_sdxl: TinyModel, tmp_path: Path
) -> None:
    """The embedding arrives as a data URI, so it goes through the worker's weights cache."""
    path = make_tiny_embedding(tmp_path, "sdxl", num_vectors=2, seed=8)
    data_uri = "data:application/octet-stream;base64," + base64.b64encode(path.read_bytes()).decode()
    prompt = "a photo of <s0> <s1> house"
    plain_before = await generate_pixels(target, stack_settings, request(tiny_sdxl))
    without = await generate_pixels(target, stack_settings, request(tiny_sdxl, prompt=prompt))
    default_tokens = await generate_pixels(
        target, stack_settings, request(tiny_sdxl, prompt=prompt, embeddings=[{"path": data_uri}])
    )
    assert np.abs(default_tokens - without).mean() > 1.0
    one_token = await generate_pixels(
        target,
        stack_settings,
        request(
            tiny_sdxl, prompt="a photo of <my-style> house", embeddings=[{"path": str(path), "tokens": ["<my-style>"]}]
        ),
    )
    assert np.array_equal(one_token, default_tokens)
    wrong_size = make_tiny_embedding(tmp_path, "sdxl", size=16)
    kind, message = await failure(target, request(tiny_sdxl, prompt=prompt, embeddings=[{"path": str(wrong_size)}]))
    assert kind == "ADAPTER_LOAD_FAILED" and "size 16" in message
    assert np.array_equal(await generate_pixels(target, stack_settings, request(tiny_sdxl)), plain_before)


async def test_bad_adapter_options_are_invalid_arguments(target: str, tiny_sdxl: TinyModel) -> None:
    body = request(
        tiny_sdxl,
        variant="../fp16",
        embeddings=[{"path": "a.safetensors"}, {"path": "", "tokens": ["<s1>", "my token"]}],
    )
    async with AsyncClient(target) as client:
        with pytest.raises(LoraServeError) as info:
            await client.submit(body)
    error = info.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert set(error.field_violations) == {"input.variant", "input.embeddings[1].path", "input.embeddings[1].tokens"}
