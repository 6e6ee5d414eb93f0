"""Builds a GenerateInput from a fal-style dict, so requests written for fal-ai/lora work as-is.

The one field whose JSON shape differs from the proto is `image_size`: fal takes either a
preset name or {"width", "height"}.
"""

from __future__ import annotations

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
    inp = json_format.ParseDict(data, types_pb2.GenerateInput())
    if isinstance(size, str):
        inp.image_size.preset = size
    elif isinstance(size, Mapping):
        inp.image_size.custom.width = int(size["width"])
        inp.image_size.custom.height = int(size["height"])
    elif size is not None:
        raise ValueError(f"`image_size` must be a preset name or {{'width', 'height'}}, got {size!r}")
    return inp
