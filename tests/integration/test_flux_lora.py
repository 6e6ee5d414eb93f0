"""fal-ai/flux-lora, /image-to-image and /inpainting through the real service (gateway → queue → Ray
Serve → a FLUX pipeline), on the tiny FLUX.1 model the stack's `flux_model` names, over fal's HTTP
protocol and over gRPC."""

from __future__ import annotations

import io
from typing import Any

import aiohttp
import grpc
import pytest
from PIL import Image

from core.config import Settings
from loraserve.client import AsyncClient, LoraServeError
from loraserve.v1 import flux_pb2, generation_pb2, generation_pb2_grpc, types_pb2
from serving.tiny import TinyModel
from tests.conftest import read_image_bytes
from tests.integration.test_conditioning import data_uri, picture

pytestmark = pytest.mark.integration

SMALL = {"image_size": {"width": 64, "height": 48}, "num_inference_steps": 2, "enable_safety_checker": False}


def base(settings: Settings) -> str:
    return f"http://127.0.0.1:{settings.http_port}"


async def post(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, Any]:
    async with http.post(url, json=body) as response:
        return response.status, await response.json()


async def test_queue_submit_status_result_in_fals_shape(
    stack: object, stack_settings: Settings, tiny_flux: TinyModel
) -> None:
    async with aiohttp.ClientSession() as http:
        loras = [{"path": str(tiny_flux.lora_paths[0]), "scale": 0.5}]
        body = {"prompt": "a cat", "loras": loras, **SMALL}
        status, submitted = await post(http, f"{base(stack_settings)}/fal-ai/flux-lora", body)
        assert status == 200, submitted
        # The status and result URLs drop the sub-path, as fal's clients rebuild them.
        assert submitted["status_url"].endswith(f"/fal-ai/flux-lora/requests/{submitted['request_id']}/status")
        async with http.get(submitted["status_url"]) as response:
            assert response.status in (200, 202)
        async with http.get(submitted["status_url"] + "/stream") as response:
            events = [line for line in (await response.text()).splitlines() if line.startswith("data: ")]
        assert '"COMPLETED"' in events[-1], events
        async with http.get(submitted["response_url"]) as response:
            assert response.status == 200
            output = await response.json()
    assert set(output) == {"images", "timings", "seed", "has_nsfw_concepts", "prompt"}
    assert output["prompt"] == "a cat" and output["has_nsfw_concepts"] == [False]
    assert output["timings"]["inference"] > 0 and isinstance(output["seed"], int)
    [image] = output["images"]
    assert (image["width"], image["height"], image["content_type"]) == (64, 48, "image/jpeg")
    data = read_image_bytes(stack_settings, image["url"])
    assert Image.open(io.BytesIO(data)).format == "JPEG"


async def test_image_to_image_and_inpainting_run(stack: object, stack_settings: Settings, tiny_flux: TinyModel) -> None:
    start = data_uri(picture(1, 40))
    # A white mask everywhere: all of it is repainted.
    mask = data_uri(Image.new("RGB", (40, 40), "white"))
    common = {"prompt": "a dog", "num_inference_steps": 3, "enable_safety_checker": False, "image_url": start}
    async with aiohttp.ClientSession() as http:
        i2i_body = {**common, "sync_mode": True}
        status, i2i = await post(http, f"{base(stack_settings)}/run/fal-ai/flux-lora/image-to-image", i2i_body)
        assert status == 200, i2i
        # sync_mode: the image inline as a data URI (as Hugging Face's providers read it), not stored.
        assert i2i["images"][0]["url"].startswith("data:image/jpeg;base64,")
        status, inpainted = await post(
            http,
            f"{base(stack_settings)}/run/fal-ai/flux-lora/inpainting",
            {**common, "mask_url": mask, "image_size": {"width": 64, "height": 64}, "output_format": "png"},
        )
        assert status == 200, inpainted
    # Without image_size the start image's size, floored to a multiple of 16; with it, that size.
    assert (i2i["images"][0]["width"], i2i["images"][0]["height"]) == (32, 32)
    assert (inpainted["images"][0]["width"], inpainted["images"][0]["height"]) == (64, 64)
    assert inpainted["images"][0]["content_type"] == "image/png"


async def test_bad_field_is_422_over_http_and_invalid_argument_over_grpc(
    stack: object, target: str, stack_settings: Settings
) -> None:
    async with aiohttp.ClientSession() as http:
        status, body = await post(http, f"{base(stack_settings)}/fal-ai/flux-lora", {"prompt": "p", "num_images": 5})
        assert status == 422, body
        assert [entry["loc"] for entry in body["detail"]] == [["body", "num_images"]]
        status, body = await post(http, f"{base(stack_settings)}/fal-ai/flux-lora/image-to-image", {"prompt": "p"})
        assert status == 422 and [entry["loc"] for entry in body["detail"]] == [["body", "image_url"]], body
    async with grpc.aio.insecure_channel(target) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Submit(generation_pb2.SubmitRequest(flux_input=flux_pb2.FluxInput(prompt="p", num_images=5)))
        error = LoraServeError.from_rpc_error(info.value)
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
        assert list(error.field_violations) == ["flux_input.num_images"], error.field_violations
        both = generation_pb2.SubmitRequest(input=types_pb2.GenerateInput(prompt="p"), flux_input=flux_pb2.FluxInput(prompt="p"))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Submit(both)
    assert list(LoraServeError.from_rpc_error(info.value).field_violations) == ["flux_input"]


async def test_grpc_typed_result_with_the_safety_checker_on_by_default(
    stack: object, target: str, stack_settings: Settings, tiny_flux: TinyModel
) -> None:
    """The stack's checker flags everything: fal's default `enable_safety_checker: true` blacks the image out."""
    inp = flux_pb2.FluxInput(prompt="a house", num_inference_steps=2, seed=3, acceleration="regular")
    inp.image_size.custom.width, inp.image_size.custom.height = 32, 32
    async with grpc.aio.insecure_channel(target) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        events = [event async for event in stub.Subscribe(generation_pb2.SubscribeRequest(flux_input=inp))]
    result = events[-1].result
    assert result.HasField("flux_output") and not result.HasField("output"), result
    output = result.flux_output
    assert (output.prompt, output.seed, list(output.has_nsfw_concepts)) == ("a house", 3, [True])
    assert output.timings["inference"] > 0 and output.images[0].content_type == "image/jpeg"
    black = Image.open(io.BytesIO(read_image_bytes(stack_settings, output.images[0].url))).convert("L")
    assert max(black.getdata()) < 8, "a flagged image is replaced by a black one"


async def test_the_python_client_sends_a_flux_body_for_its_app_and_returns_a_flux_output(
    stack: object, target: str, tiny_flux: TinyModel
) -> None:
    body = {"prompt": "a boat", **SMALL, "seed": 9}
    async with AsyncClient(target) as client:
        subscribed = await client.subscribe(body, app="fal-ai/flux-lora")
        fetched = await client.result(subscribed.request_id)
    assert isinstance(subscribed.data, flux_pb2.FluxOutput) and fetched.data == subscribed.data
    assert (subscribed.data.prompt, subscribed.data.seed) == ("a boat", 9)
