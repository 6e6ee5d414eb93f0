"""Checks for ControlNets, IP-Adapters and IC-Light (serving/conditioning.py runs them), part of validation.

What can be judged from the request alone is refused here, by field: required paths and images,
numbers that must be finite or in range, the two spellings of a ControlNet image that disagree,
and options that only mean something together with another one (a threshold without a mask, an
image encoder without an IP-Adapter), so nothing is accepted and then ignored. What depends on
the model (its family, its blocks, whether weights fit) is checked by the worker.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator

from loraserve.request import schema
from loraserve.v1 import types_pb2

MAX_CONTROLNETS = 8
MAX_IP_ADAPTERS = 4
MAX_IP_ADAPTER_IMAGES = 8
MAX_SCALE_JSON_CHARS = 4096
MAX_NOISING_FACTOR = 10.0
# A variant (the model's or a ControlNet's) becomes part of weight file names (`model.fp16.safetensors`),
# so no paths or dots.
VARIANT_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,31}")
INSTANT_ID = (
    "not supported yet: InstantID-style ControlNet / IP-Adapter pairs need face embeddings from insightface, "
    "which this build cannot run; leave ip_adapter_index unset"
)
FACE_ID = (
    "not supported: FaceID IP-Adapters need an insightface face model, and insightface cannot run in this build; "
    "use a non-FaceID IP-Adapter and leave insight_face_model_path unset"
)


def conditioning_violations(inp: types_pb2.GenerateInput) -> Iterator[tuple[str, str]]:
    yield from _controlnets(inp)
    yield from _ip_adapters(inp)
    yield from _ic_light(inp)


def _controlnets(inp: types_pb2.GenerateInput) -> Iterator[tuple[str, str]]:
    if len(inp.controlnets) > MAX_CONTROLNETS:
        yield "controlnets", f"at most {MAX_CONTROLNETS} ControlNets per request, got {len(inp.controlnets)}"
    if inp.controlnet_guess_mode and not inp.controlnets:
        yield "controlnet_guess_mode", "only applies together with controlnets; leave it false or add a ControlNet"
    for index, cn in enumerate(inp.controlnets):
        prefix = f"controlnets[{index}]"
        yield from _ref(f"{prefix}.path", cn.path, "a URL, path or Hugging Face ID of ControlNet weights")
        if cn.image_url and cn.control_image_url and cn.image_url != cn.control_image_url:
            yield f"{prefix}.control_image_url", "differs from image_url; they are two spellings of one field, give one"
        elif not (cn.image_url or cn.control_image_url).strip():
            yield f"{prefix}.image_url", "is required: the control image (image_url or control_image_url)"
        if cn.mask_url and cn.mask_image_url and cn.mask_url != cn.mask_image_url:
            yield f"{prefix}.mask_image_url", "differs from mask_url; they are two spellings of one field, give one"
        if cn.variant and not VARIANT_PATTERN.fullmatch(cn.variant):
            yield (
                f"{prefix}.variant",
                (f"must be a weights variant name such as 'fp16' (letters, digits, '_' or '-'), got {cn.variant!r}"),
            )
        if cn.HasField("conditioning_scale") and not math.isfinite(cn.conditioning_scale):
            yield f"{prefix}.conditioning_scale", f"must be a finite number, got {cn.conditioning_scale}"
        start, end = cn.start_percentage, schema.controlnet_end(cn)
        if not (math.isfinite(start) and 0 <= start <= 1):
            yield f"{prefix}.start_percentage", f"must be between 0 and 1, got {start}"
        elif not (math.isfinite(end) and 0 <= end <= 1):
            yield f"{prefix}.end_percentage", f"must be between 0 and 1, got {end}"
        elif start >= end:
            yield f"{prefix}.start_percentage", f"must be below end_percentage ({end:g}), got {start:g}"
        threshold = schema.controlnet_mask_threshold(cn)
        if not (math.isfinite(threshold) and 0 <= threshold <= 1):
            yield f"{prefix}.mask_threshold", f"must be between 0 and 1, got {threshold}"
        elif threshold != schema.DEFAULT_CONTROLNET_MASK_THRESHOLD and not schema.controlnet_mask_url(cn):
            yield f"{prefix}.mask_threshold", "only applies together with mask_url (mask_image_url); leave it unset"
        if cn.HasField("ip_adapter_index"):
            yield f"{prefix}.ip_adapter_index", INSTANT_ID


def _ip_adapters(inp: types_pb2.GenerateInput) -> Iterator[tuple[str, str]]:
    if len(inp.ip_adapter) > MAX_IP_ADAPTERS:
        yield "ip_adapter", f"at most {MAX_IP_ADAPTERS} IP-Adapters per request, got {len(inp.ip_adapter)}"
    if not inp.ip_adapter:
        for name in ("image_encoder_path", "image_encoder_subfolder"):
            if getattr(inp, name):
                yield name, "only applies together with ip_adapter; leave it unset or add an IP-Adapter"
        if (
            inp.HasField("image_encoder_weight_name")
            and inp.image_encoder_weight_name != schema.DEFAULT_IMAGE_ENCODER_WEIGHT_NAME
        ):
            yield "image_encoder_weight_name", "only applies together with ip_adapter; leave it unset"
    if inp.HasField("image_encoder_weight_name") and not _file_name(inp.image_encoder_weight_name):
        yield "image_encoder_weight_name", "must be a file name inside the image encoder folder (no '/')"
    for index, ipa in enumerate(inp.ip_adapter):
        prefix = f"ip_adapter[{index}]"
        yield from _ref(f"{prefix}.path", ipa.path, "a URL, path or Hugging Face ID of IP-Adapter weights")
        images = list(ipa.ip_adapter_image_url)
        if not images:
            yield f"{prefix}.ip_adapter_image_url", "is required: at least one image URL"
        elif len(images) > MAX_IP_ADAPTER_IMAGES:
            yield f"{prefix}.ip_adapter_image_url", f"at most {MAX_IP_ADAPTER_IMAGES} images, got {len(images)}"
        for j, url in enumerate(images):
            if not url.strip():
                yield f"{prefix}.ip_adapter_image_url[{j}]", "must not be empty"
        if ipa.weight_name and not _file_name(ipa.weight_name):
            yield f"{prefix}.weight_name", "must be a file name (the folder goes in model_subfolder)"
        if ipa.HasField("scale") and not math.isfinite(ipa.scale):
            yield f"{prefix}.scale", f"must be a finite number, got {ipa.scale}"
        if ipa.scale_json:
            yield from _scale_json(f"{prefix}.scale_json", ipa.scale_json)
        factor = ipa.unconditional_noising_factor
        if not (math.isfinite(factor) and 0 <= factor <= MAX_NOISING_FACTOR):
            yield (
                f"{prefix}.unconditional_noising_factor",
                f"must be between 0 and {MAX_NOISING_FACTOR:g}, got {factor}",
            )
        if ipa.insight_face_model_path:
            yield f"{prefix}.insight_face_model_path", FACE_ID
        if ipa.HasField("image_projection_shortcut") and not ipa.image_projection_shortcut:
            yield (
                f"{prefix}.image_projection_shortcut",
                ("only FaceID Plus v1 models use false here, and FaceID is not supported; leave it at true"),
            )


def _ic_light(inp: types_pb2.GenerateInput) -> Iterator[tuple[str, str]]:
    if inp.ic_light_model_url:
        yield from _ref("ic_light_model_url", inp.ic_light_model_url, "a URL or path of IC-Light weights")
        if not inp.ic_light_image_url.strip():
            yield "ic_light_image_url", "is required with ic_light_model_url: the foreground image to relight"
    else:
        for name in ("ic_light_image_url", "ic_light_model_background_image_url"):
            if getattr(inp, name):
                yield name, "only applies together with ic_light_model_url; leave it unset"


def _ref(field_name: str, value: str, what: str) -> Iterator[tuple[str, str]]:
    """No length cap: data URIs carry whole files (the fetcher caps their size)."""
    if not value.strip():
        yield field_name, f"is required: {what}"


def _scale_json(field_name: str, text: str) -> Iterator[tuple[str, str]]:
    if len(text) > MAX_SCALE_JSON_CHARS:
        yield field_name, f"is longer than {MAX_SCALE_JSON_CHARS} characters"
        return
    try:
        value = json.loads(text)
    except ValueError as exc:
        yield field_name, f"is not valid JSON ({exc})"
        return
    problem = schema.scale_json_problem(value)
    if problem:
        yield field_name, problem


def _file_name(name: str) -> bool:
    return bool(name) and "/" not in name and "\\" not in name and name not in (".", "..")
