"""Builds a GenerateInput from a fal-style dict, so requests written for fal-ai/lora work as-is.

The one field whose JSON shape differs from the proto is `image_size`: fal takes either a
preset name or {"width", "height"}. Like fal's clients, ours upload binary inputs found in
a dict (bytes, pathlib.Path, PIL images) and pass their URLs instead.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from pathlib import Path
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


def is_local_file(value: Any) -> bool:
    """What the clients upload for the caller: bytes, a pathlib.Path, a PIL image.

    Plain strings are left alone: they may be URLs, Hugging Face IDs or paths on the
    workers' own disks, which only the caller can tell apart.
    """
    if isinstance(value, (bytes, bytearray, Path)):
        return True
    return type(value).__module__.startswith("PIL.") and hasattr(value, "save")


def find_local_files(value: Any) -> list[Any]:
    if is_local_file(value):
        return [value]
    if isinstance(value, Mapping):
        return [f for v in value.values() for f in find_local_files(v)]
    if isinstance(value, (list, tuple)):
        return [f for v in value for f in find_local_files(v)]
    return []


def replace_local_files(value: Any, urls: Mapping[int, str]) -> Any:
    """A copy of `value` with each local file swapped for its uploaded URL (keyed by id())."""
    if is_local_file(value):
        return urls[id(value)]
    if isinstance(value, Mapping):
        return {k: replace_local_files(v, urls) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [replace_local_files(v, urls) for v in value]
    return value


def file_payload(value: Any) -> tuple[bytes, str]:
    """(bytes, file name) of a local file found in an input; PIL images are sent as PNG."""
    if isinstance(value, Path):
        return value.read_bytes(), value.name
    if isinstance(value, (bytes, bytearray)):
        return bytes(value), "upload.bin"
    buffer = io.BytesIO()
    value.save(buffer, format="PNG")
    return buffer.getvalue(), "image.png"
