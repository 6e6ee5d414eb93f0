"""Builds a GenerateInput from a fal-style dict, so requests written for fal-ai/lora work as-is.

The dict is read by the same parser as the gateway's HTTP side (loraserve/request/fal_json.py), so a body
that fal's endpoint takes is taken here too (`image_size` as a preset or {width, height},
`ip_adapter_image_url` as one URL or a list, `scale_json` as an object). Like fal's clients,
ours upload binary inputs found in a dict (bytes, pathlib.Path, PIL images) and pass their URLs
instead.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from loraserve.request.fal_json import parse_input
from loraserve.request.violations import InvalidInput
from loraserve.v1 import types_pb2

InputLike = types_pb2.GenerateInput | Mapping[str, Any]


def to_input(value: InputLike) -> types_pb2.GenerateInput:
    """ValueError naming every bad or unknown field (before anything is sent)."""
    if isinstance(value, types_pb2.GenerateInput):
        return value
    try:
        return parse_input(value)
    except InvalidInput as exc:
        raise ValueError(exc.message) from None


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
