"""What the validation tests share: a minimal valid input and violations as {field: [why]}."""

from __future__ import annotations

from typing import Any

from core.config import Settings
from loraserve.inputs import to_input
from loraserve.request.validation import validate_input
from loraserve.request.violations import InvalidInput
from loraserve.v1 import types_pb2

SETTINGS = Settings()
MINIMAL: dict[str, Any] = {"model_name": "stabilityai/stable-diffusion-xl-base-1.0", "prompt": "a red house"}


def violations_of(inp: types_pb2.GenerateInput, settings: Settings = SETTINGS) -> dict[str, list[str]]:
    """field path -> descriptions; {} when the input is valid."""
    try:
        validate_input(inp, settings.request_limits)
    except InvalidInput as exc:
        found: dict[str, list[str]] = {}
        for v in exc.violations:
            found.setdefault(v.field, []).append(v.description)
        return found
    return {}


def violations(**overrides: Any) -> dict[str, list[str]]:
    """Violations of the minimal input with fal-style `overrides`."""
    return violations_of(to_input({**MINIMAL, **overrides}))
