"""fal-ai/lora/image-to-image and fal-ai/lora/inpaint through the real service (gateway → queue → Ray Serve).

The tiny models' VAEs have random weights: decoding an image's latents gives pixels unrelated to
the image, and their decoder's attention mixes every pixel with every other, so "close to the
input image" and "the unmasked region is kept" cannot be read off the output pixels. They are
read off the latents the request returns with `debug_latents` (the denoised latents the VAE
decodes), compared with the start image's own latents computed here with the model's VAE: that
comparison is the pixels' "up to the VAE round trip". The model used is a copy of the tiny one
whose VAE posterior has (almost) no variance, so the start image's latents are one exact
tensor, not a draw. Start images travel as data URIs and through a loopback file server.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.numpy import load

from loraserve.client import AsyncClient, LoraServeError
from core.config import Settings
from serving.tiny import TinyModel, make_tiny_model
from serving.tiny_adapters import make_tiny_adapters
from tests.conftest import read_image_bytes
from tests.integration.test_conditioning import data_uri, failure, picture, png
from tests.integration.test_generation_api import generate_pixels, pixels, request
from tests.storage.storage_testkit import FileServer, Route

pytestmark = pytest.mark.integration

I2I = "ENDPOINT_IMAGE_TO_IMAGE"
INPAINT = "ENDPOINT_INPAINT"
SIZE = 64
STEPS = 10


def crisp_copy(model: TinyModel, out_dir: Path) -> Path:
    """The tiny pipeline with a VAE whose posterior log-variance is -30: latents are the encoder's mean."""
    shutil.copytree(model.pipeline_dir, out_dir)
    vae = AutoencoderKL.from_pretrained(out_dir / "vae")
    channels = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.weight[channels:] = 0
        vae.quant_conv.bias[channels:] = -30.0
    vae.save_pretrained(out_dir / "vae", safe_serialization=True)
    return out_dir


@pytest.fixture(scope="module")
def crisp(tiny_sd15: TinyModel, tiny_sdxl: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("crisp")
    return {model.family: crisp_copy(model, root / model.family) for model in (tiny_sd15, tiny_sdxl)}


@pytest.fixture(scope="module")
def models(tiny_sd15: TinyModel, tiny_sdxl: TinyModel) -> dict[str, TinyModel]:
    return {"sd15": tiny_sd15, "sdxl": tiny_sdxl}


@pytest.fixture(params=["sd15", "sdxl"])
def family(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def start_latents(pipeline_dir: Path, image: Image.Image) -> np.ndarray:
    """The start image as the pipelines encode it: pixels to [-1, 1], the posterior's mean, scaled."""
    vae = AutoencoderKL.from_pretrained(pipeline_dir / "vae")
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    with torch.no_grad():
        mean = vae.encode(x).latent_dist.mean
    return (mean[0] * vae.config.scaling_factor).numpy()


def half_mask(width: int = SIZE, height: int = SIZE) -> Image.Image:
    """White (repainted) on the left half."""
    mask = np.zeros((height, width, 3), dtype=np.uint8)
    mask[:, : width // 2] = 255
    return Image.fromarray(mask)


def body(pipeline_dir: Path, **overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "model_name": str(pipeline_dir),
        "prompt": "a photo of a red house",
        "num_inference_steps": STEPS,
        "seed": 7,
        "endpoint": I2I,
        "image_url": data_uri(picture(1)),
    }
    return {**fields, **overrides}


async def final_latents(target: str, settings: Settings, request_body: dict[str, Any]) -> np.ndarray:
    async with AsyncClient(target) as client:
        result = await client.subscribe({**request_body, "debug_latents": True})
    out = result.data
    assert (out.images[0].width, out.images[0].height) == (SIZE, SIZE)
    return load(read_image_bytes(settings, out.debug_latents.url))["latents"][0]


async def test_low_noise_strength_stays_closer_to_the_start_image(
    target: str, stack_settings: Settings, crisp: dict[str, Path], family: str
) -> None:
    model = crisp[family]
    start = start_latents(model, picture(1))
    low = await final_latents(target, stack_settings, body(model, noise_strength=0.2))
    high = await final_latents(target, stack_settings, body(model, noise_strength=0.9))
    low_distance, high_distance = np.abs(low - start).mean(), np.abs(high - start).mean()
    assert low_distance * 3 < high_distance, (low_distance, high_distance)


async def test_full_noise_ignores_the_start_image_but_takes_its_size(
    target: str, stack_settings: Settings, models: dict[str, TinyModel], family: str
) -> None:
    model = models[family].pipeline_dir
    first = await generate_pixels(target, stack_settings, body(model, noise_strength=1.0))
    other = await generate_pixels(
        target, stack_settings, body(model, noise_strength=1.0, image_url=data_uri(picture(2)))
    )
    assert np.array_equal(first, other)
    low = [
        await generate_pixels(target, stack_settings, body(model, noise_strength=0.3, image_url=data_uri(picture(s))))
        for s in (1, 2)
    ]
    assert np.abs(low[0] - low[1]).mean() > 1.0, "at 0.3 the start image made no difference"
    # The output takes the start image's size, rounded down to a multiple of 8.
    odd = data_uri(picture(3).resize((75, 50)))
    async with AsyncClient(target) as client:
        result = await client.subscribe(body(model, noise_strength=1.0, image_url=odd))
    assert (result.data.images[0].width, result.data.images[0].height) == (72, 48)


async def test_a_lora_changes_image_to_image_and_leaves_no_trace(
    target: str, stack_settings: Settings, models: dict[str, TinyModel], family: str
) -> None:
    model = models[family]
    plain_text_to_image = await generate_pixels(target, stack_settings, request(model))
    plain = await generate_pixels(target, stack_settings, body(model.pipeline_dir))
    with_lora = await generate_pixels(
        target, stack_settings, body(model.pipeline_dir, loras=[{"path": str(model.lora_paths[0]), "scale": 1.0}])
    )
    assert np.abs(with_lora - plain).mean() > 1.0
    assert np.array_equal(await generate_pixels(target, stack_settings, body(model.pipeline_dir)), plain)
    after = await generate_pixels(target, stack_settings, request(model))
    assert np.array_equal(after, plain_text_to_image), "image-to-image leaked into text-to-image"


async def test_inpainting_keeps_the_unmasked_region(
    target: str, stack_settings: Settings, crisp: dict[str, Path], family: str
) -> None:
    model = crisp[family]
    server = FileServer()
    server.routes["/start.png"] = Route(png(picture(1)))
    server.routes["/mask.png"] = Route(png(half_mask()))
    server.start()
    try:
        inpaint = body(
            model, endpoint=INPAINT, image_url=server.url("/start.png"), mask_url=server.url("/mask.png")
        )
        start = start_latents(model, picture(1))
        # The tiny VAE halves each side: latent columns 0-15 are under the mask's white half.
        masked, kept = slice(0, 16), slice(16, 32)
        for strength in (0.5, 1.0):
            latents = await final_latents(target, stack_settings, {**inpaint, "noise_strength": strength})
            assert np.abs(latents[..., kept] - start[..., kept]).max() < 1e-4
            assert np.abs(latents[..., masked] - start[..., masked]).mean() > 0.1, "nothing was repainted"
        image_to_image = await final_latents(target, stack_settings, {**inpaint, "endpoint": I2I, "mask_url": ""})
        assert np.abs(image_to_image[..., kept] - start[..., kept]).mean() > 0.1, "without the mask all is redrawn"
        assert server.hits["/start.png"] >= 3 and server.hits["/mask.png"] >= 2
    finally:
        server.stop()


async def test_a_mask_of_another_size_is_invalid_argument_naming_mask_url(
    target: str, models: dict[str, TinyModel], family: str
) -> None:
    error = await failure(
        target,
        body(models[family].pipeline_dir, endpoint=INPAINT, mask_url=data_uri(half_mask(32, 32))),
    )
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.reason == "INVALID_INPUT"
    assert "mask_url" in error.message and "32x32" in error.message and "64x64" in error.message
    assert set(error.field_violations) == {"input.mask_url"}


async def test_bad_fields_are_invalid_argument_naming_each(target: str, tiny_sdxl: TinyModel) -> None:
    model = tiny_sdxl.pipeline_dir
    cases: list[tuple[dict[str, Any], str]] = [
        (body(model, image_url=""), "input.image_url"),
        (body(model, endpoint=INPAINT), "input.mask_url"),
        (body(model, noise_strength=1.5), "input.noise_strength"),
        (body(model, noise_strength=float("nan")), "input.noise_strength"),
        (body(model, image_size={"width": 64, "height": 64}), "input.image_size"),
        (body(model, mask_url=data_uri(half_mask())), "input.mask_url"),
        (request(tiny_sdxl, noise_strength=0.5), "input.noise_strength"),
        (request(tiny_sdxl, image_url=data_uri(picture(1))), "input.image_url"),
    ]
    for case, field_name in cases:
        async with AsyncClient(target) as client:
            with pytest.raises(LoraServeError) as info:
                await client.submit(case)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT, (field_name, info.value)
        assert field_name in info.value.field_violations, (field_name, info.value.field_violations)
    error = await failure(target, body(model, image_url="data:,not-an-image"))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and "input.image_url" in error.message


async def test_an_uploaded_start_image_works_like_a_data_uri(
    target: str, stack_settings: Settings, models: dict[str, TinyModel]
) -> None:
    """An uploaded start image (this service's own file URL) is read from the store, not over HTTP."""
    model = models["sd15"].pipeline_dir
    async with AsyncClient(target) as client:
        uploaded = await client.upload(png(picture(1)), file_name="start.png", content_type="image/png")
        result = await client.subscribe(body(model, image_url=uploaded.url))
    via_upload = pixels(stack_settings, result.data.images[0].url)
    assert np.array_equal(via_upload, await generate_pixels(target, stack_settings, body(model)))


async def test_controlnet_and_ip_adapter_with_inpaint_and_image_to_image(
    target: str,
    stack_settings: Settings,
    crisp: dict[str, Path],
    tiny_sdxl: TinyModel,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """ControlNets run through diffusers' ControlNet inpaint / image-to-image pipelines, IP-Adapters beside them."""
    kit = make_tiny_adapters(tmp_path_factory.mktemp("i2i-adapters"), tiny_sdxl.pipeline_dir, "sdxl")
    model = crisp["sdxl"]
    ipa = kit.ip_adapter
    conditioning: dict[str, Any] = {
        "controlnets": [{"path": str(kit.controlnet.folder), "image_url": data_uri(picture(5)), "end_percentage": 0.8}],
        "ip_adapter": [
            {
                "path": str(ipa.repo),
                "model_subfolder": ipa.model_subfolder,
                "weight_name": ipa.weight_name,
                "ip_adapter_image_url": [data_uri(picture(6))],
            }
        ],
        "image_encoder_path": str(ipa.repo),
        "image_encoder_subfolder": ipa.image_encoder_subfolder,
    }
    inpaint = body(model, endpoint=INPAINT, mask_url=data_uri(half_mask()), noise_strength=0.8)
    start = start_latents(model, picture(1))
    bare = await final_latents(target, stack_settings, inpaint)
    conditioned = await final_latents(target, stack_settings, {**inpaint, **conditioning})
    assert np.abs(conditioned[..., :16] - bare[..., :16]).mean() > 0.01, "the conditioning had no effect"
    assert np.abs(conditioned[..., 16:] - start[..., 16:]).max() < 1e-4, "the unmasked region was not kept"
    image_to_image = body(model, noise_strength=0.8)
    plain = await generate_pixels(target, stack_settings, image_to_image)
    controlled = await generate_pixels(target, stack_settings, {**image_to_image, **conditioning})
    assert np.abs(controlled - plain).mean() > 1.0


@pytest.fixture(scope="module")
def inpainting_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TinyModel]:
    """Dedicated inpainting checkpoints (9-channel U-Net), saved under diffusers' inpaint pipeline class."""
    root = tmp_path_factory.mktemp("inpainting-checkpoints")
    return {f: make_tiny_model(root / f, family=f, num_loras=1, inpaint=True) for f in ("sd15", "sdxl")}


async def test_a_dedicated_inpainting_checkpoint_runs_inpaint(
    target: str, stack_settings: Settings, inpainting_models: dict[str, TinyModel], family: str
) -> None:
    model = inpainting_models[family]
    inpaint = body(model.pipeline_dir, endpoint=INPAINT, mask_url=data_uri(half_mask()), num_inference_steps=3)
    first = await generate_pixels(target, stack_settings, inpaint)
    assert first.shape == (SIZE, SIZE, 3)
    assert np.array_equal(await generate_pixels(target, stack_settings, inpaint), first), "same seed, other bytes"
    with_lora = await generate_pixels(
        target, stack_settings, {**inpaint, "loras": [{"path": str(model.lora_paths[0]), "scale": 1.0}]}
    )
    assert np.abs(with_lora - first).mean() > 1.0, "the LoRA had no effect"


async def test_other_endpoints_on_an_inpainting_checkpoint_are_refused_naming_model_name(
    target: str, stack_settings: Settings, inpainting_models: dict[str, TinyModel]
) -> None:
    """The worker refuses them before denoising: INVALID_ARGUMENT naming input.model_name, 422 over fal's HTTP."""
    model = inpainting_models["sdxl"].pipeline_dir
    text_to_image = {"model_name": str(model), "prompt": "a red house", "num_inference_steps": 2}
    for case, endpoint in ((text_to_image, "text-to-image"), (body(model), "image-to-image")):
        error = await failure(target, case)
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.reason == "INVALID_INPUT", error
        assert set(error.field_violations) == {"input.model_name"}
        assert "inpainting model" in error.message and f"not {endpoint}" in error.message
    url = f"http://127.0.0.1:{stack_settings.http_port}/run/fal-ai/lora"
    async with aiohttp.ClientSession() as http:
        async with http.post(url, json=text_to_image) as response:
            status, answer = response.status, await response.json()
    assert status == 422, answer
    assert [entry["loc"] for entry in answer["detail"]] == [["body", "model_name"]]
    assert "fal-ai/lora/inpaint" in answer["detail"][0]["msg"]
