"""Builds a GenerateInput from a fal-style dict, so requests written for fal-ai/lora work as-is.

The one field whose JSON shape differs from the proto is `image_size`: fal takes either a
preset name or {"width", "height"}.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from google.protobuf import json_format

from loraserve.v1 import types_pb2

InputLike = types_pb2.GenerateInput | Mapping[str, Any]


def to_input(value: InputLike) -> types_pb2.GenerateInput:
    if isinstance(value, types_pb2.GenerateInput):
        return value
    data = dict(value)
    size = data.pop("image_size", None)
    inp = json_format.ParseDict(_json_floats(data), types_pb2.GenerateInput())
    if isinstance(size, str):
        inp.image_size.preset = size
    elif isinstance(size, Mapping) and {"width", "height"} <= size.keys():
        inp.image_size.custom.width = int(size["width"])
        inp.image_size.custom.height = int(size["height"])
    elif size is not None:
        raise ValueError(f"`image_size` must be a preset name or {{'width', 'height'}}, got {size!r}")
    return inp


def _json_floats(value: Any) -> Any:
    """Python's nan/inf become the strings proto JSON expects, so validation can name them."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, Mapping):
        return {k: _json_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_floats(v) for v in value]
    return value
