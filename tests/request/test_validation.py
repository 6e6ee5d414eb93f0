"""loraserve.request.validation.validate_input: every bad field is named, by its full path, at once."""

from __future__ import annotations

import math
from typing import Any

import pytest

from core.config import Settings
from loraserve.inputs import to_input
from loraserve.request.validation import validate_input
from loraserve.request.violations import InvalidInput
from loraserve.v1 import types_pb2
from tests.request.validation_testkit import MINIMAL, SETTINGS, violations_of


def body(**overrides: Any) -> dict[str, Any]:
    return {**MINIMAL, **overrides}


# (case id, fal-style overrides, field path that must be named, text its description must contain)
BAD_INPUTS: list[tuple[str, dict[str, Any], str, str]] = [
    ("width-zero", {"image_size": {"width": 0, "height": 512}}, "input.image_size.width", "between 8 and"),
    ("width-too-big", {"image_size": {"width": 14144, "height": 512}}, "input.image_size.width", "14142"),
    ("width-not-multiple-of-8", {"image_size": {"width": 500, "height": 512}}, "input.image_size.width", "multiple of 8"),
    ("height-negative", {"image_size": {"width": 512, "height": -8}}, "input.image_size.height", "between 8 and"),
    ("height-not-multiple-of-8", {"image_size": {"width": 512, "height": 513}}, "input.image_size.height", "multiple of 8"),
    ("preset-unknown", {"image_size": "huge"}, "input.image_size.preset", "unknown preset 'huge'"),
    ("num-images-zero", {"num_images": 0}, "input.num_images", "between 1 and 8, got 0"),
    ("num-images-nine", {"num_images": 9}, "input.num_images", "between 1 and 8, got 9"),
    ("steps-zero", {"num_inference_steps": 0}, "input.num_inference_steps", "between 1 and 150, got 0"),
    ("steps-151", {"num_inference_steps": 151}, "input.num_inference_steps", "between 1 and 150, got 151"),
    ("scheduler-unknown", {"scheduler": "Heun++"}, "input.scheduler", "unknown scheduler 'Heun++'"),
    ("prompt-empty", {"prompt": ""}, "input.prompt", "is required"),
    ("prompt-blank", {"prompt": "  \n\t"}, "input.prompt", "is required"),
    ("prompt-too-long", {"prompt": "x" * 10_001}, "input.prompt", "longer than 10000"),
    ("negative-prompt-too-long", {"negative_prompt": "x" * 10_001}, "input.negative_prompt", "longer than 10000"),
    ("model-name-empty", {"model_name": ""}, "input.model_name", "is required"),
    ("model-name-blank", {"model_name": "   "}, "input.model_name", "is required"),
    ("model-name-too-long", {"model_name": "m" * 4097}, "input.model_name", "longer than 4096"),
    ("guidance-nan", {"guidance_scale": math.nan}, "input.guidance_scale", "got nan"),
    ("guidance-inf", {"guidance_scale": math.inf}, "input.guidance_scale", "got inf"),
    ("guidance-21", {"guidance_scale": 21}, "input.guidance_scale", "between 0 and 20"),
    ("guidance-negative", {"guidance_scale": -0.5}, "input.guidance_scale", "between 0 and 20"),
    (
        "lora-scale-inf",
        {"loras": [{"path": "a.safetensors"}, {"path": "b.safetensors", "scale": math.inf}]},
        "input.loras[1].scale",
        "finite",
    ),
    (
        "lora-scale-nan",
        {"loras": [{"path": "a.safetensors", "scale": math.nan}]},
        "input.loras[0].scale",
        "finite",
    ),
    ("lora-path-empty", {"loras": [{"path": "", "scale": 0.5}]}, "input.loras[0].path", "is required"),
    ("lora-path-blank", {"loras": [{"path": "ok.safetensors"}, {"path": "  "}]}, "input.loras[1].path", "is required"),
    (
        "too-many-loras",
        {"loras": [{"path": f"l{i}.safetensors"} for i in range(17)]},
        "input.loras",
        "at most 16 LoRAs per request, got 17",
    ),
    (
        "timesteps-and-sigmas",
        {"timesteps": {"method": "array", "array": [999, 500]}, "sigmas": {"method": "array", "array": [14.6, 0.0]}},
        "input.timesteps",
        "cannot be set together with `sigmas`",
    ),
    (
        "sigmas-and-timesteps",
        {"timesteps": {"method": "array", "array": [999, 500]}, "sigmas": {"method": "array", "array": [14.6, 0.0]}},
        "input.sigmas",
        "cannot be set together with `timesteps`",
    ),
    ("timesteps-array-empty", {"timesteps": {"method": "array"}}, "input.timesteps.array", "must not be empty"),
    ("sigmas-array-empty", {"sigmas": {"method": "array", "array": []}}, "input.sigmas.array", "must not be empty"),
    ("timesteps-method-unknown", {"timesteps": {"method": "linear"}}, "input.timesteps.method", "'linear'"),
    ("timesteps-array-without-method", {"timesteps": {"array": [1, 2]}}, "input.timesteps.method", "must be 'array'"),
    ("sigmas-array-method-default", {"sigmas": {"method": "default", "array": [1.0]}}, "input.sigmas.method", "must be 'array'"),
    ("image-format-gif", {"image_format": "gif"}, "input.image_format", "got 'gif'"),
    ("image-format-case", {"image_format": "PNG"}, "input.image_format", "got 'PNG'"),
    ("prediction-type-unknown", {"prediction_type": "sample"}, "input.prediction_type", "got 'sample'"),
    ("eta-above-1", {"eta": 1.5}, "input.eta", "between 0 and 1"),
    ("eta-negative", {"eta": -0.1}, "input.eta", "between 0 and 1"),
    ("eta-nan", {"eta": math.nan}, "input.eta", "got nan"),
    ("clip-skip-3", {"clip_skip": 3}, "input.clip_skip", "between 0 and 2, got 3"),
    ("clip-skip-negative", {"clip_skip": -1}, "input.clip_skip", "between 0 and 2, got -1"),
    ("tile-width-too-small", {"tile_width": 64}, "input.tile_width", "between 128 and 4096, got 64"),
    ("tile-stride-height-too-big", {"tile_stride_height": 4096}, "input.tile_stride_height", "between 64 and 2048"),
]


@pytest.mark.parametrize(("overrides", "field", "why"), [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_names_the_field(overrides: dict[str, Any], field: str, why: str) -> None:
    found = violations_of(to_input(body(**overrides)))
    assert field in found, f"expected {field} among {sorted(found)}"
    assert any(why in description for description in found[field]), found[field]


def test_bad_input_built_as_proto_names_the_field() -> None:
    inp = types_pb2.GenerateInput(
        model_name="m",
        prompt="p",
        image_size=types_pb2.ImageSize(custom=types_pb2.Dimensions(width=1000, height=12)),
        num_images=0,
        guidance_scale=float("nan"),
        loras=[types_pb2.LoraWeight(path="a", scale=1.0), types_pb2.LoraWeight(path="b", scale=float("-inf"))],
    )
    found = violations_of(inp)
    assert set(found) == {
        "input.image_size.height",
        "input.num_images",
        "input.guidance_scale",
        "input.loras[1].scale",
    }
    assert "multiple of 8, got 12" in found["input.image_size.height"][0]


def test_valid_minimal_input_passes_as_dict_and_as_proto() -> None:
    validate_input(to_input(MINIMAL), SETTINGS.request_limits)
    validate_input(types_pb2.GenerateInput(model_name="m", prompt="p"), SETTINGS.request_limits)


def test_defaults_given_explicitly_pass() -> None:
    """What a fal client sends when it fills every field with its default."""
    fal_defaults = body(
        negative_prompt="",
        prompt_weighting=False,
        loras=[{"path": "https://example.com/style.safetensors", "scale": 1}],
        embeddings=[],
        controlnets=[],
        controlnet_guess_mode=False,
        ip_adapter=[],
        image_encoder_weight_name="pytorch_model.bin",
        seed=42,
        image_size="square_hd",
        num_inference_steps=30,
        guidance_scale=7.5,
        clip_skip=0,
        timesteps={"method": "default", "array": []},
        sigmas={"method": "default", "array": []},
        prediction_type="epsilon",
        rescale_betas_snr_zero=False,
        image_format="png",
        num_images=1,
        enable_safety_checker=False,
        tile_width=4096,
        tile_height=4096,
        tile_stride_width=2048,
        tile_stride_height=2048,
        eta=0,
        debug_latents=False,
        debug_per_pass_latents=False,
    )
    assert violations_of(to_input(fal_defaults)) == {}


@pytest.mark.parametrize(
    "overrides",
    [
        {"image_size": {"width": 8, "height": 14136}},
        {"image_size": "landscape_16_9"},
        {"image_format": "jpeg"},
        {"num_images": 8, "num_inference_steps": 150, "guidance_scale": 20.0},
        {"num_inference_steps": 1, "guidance_scale": 0.0},
        {"loras": [{"path": f"l{i}", "scale": -2.5} for i in range(16)]},
        {"prompt": "x" * 10_000, "negative_prompt": "y" * 10_000},
        {"model_name": "m" * 4096},
    ],
    ids=["size-bounds", "preset", "jpeg", "upper-bounds", "lower-bounds", "16-loras", "prompt-at-limit", "name-at-limit"],
)
def test_boundary_values_pass(overrides: dict[str, Any]) -> None:
    assert violations_of(to_input(body(**overrides))) == {}


def test_limits_come_from_settings() -> None:
    tight = Settings(max_prompt_chars=5, max_loras_per_request=1)
    found = violations_of(to_input(body(prompt="sixsix", loras=[{"path": "a"}, {"path": "b"}])), tight)
    assert set(found) == {"input.prompt", "input.loras"}
    assert "longer than 5 characters" in found["input.prompt"][0]
    assert "at most 1 LoRAs per request, got 2" in found["input.loras"][0]


def test_every_error_is_reported_at_once() -> None:
    inp = to_input(
        {
            "model_name": "",
            "prompt": "",
            "num_images": 0,
            "guidance_scale": math.nan,
            "image_size": {"width": 7, "height": 20000},
            "loras": [{"path": ""}],
            "scheduler": "nope",
        }
    )
    with pytest.raises(InvalidInput) as caught:
        validate_input(inp, SETTINGS.request_limits)
    fields = [v.field for v in caught.value.violations]
    for expected in (
        "input.model_name",
        "input.prompt",
        "input.num_images",
        "input.guidance_scale",
        "input.image_size.width",
        "input.image_size.height",
        "input.loras[0].path",
        "input.scheduler",
    ):
        assert expected in fields
    # The summary message names each field too.
    for field in fields:
        assert f"`{field}`" in caught.value.message


def test_prefix_is_used_for_field_paths() -> None:
    with pytest.raises(InvalidInput) as caught:
        validate_input(to_input({"model_name": "m", "prompt": ""}), SETTINGS, prefix="request.input")
    assert [v.field for v in caught.value.violations] == ["request.input.prompt"]
