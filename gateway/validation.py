"""Checks a GenerateInput before it is queued, naming every bad field and why.

Workers trust what passes here. Options of the fal schema that this build cannot run
yet are refused by name ("not supported yet"), never accepted and ignored.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

from gateway.errors import FieldViolation, InvalidArgument
from loraserve import schema
from loraserve.config import Settings
from loraserve.v1 import types_pb2

MAX_NAME_CHARS = 4096
NOT_SUPPORTED = "not supported yet by this loraserve build; leave it unset"

# (field, is it set to something other than its default?) for options not implemented yet.
_UNSUPPORTED: list[tuple[str, Callable[[types_pb2.GenerateInput], bool]]] = [
    ("unet_name", lambda i: bool(i.unet_name)),
    ("variant", lambda i: bool(i.variant)),
    ("prompt_weighting", lambda i: i.prompt_weighting),
    ("embeddings", lambda i: len(i.embeddings) > 0),
    ("controlnets", lambda i: len(i.controlnets) > 0),
    ("controlnet_guess_mode", lambda i: i.controlnet_guess_mode),
    ("ip_adapter", lambda i: len(i.ip_adapter) > 0),
    ("image_encoder_path", lambda i: bool(i.image_encoder_path)),
    ("image_encoder_subfolder", lambda i: bool(i.image_encoder_subfolder)),
    (
        "image_encoder_weight_name",
        lambda i: i.HasField("image_encoder_weight_name")
        and i.image_encoder_weight_name != schema.DEFAULT_IMAGE_ENCODER_WEIGHT_NAME,
    ),
    ("ic_light_model_url", lambda i: bool(i.ic_light_model_url)),
    ("ic_light_model_background_image_url", lambda i: bool(i.ic_light_model_background_image_url)),
    ("ic_light_image_url", lambda i: bool(i.ic_light_image_url)),
    ("clip_skip", lambda i: i.clip_skip != 0),
    ("scheduler", lambda i: bool(i.scheduler)),
    ("timesteps", lambda i: i.timesteps.method == "array"),
    ("sigmas", lambda i: i.sigmas.method == "array"),
    ("prediction_type", lambda i: i.prediction_type not in ("", "epsilon")),
    ("rescale_betas_snr_zero", lambda i: i.rescale_betas_snr_zero),
    ("enable_safety_checker", lambda i: i.enable_safety_checker),
    ("tile_width", lambda i: i.HasField("tile_width") and i.tile_width != schema.DEFAULT_TILE_SIZE),
    ("tile_height", lambda i: i.HasField("tile_height") and i.tile_height != schema.DEFAULT_TILE_SIZE),
    (
        "tile_stride_width",
        lambda i: i.HasField("tile_stride_width") and i.tile_stride_width != schema.DEFAULT_TILE_STRIDE,
    ),
    (
        "tile_stride_height",
        lambda i: i.HasField("tile_stride_height") and i.tile_stride_height != schema.DEFAULT_TILE_STRIDE,
    ),
    ("eta", lambda i: i.eta != 0),
    ("debug_latents", lambda i: i.debug_latents),
    ("debug_per_pass_latents", lambda i: i.debug_per_pass_latents),
]


def validate_input(inp: types_pb2.GenerateInput, settings: Settings, prefix: str = "input") -> None:
    """Raises InvalidArgument listing every violation; field paths start at `prefix`."""
    violations = [FieldViolation(f"{prefix}.{field}", why) for field, why in _violations(inp, settings)]
    if violations:
        raise InvalidArgument(violations)


def _violations(inp: types_pb2.GenerateInput, settings: Settings) -> Iterator[tuple[str, str]]:
    yield from _text(inp, settings)
    yield from _size(inp)
    yield from _ranges(inp)
    yield from _enums(inp)
    yield from _schedules(inp)
    yield from _loras(inp, settings)
    for field, is_set in _UNSUPPORTED:
        if is_set(inp):
            yield field, NOT_SUPPORTED


def _text(inp: types_pb2.GenerateInput, settings: Settings) -> Iterator[tuple[str, str]]:
    if not inp.model_name.strip():
        yield "model_name", "is required: a Hugging Face ID, URL or path of an SD 1.5 / SDXL model"
    elif len(inp.model_name) > MAX_NAME_CHARS:
        yield "model_name", f"is longer than {MAX_NAME_CHARS} characters"
    if not inp.prompt.strip():
        yield "prompt", "is required and must not be empty"
    for field in ("prompt", "negative_prompt"):
        if len(getattr(inp, field)) > settings.max_prompt_chars:
            yield field, f"is longer than {settings.max_prompt_chars} characters"


def _size(inp: types_pb2.GenerateInput) -> Iterator[tuple[str, str]]:
    which = inp.image_size.WhichOneof("size")
    if which == "preset" and inp.image_size.preset not in schema.IMAGE_SIZE_PRESETS:
        yield "image_size.preset", (
            f"unknown preset {inp.image_size.preset!r}; one of {', '.join(schema.IMAGE_SIZE_PRESETS)}"
        )
    if which == "custom":
        for side in ("width", "height"):
            value = getattr(inp.image_size.custom, side)
            if value <= 0 or value > schema.MAX_IMAGE_SIDE:
                yield f"image_size.{side}", f"must be between 8 and {schema.MAX_IMAGE_SIDE}, got {value}"
            elif value % 8:
                yield f"image_size.{side}", f"must be a multiple of 8, got {value}"


def _ranges(inp: types_pb2.GenerateInput) -> Iterator[tuple[str, str]]:
    int_ranges = [
        ("num_inference_steps", 1, 150),
        ("num_images", 1, 8),
        ("clip_skip", 0, 2),
        ("tile_width", 128, 4096),
        ("tile_height", 128, 4096),
        ("tile_stride_width", 64, 2048),
        ("tile_stride_height", 64, 2048),
    ]
    for field, low, high in int_ranges:
        value = getattr(inp, field)
        if inp.DESCRIPTOR.fields_by_name[field].has_presence and not inp.HasField(field):
            continue
        if not low <= value <= high:
            yield field, f"must be between {low} and {high}, got {value}"
    for field, low_f, high_f in [("guidance_scale", 0.0, 20.0), ("eta", 0.0, 1.0)]:
        value_f = getattr(inp, field)
        if not math.isfinite(value_f) or not low_f <= value_f <= high_f:
            yield field, f"must be a number between {low_f:g} and {high_f:g}, got {value_f}"


def _enums(inp: types_pb2.GenerateInput) -> Iterator[tuple[str, str]]:
    if inp.scheduler and inp.scheduler not in schema.SCHEDULERS:
        yield "scheduler", f"unknown scheduler {inp.scheduler!r}; one of {', '.join(schema.SCHEDULERS)}"
    if inp.image_format and inp.image_format not in schema.IMAGE_FORMATS:
        yield "image_format", f"must be one of {', '.join(schema.IMAGE_FORMATS)}, got {inp.image_format!r}"
    if inp.prediction_type and inp.prediction_type not in schema.PREDICTION_TYPES:
        yield "prediction_type", (
            f"must be one of {', '.join(schema.PREDICTION_TYPES)}, got {inp.prediction_type!r}"
        )


def _schedules(inp: types_pb2.GenerateInput) -> Iterator[tuple[str, str]]:
    for field in ("timesteps", "sigmas"):
        sched = getattr(inp, field)
        if sched.method and sched.method not in schema.SCHEDULE_METHODS:
            yield f"{field}.method", f"must be 'default' or 'array', got {sched.method!r}"
        if sched.method == "array" and not sched.array:
            yield f"{field}.array", "must not be empty when method is 'array'"
        if sched.method != "array" and sched.array:
            yield f"{field}.method", "must be 'array' when an array is given"
    if inp.timesteps.method == "array" and inp.sigmas.method == "array":
        yield "sigmas", "cannot be set together with `timesteps`; give one custom schedule"
        yield "timesteps", "cannot be set together with `sigmas`; give one custom schedule"


def _loras(inp: types_pb2.GenerateInput, settings: Settings) -> Iterator[tuple[str, str]]:
    if len(inp.loras) > settings.max_loras_per_request:
        yield "loras", f"at most {settings.max_loras_per_request} LoRAs per request, got {len(inp.loras)}"
    for index, lora in enumerate(inp.loras):
        if not lora.path.strip():
            yield f"loras[{index}].path", "is required: a URL or path of LoRA weights"
        if lora.HasField("scale") and not math.isfinite(lora.scale):
            yield f"loras[{index}].scale", f"must be a finite number, got {lora.scale}"
