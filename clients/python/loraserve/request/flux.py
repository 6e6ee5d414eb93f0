"""The fal-ai/flux-lora family (text-to-image, /image-to-image, /inpainting): what a FluxInput may be.

fal's defaults and ranges for the family (../shared/spec/fal-flux-lora.md §1), fal's JSON read into
a FluxInput and a FluxOutput written as fal's JSON, and every rule a request must keep. The gateway
checks a request before it is queued and the worker again before it generates, as for fal-ai/lora.

Two differences from fal-ai/lora's JSON, both fal's: a body's unknown keys are ignored, not refused
(fal's FLUX apps are pydantic models with the default `extra="ignore"`, so a `negative_prompt` written
for another endpoint passes), and only the keys of the endpoint the body was sent to are read (an
`image_url` sent to text-to-image is one of those unknown keys).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

from loraserve.request import schema
from loraserve.request.fal_json import coerce_scalar
from loraserve.request.limits import RequestLimits
from loraserve.request.validation import file_string_violations
from loraserve.request.violations import FieldViolation, InvalidInput
from loraserve.v1 import flux_pb2, types_pb2

APP_ID = "fal-ai/flux-lora"
# The path after the app id → FluxInput.endpoint.
ENDPOINTS: dict[str, int] = {
    "": flux_pb2.FLUX_ENDPOINT_UNSPECIFIED,
    "image-to-image": flux_pb2.FLUX_ENDPOINT_IMAGE_TO_IMAGE,
    "inpainting": flux_pb2.FLUX_ENDPOINT_INPAINTING,
}
ENDPOINT_NAMES = {number: name or "text-to-image" for name, number in ENDPOINTS.items()}

DEFAULT_IMAGE_SIZE = "landscape_4_3"
# FLUX's VAE downsamples 8× and its latents are packed 2×2: sides are floored to a multiple of this.
SIZE_MULTIPLE = 16
DEFAULT_STEPS = 28
MAX_STEPS = 50
DEFAULT_GUIDANCE_SCALE = 3.5
MAX_GUIDANCE_SCALE = 35.0
DEFAULT_NUM_IMAGES = 1
MAX_NUM_IMAGES = 4
DEFAULT_STRENGTH = 0.85
MIN_STRENGTH = 0.01
MAX_LORA_SCALE = 4.0
DEFAULT_OUTPUT_FORMAT = "jpeg"
ACCELERATIONS = ("none", "regular")
MAX_SEED = 2**63 - 1

# The keys each endpoint reads from a body; any other key is ignored.
_COMMON_KEYS = (
    "prompt", "image_size", "num_inference_steps", "seed", "loras", "guidance_scale", "sync_mode", "num_images",
    "enable_safety_checker", "output_format", "acceleration",
)
KEYS: dict[int, tuple[str, ...]] = {
    flux_pb2.FLUX_ENDPOINT_UNSPECIFIED: _COMMON_KEYS,
    flux_pb2.FLUX_ENDPOINT_IMAGE_TO_IMAGE: (*_COMMON_KEYS, "image_url", "strength"),
    flux_pb2.FLUX_ENDPOINT_INPAINTING: (*_COMMON_KEYS, "image_url", "strength", "mask_url"),
}


# What fal_json's scalar reader converts each value by (the same lax rules as fal-ai/lora's JSON).
_FIELDS = flux_pb2.FluxInput.DESCRIPTOR.fields_by_name
_SIZE_FIELDS = types_pb2.ImageSize.DESCRIPTOR.fields_by_name
_SIDE_FIELDS = types_pb2.Dimensions.DESCRIPTOR.fields_by_name
_LORA_FIELDS = types_pb2.LoraWeight.DESCRIPTOR.fields_by_name


def endpoint_for(sub_path: str) -> int | None:
    """The FluxInput.endpoint of a path below fal-ai/flux-lora; None for a path that is not one of the family."""
    return ENDPOINTS.get(sub_path.strip("/"))


# --- defaults ------------------------------------------------------------------------------------


def starts_from_image(inp: flux_pb2.FluxInput) -> bool:
    return inp.endpoint != flux_pb2.FLUX_ENDPOINT_UNSPECIFIED


def floor_to_multiple(side: int) -> int:
    return max(SIZE_MULTIPLE, side // SIZE_MULTIPLE * SIZE_MULTIPLE)


def image_size(inp: flux_pb2.FluxInput) -> tuple[int, int] | None:
    """(width, height) of the output, floored to multiples of 16; None for image-to-image and inpainting
    without `image_size` (the start image's size then). An unknown preset raises KeyError."""
    which = inp.image_size.WhichOneof("size")
    if which == "custom":
        width, height = inp.image_size.custom.width, inp.image_size.custom.height
    elif which == "preset":
        width, height = schema.IMAGE_SIZE_PRESETS[inp.image_size.preset]
    elif starts_from_image(inp):
        return None
    else:
        width, height = schema.IMAGE_SIZE_PRESETS[DEFAULT_IMAGE_SIZE]
    return floor_to_multiple(width), floor_to_multiple(height)


def num_inference_steps(inp: flux_pb2.FluxInput) -> int:
    return inp.num_inference_steps if inp.HasField("num_inference_steps") else DEFAULT_STEPS


def guidance_scale(inp: flux_pb2.FluxInput) -> float:
    return inp.guidance_scale if inp.HasField("guidance_scale") else DEFAULT_GUIDANCE_SCALE


def num_images(inp: flux_pb2.FluxInput) -> int:
    return inp.num_images if inp.HasField("num_images") else DEFAULT_NUM_IMAGES


def strength(inp: flux_pb2.FluxInput) -> float:
    return inp.strength if inp.HasField("strength") else DEFAULT_STRENGTH


def safety_checker(inp: flux_pb2.FluxInput) -> bool:
    return inp.enable_safety_checker if inp.HasField("enable_safety_checker") else True


def output_format(inp: flux_pb2.FluxInput) -> str:
    return inp.output_format or DEFAULT_OUTPUT_FORMAT


def acceleration(inp: flux_pb2.FluxInput) -> str:
    return inp.acceleration or "none"


# --- validation ----------------------------------------------------------------------------------


def validate_flux_input(inp: flux_pb2.FluxInput, limits: RequestLimits, prefix: str = "flux_input") -> None:
    """Raises InvalidInput listing every violation; field paths start at `prefix`. An http(s) URL with
    non-ASCII characters is rewritten in `inp` to its ASCII form, as the fetch sends it."""
    violations = [FieldViolation(f"{prefix}.{field}", why) for field, why in _violations(inp, limits)]
    # Data URIs within max_data_uri_bytes and URLs in their ASCII form, walked as for GenerateInput.
    files = file_string_violations(inp, limits, prefix)
    violations += [FieldViolation(path, why) for path, why in files]
    if violations:
        raise InvalidInput(violations)


def _violations(inp: flux_pb2.FluxInput, limits: RequestLimits) -> Iterator[tuple[str, str]]:
    if not inp.prompt.strip():
        yield "prompt", "is required and must not be empty"
    elif len(inp.prompt) > limits.max_prompt_chars:
        yield "prompt", f"is longer than {limits.max_prompt_chars} characters"
    if inp.endpoint not in ENDPOINT_NAMES:
        yield "endpoint", f"unknown endpoint {inp.endpoint}"
    yield from _size(inp)
    yield from _ranges(inp)
    yield from _start_image(inp)
    if inp.output_format not in ("", *schema.IMAGE_FORMATS):
        yield "output_format", f"must be one of {', '.join(schema.IMAGE_FORMATS)}, got {inp.output_format!r}"
    if inp.acceleration not in ("", *ACCELERATIONS):
        yield "acceleration", f"must be one of {', '.join(ACCELERATIONS)}, got {inp.acceleration!r}"
    if len(inp.loras) > limits.max_loras_per_request:
        yield "loras", f"at most {limits.max_loras_per_request} LoRAs per request, got {len(inp.loras)}"
    for index, lora in enumerate(inp.loras):
        if not lora.path.strip():
            yield f"loras[{index}].path", "is required: a URL, Hugging Face ID or path of a FLUX LoRA"
        if lora.HasField("scale") and not (math.isfinite(lora.scale) and 0 <= lora.scale <= MAX_LORA_SCALE):
            yield f"loras[{index}].scale", f"must be between 0 and {MAX_LORA_SCALE:g}, got {lora.scale}"
    if inp.sync_mode:
        yield from _inline_pixels(inp, limits)


def _size(inp: flux_pb2.FluxInput) -> Iterator[tuple[str, str]]:
    which = inp.image_size.WhichOneof("size")
    if which == "preset" and inp.image_size.preset not in schema.IMAGE_SIZE_PRESETS:
        presets = ", ".join(schema.IMAGE_SIZE_PRESETS)
        yield "image_size.preset", f"unknown preset {inp.image_size.preset!r}; one of {presets}"
    elif which == "custom":
        for side in ("width", "height"):
            value = getattr(inp.image_size.custom, side)
            if not SIZE_MULTIPLE <= value <= schema.MAX_IMAGE_SIDE:
                yield f"image_size.{side}", f"must be between {SIZE_MULTIPLE} and {schema.MAX_IMAGE_SIDE}, got {value}"


def _ranges(inp: flux_pb2.FluxInput) -> Iterator[tuple[str, str]]:
    if inp.HasField("num_inference_steps") and not 1 <= inp.num_inference_steps <= MAX_STEPS:
        yield "num_inference_steps", f"must be between 1 and {MAX_STEPS}, got {inp.num_inference_steps}"
    if inp.HasField("guidance_scale") and not (
        math.isfinite(inp.guidance_scale) and 0 <= inp.guidance_scale <= MAX_GUIDANCE_SCALE
    ):
        yield "guidance_scale", f"must be between 0 and {MAX_GUIDANCE_SCALE:g}, got {inp.guidance_scale}"
    if inp.HasField("num_images") and not 1 <= inp.num_images <= MAX_NUM_IMAGES:
        yield "num_images", f"must be between 1 and {MAX_NUM_IMAGES}, got {inp.num_images}"
    if inp.HasField("seed") and inp.seed < 0:
        yield "seed", f"must be between 0 and {MAX_SEED}, got {inp.seed}"
    if inp.HasField("strength") and not (math.isfinite(inp.strength) and MIN_STRENGTH <= inp.strength <= 1):
        yield "strength", f"must be between {MIN_STRENGTH} and 1, got {inp.strength}"


def _start_image(inp: flux_pb2.FluxInput) -> Iterator[tuple[str, str]]:
    name = ENDPOINT_NAMES.get(inp.endpoint, "")
    takes_mask = inp.endpoint == flux_pb2.FLUX_ENDPOINT_INPAINTING
    if starts_from_image(inp):
        if not inp.image_url.strip():
            yield "image_url", f"is required for {APP_ID}/{name}: the start image (a URL or a data URI)"
    else:
        for field in ("image_url", "strength"):
            if inp.HasField(field) if field == "strength" else getattr(inp, field):
                yield field, f"is only for {APP_ID}/image-to-image and /inpainting, not text-to-image"
    if takes_mask and not inp.mask_url.strip():
        yield "mask_url", f"is required for {APP_ID}/inpainting: white is repainted, black kept"
    elif not takes_mask and inp.mask_url:
        yield "mask_url", f"is only for {APP_ID}/inpainting"


def _inline_pixels(inp: flux_pb2.FluxInput, limits: RequestLimits) -> Iterator[tuple[str, str]]:
    """sync_mode returns images inline: a size known now over the budget is refused here (the start image's
    size, known only to the worker, is checked there)."""
    try:
        size = image_size(inp)
    except KeyError:
        return
    if size is None:
        return
    pixels = size[0] * size[1] * num_images(inp)
    if pixels > limits.max_sync_mode_pixels:
        yield "sync_mode", (
            f"the {num_images(inp)} image(s) of {size[0]}x{size[1]} would be {pixels} pixels inline, over this "
            f"server's {limits.max_sync_mode_pixels}; leave sync_mode off to get URLs instead"
        )


# --- fal's JSON ----------------------------------------------------------------------------------


def parse_flux_input(data: Any, endpoint: int = flux_pb2.FLUX_ENDPOINT_UNSPECIFIED) -> flux_pb2.FluxInput:
    """A fal-ai/flux-lora family body (for the endpoint its path names) as a FluxInput; InvalidInput naming
    every field of a wrong type. Keys the endpoint does not take are ignored, as fal ignores them."""
    if not isinstance(data, Mapping):
        raise InvalidInput([FieldViolation("input", "the body must be a JSON object", "type_error.dict")])
    inp = flux_pb2.FluxInput(endpoint=endpoint)  # type: ignore[arg-type]
    violations: list[FieldViolation] = []
    for key in KEYS[endpoint]:
        value = data.get(key)
        # fal's clients send null for an optional field they leave out.
        if value is not None:
            _read(inp, key, value, f"input.{key}", violations)
    if violations:
        raise InvalidInput(violations)
    return inp


def _read(inp: flux_pb2.FluxInput, key: str, value: Any, name: str, violations: list[FieldViolation]) -> None:
    if key == "image_size":
        _image_size(inp, value, name, violations)
    elif key == "loras":
        _loras(inp, value, name, violations)
    else:
        ok, converted = coerce_scalar(_FIELDS[key], value, name, violations)
        if ok:
            setattr(inp, key, converted)


def _image_size(inp: flux_pb2.FluxInput, value: Any, name: str, violations: list[FieldViolation]) -> None:
    if isinstance(value, str):
        ok, preset = coerce_scalar(_SIZE_FIELDS["preset"], value, name, violations)
        if ok:
            inp.image_size.preset = preset
        return
    if isinstance(value, Mapping):
        sides = {}
        for side in ("width", "height"):
            # fal's ImageSize: each side defaults to 512.
            ok, number = coerce_scalar(_SIDE_FIELDS[side], value.get(side, 512), f"{name}.{side}", violations)
            sides[side] = number if ok else None
        if sides["width"] is not None and sides["height"] is not None:
            inp.image_size.custom.width = sides["width"]
            inp.image_size.custom.height = sides["height"]
        return
    violations.append(
        FieldViolation(name, "must be a preset name (e.g. landscape_4_3) or an object {width, height}", "type_error")
    )


def _loras(inp: flux_pb2.FluxInput, value: Any, name: str, violations: list[FieldViolation]) -> None:
    if not isinstance(value, list):
        violations.append(FieldViolation(name, "value is not a valid list", "type_error.list"))
        return
    for index, item in enumerate(value):
        item_name = f"{name}[{index}]"
        if not isinstance(item, Mapping):
            violations.append(FieldViolation(item_name, "value is not a valid dict", "type_error.dict"))
            continue
        lora = inp.loras.add()
        if item.get("path") is None:
            violations.append(FieldViolation(f"{item_name}.path", "field required", "value_error.missing"))
        else:
            ok, path = coerce_scalar(_LORA_FIELDS["path"], item["path"], f"{item_name}.path", violations)
            if ok:
                lora.path = path
        # `force` (of the SD 1.5 family's LoRA type in fal's merged schema) is accepted and ignored.
        if item.get("scale") is not None:
            ok, scale = coerce_scalar(_LORA_FIELDS["scale"], item["scale"], f"{item_name}.scale", violations)
            if ok:
                lora.scale = scale


def input_schema(endpoint: int) -> dict[str, Any]:
    """The JSON Schema (2020-12) of a body for `endpoint` in its canonical form: the keys `parse_flux_input`
    reads with fal's ranges, others allowed (and ignored); null for a field left out, as fal's clients send."""
    integer, number, string, boolean = {"type": "integer"}, {"type": "number"}, {"type": "string"}, {"type": "boolean"}
    side = {"type": "integer", "minimum": SIZE_MULTIPLE, "maximum": schema.MAX_IMAGE_SIDE}
    custom = {"type": "object", "properties": {"width": side, "height": side}}
    lora = {"type": "object", "required": ["path"], "properties": {"path": string, "scale": number, "force": boolean}}
    fields: dict[str, dict[str, Any]] = {
        "prompt": string,
        "image_size": {"anyOf": [{"enum": list(schema.IMAGE_SIZE_PRESETS)}, custom]},
        "num_inference_steps": {**integer, "minimum": 1, "maximum": MAX_STEPS},
        "seed": {**integer, "minimum": 0, "maximum": MAX_SEED},
        "loras": {"type": "array", "items": lora},
        "guidance_scale": {**number, "minimum": 0, "maximum": MAX_GUIDANCE_SCALE},
        "sync_mode": boolean,
        "num_images": {**integer, "minimum": 1, "maximum": MAX_NUM_IMAGES},
        "enable_safety_checker": boolean,
        "output_format": {"enum": list(schema.IMAGE_FORMATS)},
        "acceleration": {"enum": list(ACCELERATIONS)},
        "image_url": string,
        "strength": {**number, "minimum": MIN_STRENGTH, "maximum": 1},
        "mask_url": string,
    }
    keys = KEYS[endpoint]
    required = [key for key in ("prompt", "image_url", "mask_url") if key in keys]
    properties = {key: {"anyOf": [fields[key], {"type": "null"}]} for key in keys}
    return {"type": "object", "required": required, "properties": properties}


def output_json(output: flux_pb2.FluxOutput) -> dict[str, Any]:
    """A FluxOutput as the hosted endpoints return it: images as {url, width, height, content_type}, and
    `timings`, `seed`, `has_nsfw_concepts`, `prompt` always."""
    return {
        "images": [
            {"url": image.url, "width": image.width, "height": image.height, "content_type": image.content_type}
            for image in output.images
        ],
        "timings": dict(output.timings),
        "seed": output.seed,
        "has_nsfw_concepts": list(output.has_nsfw_concepts),
        "prompt": output.prompt,
    }


def output_of(
    inp: flux_pb2.FluxInput, output: types_pb2.GenerateOutput, inference_seconds: float | None
) -> flux_pb2.FluxOutput:
    """The FluxOutput of a finished request: the worker's images and flags, with the request's prompt and timings."""
    result = flux_pb2.FluxOutput(seed=output.seed, prompt=inp.prompt)
    result.images.extend(output.images)
    result.has_nsfw_concepts.extend(output.has_nsfw_concepts)
    if inference_seconds is not None:
        result.timings["inference"] = inference_seconds
    return result
