"""The fal-ai/flux-lora request model (loraserve/request/flux.py): fal's JSON in, fal's defaults and
ranges, every bad field named, and fal's JSON out."""

from __future__ import annotations

import pytest

from gateway.errors import field_loc
from loraserve.inputs import to_input
from loraserve.request import flux, schema
from loraserve.request.limits import RequestLimits
from loraserve.request.violations import InvalidInput
from loraserve.v1 import flux_pb2, types_pb2

LIMITS = RequestLimits(max_prompt_chars=100, max_loras_per_request=2, max_data_uri_bytes=1000, max_sync_mode_pixels=10**6)
T2I, I2I, INPAINTING = (
    flux_pb2.FLUX_ENDPOINT_UNSPECIFIED,
    flux_pb2.FLUX_ENDPOINT_IMAGE_TO_IMAGE,
    flux_pb2.FLUX_ENDPOINT_INPAINTING,
)


def violations(body: dict[str, object], endpoint: int = T2I) -> dict[str, str]:
    with pytest.raises(InvalidInput) as info:
        flux.validate_flux_input(flux.parse_flux_input(body, endpoint), LIMITS)
    return {v.field: v.description for v in info.value.violations}


def test_fal_defaults_when_fields_are_left_out() -> None:
    inp = flux.parse_flux_input({"prompt": "a cat", "seed": None, "loras": [{"path": "l.safetensors"}]})
    flux.validate_flux_input(inp, LIMITS)
    assert flux.image_size(inp) == (1024, 768)
    assert (flux.num_inference_steps(inp), flux.guidance_scale(inp), flux.num_images(inp)) == (28, 3.5, 1)
    assert (flux.output_format(inp), flux.acceleration(inp), flux.safety_checker(inp)) == ("jpeg", "none", True)
    assert schema.lora_scale(inp.loras[0]) == 1.0 and not inp.HasField("seed")
    start = flux.parse_flux_input({"prompt": "p", "image_url": "https://x.example/a.png"}, I2I)
    assert flux.strength(start) == 0.85 and flux.image_size(start) is None


def test_unknown_keys_and_other_endpoints_keys_are_ignored() -> None:
    body = {"prompt": "p", "negative_prompt": "blurry", "model_name": "x", "image_url": "https://x.example/a.png",
            "loras": [{"path": "l.safetensors", "force": True}]}
    inp = flux.parse_flux_input(body)
    flux.validate_flux_input(inp, LIMITS)
    assert inp.image_url == "" and inp.endpoint == T2I


def test_sizes_floor_to_multiples_of_16() -> None:
    inp = flux.parse_flux_input({"prompt": "p", "image_size": {"width": 1000, "height": 70}})
    assert flux.image_size(inp) == (992, 64)
    assert flux.image_size(flux.parse_flux_input({"prompt": "p", "image_size": "portrait_16_9"})) == (576, 1024)


def test_every_bad_field_is_named_with_fals_ranges() -> None:
    found = violations({
        "prompt": "", "num_images": 5, "num_inference_steps": 51, "guidance_scale": 35.5, "seed": -1,
        "image_size": {"width": 14143, "height": 8}, "output_format": "webp", "acceleration": "high",
        "loras": [{"path": "a", "scale": 4.5}, {"path": ""}, {"path": "c"}],
    })
    assert set(found) == {
        "flux_input.prompt", "flux_input.num_images", "flux_input.num_inference_steps", "flux_input.guidance_scale",
        "flux_input.seed", "flux_input.image_size.width", "flux_input.image_size.height", "flux_input.output_format",
        "flux_input.acceleration", "flux_input.loras", "flux_input.loras[0].scale", "flux_input.loras[1].path",
    }, found
    assert "between 1 and 4" in found["flux_input.num_images"]
    assert field_loc("flux_input.loras[0].scale") == ["body", "loras", 0, "scale"]


def test_start_image_and_mask_are_required_where_fal_requires_them() -> None:
    assert set(violations({"prompt": "p"}, I2I)) == {"flux_input.image_url"}
    assert set(violations({"prompt": "p", "image_url": "https://x.example/a.png", "strength": 0}, INPAINTING)) == {
        "flux_input.mask_url", "flux_input.strength",
    }


def test_wrong_json_types_are_named() -> None:
    with pytest.raises(InvalidInput) as info:
        flux.parse_flux_input({"prompt": 3, "num_images": "many", "loras": {"path": "x"}, "image_size": 5})
    assert {v.field for v in info.value.violations} == {
        "input.prompt", "input.num_images", "input.loras", "input.image_size",
    }


def test_lone_surrogates_are_named_not_a_server_error() -> None:
    """JSON's "\\ud800" has no UTF-8 form: protobuf refuses it, so the parser must name it first."""
    with pytest.raises(InvalidInput) as info:
        flux.parse_flux_input({"prompt": "\ud800", "image_size": "\udfff", "loras": [{"path": "\ud800"}]})
    assert {v.field for v in info.value.violations} == {"input.prompt", "input.image_size", "input.loras[0].path"}


def test_output_json_is_fals_shape() -> None:
    inp = flux_pb2.FluxInput(prompt="a cat")
    worker = types_pb2.GenerateOutput(seed=7, has_nsfw_concepts=[False])
    worker.images.add(url="https://f/a.jpg", content_type="image/jpeg", file_name="a.jpg", file_size=9, width=64, height=48)
    body = flux.output_json(flux.output_of(inp, worker, 0.5))
    assert body == {
        "images": [{"url": "https://f/a.jpg", "width": 64, "height": 48, "content_type": "image/jpeg"}],
        "timings": {"inference": 0.5},
        "seed": 7,
        "has_nsfw_concepts": [False],
        "prompt": "a cat",
    }


def test_the_clients_read_a_dict_as_the_body_of_its_app() -> None:
    inp = to_input({"prompt": "p", "image_url": "https://x.example/a.png"}, "fal-ai/flux-lora/image-to-image")
    assert isinstance(inp, flux_pb2.FluxInput) and inp.endpoint == I2I
    lora = to_input({"model_name": "m", "prompt": "p", "image_url": "https://x.example/a.png"}, "fal-ai/lora/inpaint")
    assert isinstance(lora, types_pb2.GenerateInput) and lora.endpoint == types_pb2.ENDPOINT_INPAINT
    for app in ("fal-ai/flux-lora/inpaint", "fal-ai/other", "fal-ai/lorax"):
        with pytest.raises(ValueError, match="unknown app"):
            to_input({"prompt": "p"}, app)
