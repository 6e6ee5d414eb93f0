"""Builds a GenerateInput (or a FluxInput) from a fal-style dict, so requests written for fal-ai/lora (or
fal-ai/flux-lora) work as-is.

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

from loraserve.request import fal_json, flux
from loraserve.request.violations import InvalidInput
from loraserve.v1 import flux_pb2, types_pb2

# A request of either family: fal-ai/lora's GenerateInput or fal-ai/flux-lora's FluxInput.
Input = types_pb2.GenerateInput | flux_pb2.FluxInput
InputLike = Input | Mapping[str, Any]


def to_input(value: InputLike, app: str = fal_json.APP_ID) -> Input:
    """A dict is read as the body of `app` (fal's endpoint id: `fal-ai/lora`, whose body may name its
    `endpoint`, `fal-ai/lora/inpaint`, `fal-ai/flux-lora/image-to-image`...); ValueError naming every bad
    field (before anything is sent). Messages pass as they are."""
    if isinstance(value, (types_pb2.GenerateInput, flux_pb2.FluxInput)):
        return value
    family = flux.APP_ID if app == flux.APP_ID or app.startswith(flux.APP_ID + "/") else fal_json.APP_ID
    sub_path = app.removeprefix(family)
    endpoint = (flux.endpoint_for if family == flux.APP_ID else fal_json.endpoint_for)(sub_path)
    if not app.startswith(family) or endpoint is None:
        raise ValueError(f"unknown app {app!r}: fal-ai/lora or fal-ai/flux-lora, with a sub-path of their family")
    try:
        if family == flux.APP_ID:
            return flux.parse_flux_input(value, endpoint)
        return fal_json.parse_input(value, endpoint if sub_path.strip("/") else None)
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
