"""Checks a GenerateInput, naming every bad field and why.

The gateway runs it before a request is queued and the worker again before it generates (a call
that did not come through the gateway, or a gateway of another version, meets the same rules).
What depends on the model (its family, its blocks, whether weights fit) only the worker can judge;
whether a URL may be fetched is the fetch's policy (storage/fetch.py), checked where it is fetched.
Options of the fal schema that this build cannot run yet are refused by name ("not supported yet"),
never accepted and ignored.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from urllib.parse import quote, unquote_to_bytes, urlsplit, urlunsplit

from google.protobuf.message import Message

from loraserve.request import schema
from loraserve.request.conditioning_validation import VARIANT_PATTERN, conditioning_violations
from loraserve.request.input_strings import input_strings
from loraserve.request.limits import RequestLimits
from loraserve.request.schedulers import SCHEDULER_SPECS, TRAILING_AS_CUSTOM_TIMESTEPS, names_accepting
from loraserve.request.sync_mode import sync_mode_violations
from loraserve.request.violations import FieldViolation, InvalidInput
from loraserve.v1 import types_pb2

MAX_NAME_CHARS = 4096
# Largest custom schedule: num_inference_steps' upper bound (sigmas carry one more, the final sigma).
MAX_SCHEDULE_STEPS = 150
NUM_TRAIN_TIMESTEPS = 1000
# The hosted endpoint takes one embedding; a few together still fit one prompt's token budget.
MAX_EMBEDDINGS = 8
MAX_TOKEN_CHARS = 64


def validate_input(inp: types_pb2.GenerateInput, limits: RequestLimits, prefix: str = "input") -> None:
    """Raises InvalidInput listing every violation; field paths start at `prefix`.

    An http(s) URL with non-ASCII characters in any field is rewritten in `inp` to its ASCII form
    (IDNA host, percent-encoded UTF-8), as the fetch sends it; one that has none is refused."""
    violations = [FieldViolation(f"{prefix}.{field}", why) for field, why in _violations(inp, limits)]
    violations += [FieldViolation(path, why) for path, why in file_string_violations(inp, limits, prefix)]
    if violations:
        raise InvalidInput(violations)


def ascii_url(url: str) -> str:
    """`url` as HTTP sends it: an internationalised host in its IDNA form (`xn--`), other non-ASCII
    characters percent-encoded as UTF-8; unchanged when it is ASCII. ValueError when it cannot be."""
    if url.isascii():
        return url
    parts = urlsplit(url)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    host, colon, port = hostport.rpartition(":") if not hostport.endswith("]") else (hostport, "", "")
    if not colon or not port.isdigit():
        host, colon, port = hostport, "", ""
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise ValueError(f"the host name {host!r} is not a valid internationalised domain name") from None
    netloc = _percent_encoded(userinfo) + at + host + colon + port
    return urlunsplit(
        (parts.scheme, netloc, *(_percent_encoded(part) for part in (parts.path, parts.query, parts.fragment)))
    )


def _percent_encoded(text: str) -> str:
    return "".join(char if char.isascii() else quote(char, safe="") for char in text)


def file_string_violations(inp: Message, limits: RequestLimits, prefix: str) -> Iterator[tuple[str, str]]:
    """Every field of a GenerateInput or FluxInput that can name a file: a data URI within
    `max_data_uri_bytes` (the worker would refuse it only after the gateway kept it queued), an http(s)
    URL in the ASCII form HTTP sends."""
    for found in input_strings(inp, prefix):
        if found.path.endswith((".prompt", ".negative_prompt")):
            continue
        scheme = found.value[:8].lower()
        if scheme.startswith("data:"):
            size = _data_uri_bytes(found.value)
            if size > limits.max_data_uri_bytes:
                yield found.path, (
                    f"is a data URI of about {size} bytes, over the limit of {limits.max_data_uri_bytes} bytes"
                    " (max_data_uri_bytes); upload the file and pass its URL"
                )
        elif scheme.startswith(("http://", "https://")) and not found.value.isascii():
            try:
                found.replace(ascii_url(found.value))
            except ValueError as exc:
                yield found.path, str(exc)


def _data_uri_bytes(uri: str) -> int:
    """The size of a data URI's data, without decoding base64 (a few bytes over at most)."""
    header, _, payload = uri[5:].partition(",")
    if header.lower().endswith(";base64"):
        text = unquote_to_bytes(payload) if "%" in payload else payload.encode("ascii", "replace")
        text = text.translate(None, b" \n\r\t")
        return len(text) * 3 // 4 - (len(text) - len(text.rstrip(b"=")))
    return len(unquote_to_bytes(payload))


def _violations(inp: types_pb2.GenerateInput, limits: RequestLimits) -> Iterator[tuple[str, str]]:
    yield from _text(inp, limits)
    yield from _endpoint(inp)
    yield from _size(inp)
    yield from _ranges(inp)
    yield from _enums(inp)
    yield from _schedules(inp)
    yield from _sampling(inp)
    yield from _tiles(inp)
    yield from _loras(inp, limits)
    yield from _base_model_parts(inp)
    yield from _embeddings(inp)
    yield from sync_mode_violations(inp, limits.max_sync_mode_pixels)
    # ControlNets, IP-Adapters and IC-Light.
    yield from conditioning_violations(inp)


def _text(inp: types_pb2.GenerateInput, limits: RequestLimits) -> Iterator[tuple[str, str]]:
    if not inp.model_name.strip():
        yield "model_name", "is required: a Hugging Face ID, URL or path of an SD 1.5 / SDXL model"
    elif len(inp.model_name) > MAX_NAME_CHARS:
        yield "model_name", f"is longer than {MAX_NAME_CHARS} characters"
    if not inp.prompt.strip():
        yield "prompt", "is required and must not be empty"
    for field in ("prompt", "negative_prompt"):
        if len(getattr(inp, field)) > limits.max_prompt_chars:
            yield field, f"is longer than {limits.max_prompt_chars} characters"


def _endpoint(inp: types_pb2.GenerateInput) -> Iterator[tuple[str, str]]:
    """fal's image-to-image and inpaint fields, each only where its endpoint reads it.

    The output of image-to-image and inpaint takes the start image's size, as on fal, so an
    `image_size` there would be accepted and ignored: it is refused instead. Whether the mask is
    the image's size is known only once both are fetched (serving/image_to_image.py).
    """
    name = schema.ENDPOINT_NAMES.get(inp.endpoint)
    if name is None:
        yield "endpoint", f"unknown endpoint {inp.endpoint}; one of {', '.join(schema.ENDPOINT_NAMES.values())}"
        return
    if not schema.starts_from_image(inp):
        for field in ("image_url", "mask_url"):
            if getattr(inp, field):
                yield field, f"only applies to the image-to-image and inpaint endpoints, not to {name}"
        if inp.HasField("noise_strength"):
            yield "noise_strength", f"only applies to the image-to-image and inpaint endpoints, not to {name}"
        return
    if not inp.image_url.strip():
        yield "image_url", f"is required for {name}: a URL, data URI or uploaded file of the start image"
    if inp.endpoint == types_pb2.ENDPOINT_INPAINT and not inp.mask_url.strip():
        yield "mask_url", "is required for inpaint: a black-and-white mask the size of image_url (white is repainted)"
    if inp.endpoint != types_pb2.ENDPOINT_INPAINT and inp.mask_url:
        yield "mask_url", f"only applies to the inpaint endpoint, not to {name}"
    if inp.HasField("image_size"):
        yield "image_size", (
            f"is not used by {name}: the output takes the size of image_url (rounded down to a multiple of 8)"
        )
    if inp.controlnets:
        # diffusers' ControlNet image-to-image and inpaint pipelines take no custom schedule.
        for field in ("timesteps", "sigmas"):
            if getattr(inp, field).method == "array":
                yield field, (
                    f"cannot be combined with controlnets on {name}: its ControlNet pipeline takes no custom schedule"
                )
        if inp.scheduler in TRAILING_AS_CUSTOM_TIMESTEPS:
            yield "scheduler", (
                f"{inp.scheduler!r} runs as a custom timestep schedule, which the ControlNet pipeline of {name} cannot "
                "take; use another scheduler or no controlnets"
            )
    strength = schema.noise_strength(inp)
    if not (math.isfinite(strength) and 0 <= strength <= 1):
        yield "noise_strength", f"must be a number between 0 and 1, got {strength}"
    elif (steps := _denoising_steps(inp)) is not None and int(steps * strength) < 1:
        yield "noise_strength", (
            f"runs int({steps} steps x {strength:g}) = 0 denoising steps; raise it to at least {1 / steps:.3g} "
            "or add steps"
        )


def _denoising_steps(inp: types_pb2.GenerateInput) -> int | None:
    """The schedule's length, of which image-to-image runs the last `noise_strength` share; None if invalid."""
    if inp.timesteps.method == "array":
        return len(inp.timesteps.array) or None
    if inp.sigmas.method == "array":
        return len(inp.sigmas.array) - 1 if len(inp.sigmas.array) > 1 else None
    steps = schema.num_inference_steps(inp)
    return steps if steps >= 1 else None


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


def _sampling(inp: types_pb2.GenerateInput) -> Iterator[tuple[str, str]]:
    """What the named scheduler would reject or silently ignore (the worker checks the model's own)."""
    if inp.timesteps.method == "array" and inp.timesteps.array:
        yield from _timestep_values(list(inp.timesteps.array))
    if inp.sigmas.method == "array" and inp.sigmas.array:
        yield from _sigma_values(list(inp.sigmas.array))
    spec = SCHEDULER_SPECS.get(inp.scheduler)
    if spec is None:
        return
    name = inp.scheduler
    if inp.timesteps.method == "array" and not spec.accepts_timesteps:
        yield "timesteps", (
            f"scheduler {name!r} cannot take a custom timestep schedule; "
            f"use one of {', '.join(names_accepting('accepts_timesteps'))}"
        )
    if inp.sigmas.method == "array" and not spec.accepts_sigmas:
        yield "sigmas", (
            f"scheduler {name!r} cannot take a custom sigma schedule; "
            f"use one of {', '.join(names_accepting('accepts_sigmas'))}"
        )
    if inp.eta != 0 and not spec.accepts_eta:
        yield "eta", (
            f"scheduler {name!r} does not use eta; use one of {', '.join(names_accepting('accepts_eta'))} "
            "or leave eta at 0"
        )
    if inp.rescale_betas_snr_zero and inp.prediction_type == "epsilon" and not spec.zero_snr_safe_for_epsilon:
        yield "rescale_betas_snr_zero", (
            f"with zero terminal SNR, scheduler {name!r} cannot denoise an epsilon-prediction model (its first "
            "step divides by zero); use prediction_type 'v_prediction' for v-prediction models or one of "
            f"{', '.join(names_accepting('zero_snr_safe_for_epsilon'))}"
        )


def _timestep_values(values: list[int]) -> Iterator[tuple[str, str]]:
    if len(values) > MAX_SCHEDULE_STEPS:
        yield "timesteps.array", f"at most {MAX_SCHEDULE_STEPS} timesteps, got {len(values)}"
    if any(not 0 <= value < NUM_TRAIN_TIMESTEPS for value in values):
        yield "timesteps.array", f"every timestep must be between 0 and {NUM_TRAIN_TIMESTEPS - 1}"
    if any(later >= earlier for earlier, later in itertools.pairwise(values)):
        yield "timesteps.array", "must be strictly decreasing (denoising runs from noisy to clean)"


def _sigma_values(values: list[float]) -> Iterator[tuple[str, str]]:
    if not 2 <= len(values) <= MAX_SCHEDULE_STEPS + 1:
        yield "sigmas.array", (
            f"needs 2 to {MAX_SCHEDULE_STEPS + 1} values: one per step plus the final sigma (usually 0), "
            f"got {len(values)}"
        )
    if any(not math.isfinite(value) or value < 0 for value in values):
        yield "sigmas.array", "every sigma must be a finite number >= 0"
    elif any(later > earlier for earlier, later in itertools.pairwise(values)):
        yield "sigmas.array", "must not increase (denoising runs from noisy to clean)"


def _tiles(inp: types_pb2.GenerateInput) -> Iterator[tuple[str, str]]:
    """An explicit stride wider than its tile would leave gaps between tiles."""
    for side in ("width", "height"):
        stride_field = f"tile_stride_{side}"
        tile = getattr(schema, f"tile_{side}")(inp)
        if inp.HasField(stride_field) and getattr(inp, stride_field) > tile:
            yield stride_field, f"must not exceed tile_{side} ({tile}), or tiles would leave gaps"


def _base_model_parts(inp: types_pb2.GenerateInput) -> Iterator[tuple[str, str]]:
    if inp.unet_name and not inp.unet_name.strip():
        yield "unet_name", "must not be blank: a Hugging Face ID, URL or path of a U-Net, or unset"
    elif len(inp.unet_name) > MAX_NAME_CHARS:
        yield "unet_name", f"is longer than {MAX_NAME_CHARS} characters"
    if inp.variant and not VARIANT_PATTERN.fullmatch(inp.variant.strip()):
        yield "variant", (
            f"must be a weights variant name such as 'fp16' (letters, digits, '_' or '-', at most 32), got {inp.variant!r}"
        )


def _embeddings(inp: types_pb2.GenerateInput) -> Iterator[tuple[str, str]]:
    """Tokens are added to the vocabulary for the request, so they must be single, distinct words."""
    if len(inp.embeddings) > MAX_EMBEDDINGS:
        yield "embeddings", f"at most {MAX_EMBEDDINGS} embeddings per request, got {len(inp.embeddings)}"
    owner: dict[str, int] = {}
    for index, embedding in enumerate(inp.embeddings):
        if not embedding.path.strip():
            yield f"embeddings[{index}].path", "is required: a URL or path of a textual-inversion .safetensors file"
        elif len(embedding.path) > MAX_NAME_CHARS:
            yield f"embeddings[{index}].path", f"is longer than {MAX_NAME_CHARS} characters"
        for token in schema.embedding_tokens(embedding):
            if not token or any(char.isspace() for char in token) or len(token) > MAX_TOKEN_CHARS:
                yield f"embeddings[{index}].tokens", (
                    f"each token must be 1 to {MAX_TOKEN_CHARS} characters without spaces, got {token!r}"
                )
            elif owner.get(token) == index:
                yield f"embeddings[{index}].tokens", f"token {token!r} is given twice"
            elif token in owner:
                yield f"embeddings[{index}].tokens", (
                    f"token {token!r} is already used by embeddings[{owner[token]}]; give each embedding its own tokens"
                )
            else:
                owner[token] = index


def _loras(inp: types_pb2.GenerateInput, limits: RequestLimits) -> Iterator[tuple[str, str]]:
    if len(inp.loras) > limits.max_loras_per_request:
        yield "loras", f"at most {limits.max_loras_per_request} LoRAs per request, got {len(inp.loras)}"
    for index, lora in enumerate(inp.loras):
        if not lora.path.strip():
            yield f"loras[{index}].path", "is required: a URL or path of LoRA weights"
        if lora.HasField("scale") and not math.isfinite(lora.scale):
            yield f"loras[{index}].scale", f"must be a finite number, got {lora.scale}"
