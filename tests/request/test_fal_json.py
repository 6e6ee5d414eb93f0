"""loraserve.request.fal_json: fal's request JSON → GenerateInput, every bad or unknown field named, and the
JSON Schema of what it takes."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from loraserve.request.fal_json import MAX_JSON_DEPTH, endpoint_for, input_schema, loads_body, parse_input
from loraserve.request.violations import FieldViolation, InvalidInput
from loraserve.v1 import types_pb2

# The input example of the hosted endpoint's API page, as fal's clients send it.
FAL_EXAMPLE: dict[str, Any] = {
    "model_name": "stabilityai/stable-diffusion-xl-base-1.0",
    "prompt": "Photo of a european medieval 40 year old queen",
    "negative_prompt": "cartoon, painting",
    "prompt_weighting": True,
    "loras": [],
    "embeddings": [],
    "controlnets": [],
    "ip_adapter": [],
    "image_encoder_weight_name": "pytorch_model.bin",
    "image_size": "square_hd",
    "num_inference_steps": 30,
    "guidance_scale": 7.5,
    "timesteps": {"method": "default", "array": []},
    "sigmas": {"method": "default", "array": []},
    "image_format": "jpeg",
    "num_images": 1,
    "tile_width": 4096,
    "tile_height": 4096,
    "tile_stride_width": 2048,
    "tile_stride_height": 2048,
}


def violations(body: Any, endpoint: int | None = None) -> list[FieldViolation]:
    with pytest.raises(InvalidInput) as caught:
        parse_input(body, endpoint)
    return caught.value.violations


def test_the_api_page_example_parses_field_for_field() -> None:
    inp = parse_input(FAL_EXAMPLE, endpoint_for(""))
    assert inp.model_name == FAL_EXAMPLE["model_name"] and inp.prompt_weighting
    assert inp.image_size.preset == "square_hd"
    assert (inp.num_inference_steps, inp.guidance_scale, inp.num_images) == (30, 7.5, 1)
    assert inp.timesteps.method == "default" and not inp.timesteps.array
    assert inp.image_encoder_weight_name == "pytorch_model.bin"
    assert inp.endpoint == types_pb2.ENDPOINT_UNSPECIFIED


@pytest.mark.parametrize(
    ("sub_path", "endpoint"),
    [
        ("", types_pb2.ENDPOINT_UNSPECIFIED),
        ("image-to-image", types_pb2.ENDPOINT_IMAGE_TO_IMAGE),
        ("/inpaint/", types_pb2.ENDPOINT_INPAINT),
        ("upscale", None),
    ],
)
def test_the_path_names_the_endpoint(sub_path: str, endpoint: int | None) -> None:
    assert endpoint_for(sub_path) == endpoint
    if endpoint is not None:
        assert parse_input({"prompt": "p"}, endpoint).endpoint == endpoint


def test_image_size_preset_or_object_and_ip_adapter_shapes() -> None:
    inp = parse_input(
        {
            "image_size": {"width": 768, "height": 512},
            "seed": 2**40,
            "ip_adapter": [
                {"path": "a", "ip_adapter_image_url": "https://x/1.png", "scale_json": {"down": {"block_2": [0.0, 1.0]}}},
                {"path": "b", "ip_adapter_image_url": ["https://x/2.png", "https://x/3.png"], "scale_json": 0.5},
            ],
        }
    )
    assert (inp.image_size.custom.width, inp.image_size.custom.height) == (768, 512)
    assert inp.seed == 2**40
    assert list(inp.ip_adapter[0].ip_adapter_image_url) == ["https://x/1.png"]
    assert list(inp.ip_adapter[1].ip_adapter_image_url) == ["https://x/2.png", "https://x/3.png"]
    assert json.loads(inp.ip_adapter[0].scale_json) == {"down": {"block_2": [0.0, 1.0]}}
    assert json.loads(inp.ip_adapter[1].scale_json) == 0.5


def test_null_means_unset_and_non_finite_floats_are_kept_for_validation_to_name() -> None:
    inp = parse_input({"prompt": "p", "seed": None, "guidance_scale": math.nan, "loras": [{"path": "l", "scale": None}]})
    assert not inp.HasField("seed") and not inp.loras[0].HasField("scale")
    assert math.isnan(inp.guidance_scale)


def test_unknown_and_mistyped_keys_are_all_named_with_their_paths() -> None:
    found = violations(
        {
            "prompt": 3,
            "promt": "typo",
            "loras": [{"path": "ok"}, {"path": "l", "scale": "big", "weight": 1}],
            "image_size": {"width": 64},
            "num_images": 1.5,
            "seed": True,
            "ip_adapter": [{"path": "p", "ip_adapter_image_url": [1]}],
            "endpoint": "ENDPOINT_INPAINT",
        },
        endpoint=types_pb2.ENDPOINT_UNSPECIFIED,
    )
    named = {(v.field, v.kind) for v in found}
    assert named == {
        ("input.prompt", "type_error.str"),
        ("input.promt", "value_error.extra"),
        ("input.loras[1].scale", "type_error.float"),
        ("input.loras[1].weight", "value_error.extra"),
        ("input.image_size.height", "value_error.missing"),
        ("input.num_images", "type_error.integer"),
        ("input.seed", "type_error.integer"),
        ("input.ip_adapter[0].ip_adapter_image_url[0]", "type_error.str"),
        # The path names the endpoint; the body may not.
        ("input.endpoint", "value_error.extra"),
    }


@pytest.mark.parametrize("body", [[], "text", 3])
def test_a_body_that_is_not_an_object_is_refused(body: Any) -> None:
    assert [v.field for v in violations(body)] == ["input"]


def test_the_body_schema_names_exactly_what_the_parser_takes() -> None:
    """The OpenAPI document's body is walked over the parser's own descriptors: every property it names is
    accepted, anything else is refused, and the API page's example fits it."""
    import jsonschema

    schema = input_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(FAL_EXAMPLE, schema)
    for name in schema["properties"]:
        parse_input({name: None}, endpoint_for(""))
    assert violations({"endpoint": "ENDPOINT_INPAINT"}, endpoint_for(""))[0].description == "extra fields not permitted"
    assert "endpoint" not in schema["properties"] and "endpoint" in input_schema(endpoint_in_path=False)["properties"]
    custom = {**FAL_EXAMPLE, "image_size": {"width": 512, "height": 768}, "ip_adapter": [{"ip_adapter_image_url": "u", "scale_json": {"up": 1}}]}
    jsonschema.validate(custom, schema)
    parse_input(custom, endpoint_for(""))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**FAL_EXAMPLE, "image_size": {"width": 512}}, schema)


def test_bodies_no_encoder_or_float_takes_are_refused_naming_the_field() -> None:
    """Lone surrogates and integers past any float were a 500 (protobuf and float() raised)."""
    lone = "\ud800"
    cases = {
        "prompt": lone,
        "image_size": lone,
        "ip_adapter": [{"ip_adapter_image_url": [lone], "scale_json": lone}],
        "embeddings": [{"tokens": ["<s0>", lone]}],
    }
    found = {v.field: v.description for v in violations({"model_name": "m", **cases})}
    assert set(found) == {
        "input.prompt",
        "input.image_size",
        "input.ip_adapter[0].ip_adapter_image_url[0]",
        "input.ip_adapter[0].scale_json",
        "input.embeddings[0].tokens[1]",
    }
    assert all("lone surrogate" in description for description in found.values())
    assert [v.field for v in violations({lone: 1, "image_size": {"width": 8, "height": 8, lone: 1}})] == [
        "input.\\ud800",
        "input.image_size.\\ud800",
    ]
    assert parse_input({"guidance_scale": 10**400}).guidance_scale == math.inf
    assert parse_input({"sigmas": {"array": [-(10**400)]}}).sigmas.array[0] == -math.inf


def test_loads_body_bounds_depth_and_reads_empty_as_empty() -> None:
    assert loads_body(b"  ") == {}
    nested = json.dumps({"ip_adapter": [{"scale_json": {"up": {"block_0": [1.0]}}}]}).encode()
    assert loads_body(nested)["ip_adapter"][0]["scale_json"]["up"]["block_0"] == [1.0]
    for raw in (b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1), b"[" * 200_000 + b"]" * 200_000):
        with pytest.raises(InvalidInput) as caught:
            loads_body(raw)
        assert caught.value.violations[0].field == "input" and "deeper" in caught.value.violations[0].description
    assert loads_body(b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH)
    with pytest.raises(InvalidInput, match="not valid JSON"):
        loads_body(b"{nope")
