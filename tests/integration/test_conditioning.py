"""ControlNets, IP-Adapters and IC-Light through the real service (gateway → queue → Ray Serve worker).

Images come from a loopback HTTP server (the stack allows 127.0.0.1) and from data URIs; weights
are the tiny ones from serving/tiny_adapters.py, named by local path as a user would name a
mounted model folder.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image

from loraserve.client import AsyncClient, LoraServeError
from core.config import Settings
from serving.tiny import TinyModel
from serving.tiny_adapters import TinyAdapters, make_tiny_adapters
from tests.integration.test_generation_api import generate_pixels, request
from tests.storage.storage_testkit import FileServer, Route

pytestmark = pytest.mark.integration


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def picture(seed: int, size: int = 64) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(size, size, 3) * 255).astype(np.uint8))


def half_mask(size: int = 64) -> Image.Image:
    mask = np.zeros((size, size, 3), dtype=np.uint8)
    mask[:, : size // 2] = 255
    return Image.fromarray(mask)


def data_uri(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png(image)).decode()


@pytest.fixture(scope="module")
def images() -> Iterator[FileServer]:
    server = FileServer()
    for name, image in {
        "control": picture(1),
        "reference": picture(2),
        "foreground": picture(3),
        "background": picture(4),
        "other-background": picture(5),
        "mask": half_mask(),
        "small-mask": half_mask(32),
    }.items():
        server.routes[f"/{name}.png"] = Route(png(image))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def sdxl_adapters(tiny_sdxl: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> TinyAdapters:
    return make_tiny_adapters(tmp_path_factory.mktemp("sdxl-adapters"), tiny_sdxl.pipeline_dir, "sdxl")


@pytest.fixture(scope="module")
def sd15_adapters(tiny_sd15: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> TinyAdapters:
    return make_tiny_adapters(tmp_path_factory.mktemp("sd15-adapters"), tiny_sd15.pipeline_dir, "sd15")


async def failure(target: str, body: dict[str, Any]) -> LoraServeError:
    async with AsyncClient(target) as client:
        with pytest.raises(LoraServeError) as info:
            await client.subscribe(body)
    return info.value


async def test_controlnets_and_ip_adapter_change_the_image_and_leave_no_trace(
    target: str, stack_settings: Settings, tiny_sdxl: TinyModel, sdxl_adapters: TinyAdapters, images: FileServer
) -> None:
    plain = await generate_pixels(target, stack_settings, request(tiny_sdxl))
    ipa = sdxl_adapters.ip_adapter
    body = request(
        tiny_sdxl,
        controlnets=[
            {
                "path": str(sdxl_adapters.controlnet.folder),
                "control_image_url": images.url("/control.png"),
                "mask_image_url": images.url("/mask.png"),
                "conditioning_scale": 0.8,
                "start_percentage": 0.0,
                "end_percentage": 0.7,
            },
            {
                "path": str(sdxl_adapters.controlnet.single_file),
                "image_url": data_uri(picture(6)),
                "conditioning_scale": 0.5,
            },
        ],
        controlnet_guess_mode=True,
        ip_adapter=[
            {
                "path": str(ipa.repo),
                "model_subfolder": ipa.model_subfolder,
                "weight_name": ipa.weight_name,
                "ip_adapter_image_url": [images.url("/reference.png")],
                "scale": 0.7,
                "unconditional_noising_factor": 0.3,
            }
        ],
        image_encoder_path=str(ipa.repo),
        image_encoder_subfolder=ipa.image_encoder_subfolder,
        image_encoder_weight_name="pytorch_model.bin",
    )
    conditioned = await generate_pixels(target, stack_settings, body)
    again = await generate_pixels(target, stack_settings, body)
    encoder_fields = ("ip_adapter", "image_encoder_path", "image_encoder_subfolder", "image_encoder_weight_name")
    without_ip = {key: value for key, value in body.items() if key not in encoder_fields}
    without_ip_pixels = await generate_pixels(target, stack_settings, without_ip)
    after = await generate_pixels(target, stack_settings, request(tiny_sdxl))
    assert np.abs(conditioned - plain).mean() > 1.0
    assert np.array_equal(conditioned, again)
    assert np.abs(conditioned - without_ip_pixels).mean() > 0.5, "the IP-Adapter had no effect"
    assert np.array_equal(after, plain), "conditioning leaked into the next request"
    assert images.hits["/control.png"] >= 1 and images.hits["/reference.png"] >= 1


async def test_ic_light_relights_with_foreground_and_background(
    target: str, stack_settings: Settings, tiny_sd15: TinyModel, sd15_adapters: TinyAdapters, images: FileServer
) -> None:
    plain = await generate_pixels(target, stack_settings, request(tiny_sd15))
    body = request(
        tiny_sd15,
        ic_light_model_url=str(sd15_adapters.ic_light_background),
        ic_light_image_url=images.url("/foreground.png"),
        ic_light_model_background_image_url=images.url("/background.png"),
    )
    relit = await generate_pixels(target, stack_settings, body)
    other = await generate_pixels(
        target, stack_settings, {**body, "ic_light_model_background_image_url": images.url("/other-background.png")}
    )
    after = await generate_pixels(target, stack_settings, request(tiny_sd15))
    assert np.abs(relit - plain).mean() > 1.0
    assert np.abs(relit - other).mean() > 0.5, "the background image had no effect"
    assert np.array_equal(after, plain)


async def test_worker_refusals_name_the_field(
    target: str, tiny_sdxl: TinyModel, sdxl_adapters: TinyAdapters, sd15_adapters: TinyAdapters, images: FileServer
) -> None:
    cases: list[tuple[dict[str, Any], str, str]] = [
        (
            {
                "ic_light_model_url": str(sd15_adapters.ic_light),
                "ic_light_image_url": images.url("/foreground.png"),
            },
            "ic_light_model_url",
            "SD 1.5 family only",
        ),
        (
            {
                "controlnets": [
                    {
                        "path": str(sdxl_adapters.controlnet.folder),
                        "image_url": images.url("/control.png"),
                        "mask_url": images.url("/small-mask.png"),
                    }
                ]
            },
            "controlnets[0].mask_url",
            "same size",
        ),
        (
            {"controlnets": [{"path": str(sdxl_adapters.controlnet.folder), "image_url": images.url("/missing.png")}]},
            "input.controlnets[0].image_url",
            "404",
        ),
    ]
    for overrides, field_name, text in cases:
        error = await failure(target, request(tiny_sdxl, **overrides))
        assert error.reason == "INVALID_INPUT", (field_name, error)
        assert field_name in error.message and text in error.message, error.message
        assert set(error.field_violations) == {"input." + field_name.removeprefix("input.")}, error.field_violations


async def test_gateway_refuses_what_cannot_run_here(
    target: str, tiny_sdxl: TinyModel, sdxl_adapters: TinyAdapters
) -> None:
    ipa = sdxl_adapters.ip_adapter
    body = request(
        tiny_sdxl,
        controlnets=[{"path": str(sdxl_adapters.controlnet.folder), "image_url": "data:,x", "ip_adapter_index": 0}],
        ip_adapter=[
            {"path": str(ipa.repo), "ip_adapter_image_url": ["data:,x"], "insight_face_model_path": "buffalo_l"}
        ],
    )
    error = await failure(target, body)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "insightface" in error.field_violations["input.controlnets[0].ip_adapter_index"]
    assert "insightface" in error.field_violations["input.ip_adapter[0].insight_face_model_path"]
