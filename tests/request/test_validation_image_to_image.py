"""loraserve.request.validation for fal-ai/lora/image-to-image and fal-ai/lora/inpaint (GenerateInput.endpoint).

Each field is accepted only where its endpoint reads it; a mask of another size than the image
is refused by the worker once both are fetched (tests/integration/test_image_to_image.py).
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from loraserve.request import schema
from loraserve.inputs import to_input
from loraserve.v1 import types_pb2
from tests.request.validation_testkit import MINIMAL, violations, violations_of

IMAGE = "https://example.com/start.png"
MASK = "https://example.com/mask.png"
I2I = "ENDPOINT_IMAGE_TO_IMAGE"
INPAINT = "ENDPOINT_INPAINT"
SCHEDULE3 = {"method": "array", "array": [999, 500, 1]}
SIGMAS2 = {"method": "array", "array": [14.6, 1.0, 0.0]}
CONTROLNET = {"path": "cn", "image_url": IMAGE}
CONTROLLED_I2I = {"endpoint": I2I, "image_url": IMAGE, "controlnets": [CONTROLNET]}


@pytest.mark.parametrize(
    "overrides",
    [
        {"endpoint": I2I, "image_url": IMAGE},
        {"endpoint": I2I, "image_url": "data:,x", "noise_strength": 0.01, "num_inference_steps": 150},
        {"endpoint": I2I, "image_url": IMAGE, "noise_strength": 1.0},
        {"endpoint": I2I, "image_url": IMAGE, "noise_strength": 0.5, "num_inference_steps": 2},
        {"endpoint": I2I, "image_url": IMAGE, "noise_strength": 0.34, "timesteps": SCHEDULE3},
        {"endpoint": INPAINT, "image_url": IMAGE, "mask_url": MASK},
        {**CONTROLLED_I2I, "scheduler": "LCM"},
        {"timesteps": SCHEDULE3, "scheduler": "Euler", "controlnets": [CONTROLNET]},
        {"endpoint": INPAINT, "image_url": IMAGE, "mask_url": MASK, "noise_strength": 1.0, "loras": [{"path": "x"}]},
        {},
    ],
)
def test_accepted(overrides: dict[str, Any]) -> None:
    assert violations(**overrides) == {}


@pytest.mark.parametrize(
    ("overrides", "field", "text"),
    [
        ({"endpoint": I2I}, "image_url", "is required for image-to-image"),
        ({"endpoint": I2I, "image_url": "  "}, "image_url", "is required"),
        ({"endpoint": INPAINT, "mask_url": MASK}, "image_url", "is required for inpaint"),
        ({"endpoint": INPAINT, "image_url": IMAGE}, "mask_url", "is required for inpaint"),
        ({"endpoint": I2I, "image_url": IMAGE, "mask_url": MASK}, "mask_url", "only applies to the inpaint endpoint"),
        ({"endpoint": I2I, "image_url": IMAGE, "noise_strength": 1.5}, "noise_strength", "between 0 and 1"),
        ({"endpoint": I2I, "image_url": IMAGE, "noise_strength": -0.1}, "noise_strength", "between 0 and 1"),
        ({"endpoint": INPAINT, "image_url": IMAGE, "noise_strength": math.nan}, "noise_strength", "got nan"),
        ({"endpoint": I2I, "image_url": IMAGE, "noise_strength": float("inf")}, "noise_strength", "between 0 and 1"),
        ({"endpoint": I2I, "image_url": IMAGE, "noise_strength": 0.0}, "noise_strength", "0 denoising steps"),
        (
            {"endpoint": I2I, "image_url": IMAGE, "noise_strength": 0.2, "num_inference_steps": 3},
            "noise_strength",
            "at least 0.333",
        ),
        (
            {"endpoint": I2I, "image_url": IMAGE, "noise_strength": 0.4, "sigmas": SIGMAS2},
            "noise_strength",
            "int(2 steps",
        ),
        ({"endpoint": I2I, "image_url": IMAGE, "image_size": "square"}, "image_size", "takes the size of image_url"),
        (
            {"endpoint": INPAINT, "image_url": IMAGE, "mask_url": MASK, "image_size": {"width": 64, "height": 64}},
            "image_size",
            "not used by inpaint",
        ),
        ({**CONTROLLED_I2I, "scheduler": "Euler", "timesteps": SCHEDULE3}, "timesteps", "no custom"),
        ({**CONTROLLED_I2I, "endpoint": INPAINT, "mask_url": MASK, "sigmas": SIGMAS2}, "sigmas", "no custom"),
        (
            {**CONTROLLED_I2I, "scheduler": "LCM (trailing timesteps)"},
            "scheduler",
            "custom timestep schedule",
        ),
        ({"image_url": IMAGE}, "image_url", "not to text-to-image"),
        ({"mask_url": MASK}, "mask_url", "not to text-to-image"),
        ({"noise_strength": 0.5}, "noise_strength", "not to text-to-image"),
    ],
)
def test_refused_naming_the_field(overrides: dict[str, Any], field: str, text: str) -> None:
    found = violations(**overrides)
    assert f"input.{field}" in found, found
    assert any(text in why for why in found[f"input.{field}"]), found


def test_unknown_endpoint_number_is_refused() -> None:
    inp = to_input(MINIMAL)
    inp.endpoint = 7  # type: ignore[assignment]
    assert "unknown endpoint 7" in violations_of(inp)["input.endpoint"][0]


def test_every_violation_is_reported_at_once() -> None:
    found = violations(endpoint=INPAINT, image_size="square", noise_strength=2.0)
    assert {f"input.{name}" for name in ("image_url", "mask_url", "image_size", "noise_strength")} <= found.keys()


def test_schema_defaults_and_endpoint_names() -> None:
    inp = types_pb2.GenerateInput(endpoint=types_pb2.ENDPOINT_IMAGE_TO_IMAGE)
    assert schema.noise_strength(inp) == schema.DEFAULT_NOISE_STRENGTH == 0.5
    assert schema.starts_from_image(inp)
    assert not schema.starts_from_image(types_pb2.GenerateInput())
    assert set(schema.ENDPOINT_NAMES) == set(types_pb2.Endpoint.values())
