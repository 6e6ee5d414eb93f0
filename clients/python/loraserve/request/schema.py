"""fal-ai/lora defaults and enumerations, read by validation, the gateway and workers alike.

proto3 cannot carry non-zero defaults, so unset `optional` fields resolve here, once.
"""

from __future__ import annotations

import math
from typing import Any

from loraserve.request.schedulers import SCHEDULER_SPECS
from loraserve.v1 import types_pb2

IMAGE_SIZE_PRESETS: dict[str, tuple[int, int]] = {
    "square_hd": (1024, 1024),
    "square": (512, 512),
    "portrait_4_3": (768, 1024),
    "portrait_16_9": (576, 1024),
    "landscape_4_3": (1024, 768),
    "landscape_16_9": (1024, 576),
}
DEFAULT_IMAGE_SIZE = "square_hd"
MAX_IMAGE_SIDE = 14142

SCHEDULERS = tuple(SCHEDULER_SPECS)
IMAGE_FORMATS = {"png": "image/png", "jpeg": "image/jpeg"}
PREDICTION_TYPES = ("epsilon", "v_prediction")
SCHEDULE_METHODS = ("default", "array")

DEFAULT_STEPS = 30
DEFAULT_GUIDANCE_SCALE = 7.5
DEFAULT_NUM_IMAGES = 1
DEFAULT_IMAGE_FORMAT = "png"
DEFAULT_LORA_SCALE = 1.0
# fal's default textual-inversion tokens: one per vector of a two-vector (pivotal tuning) embedding.
DEFAULT_EMBEDDING_TOKENS = ("<s0>", "<s1>")
DEFAULT_TILE_SIZE = 4096
DEFAULT_TILE_STRIDE = 2048
DEFAULT_IMAGE_ENCODER_WEIGHT_NAME = "pytorch_model.bin"
DEFAULT_CONTROLNET_SCALE = 1.0
DEFAULT_CONTROLNET_END = 1.0
DEFAULT_CONTROLNET_MASK_THRESHOLD = 0.5
DEFAULT_IP_ADAPTER_SCALE = 1.0
# fal-ai/lora/image-to-image and /inpaint: how much of the start image is noised away.
DEFAULT_NOISE_STRENGTH = 0.5
# GenerateInput.endpoint as the names fal's paths use (fal-ai/lora, /image-to-image, /inpaint).
ENDPOINT_NAMES = {
    types_pb2.ENDPOINT_UNSPECIFIED: "text-to-image",
    types_pb2.ENDPOINT_IMAGE_TO_IMAGE: "image-to-image",
    types_pb2.ENDPOINT_INPAINT: "inpaint",
}


def image_size(inp: types_pb2.GenerateInput) -> tuple[int, int]:
    """(width, height) the request asks for; presets are resolved, unknown ones raise KeyError."""
    which = inp.image_size.WhichOneof("size")
    if which == "custom":
        return inp.image_size.custom.width, inp.image_size.custom.height
    preset = inp.image_size.preset if which == "preset" else DEFAULT_IMAGE_SIZE
    return IMAGE_SIZE_PRESETS[preset]


def num_inference_steps(inp: types_pb2.GenerateInput) -> int:
    return inp.num_inference_steps if inp.HasField("num_inference_steps") else DEFAULT_STEPS


def guidance_scale(inp: types_pb2.GenerateInput) -> float:
    return inp.guidance_scale if inp.HasField("guidance_scale") else DEFAULT_GUIDANCE_SCALE


def num_images(inp: types_pb2.GenerateInput) -> int:
    return inp.num_images if inp.HasField("num_images") else DEFAULT_NUM_IMAGES


def image_format(inp: types_pb2.GenerateInput) -> str:
    return inp.image_format or DEFAULT_IMAGE_FORMAT


def lora_scale(lora: types_pb2.LoraWeight) -> float:
    return lora.scale if lora.HasField("scale") else DEFAULT_LORA_SCALE


def embedding_tokens(embedding: types_pb2.Embedding) -> list[str]:
    """proto3 cannot tell an empty list from an unset one, so no tokens means fal's default."""
    return list(embedding.tokens) or list(DEFAULT_EMBEDDING_TOKENS)


def tile_width(inp: types_pb2.GenerateInput) -> int:
    return inp.tile_width if inp.HasField("tile_width") else DEFAULT_TILE_SIZE


def tile_height(inp: types_pb2.GenerateInput) -> int:
    return inp.tile_height if inp.HasField("tile_height") else DEFAULT_TILE_SIZE


def tile_stride_width(inp: types_pb2.GenerateInput) -> int:
    """The explicit stride, else fal's default (2048) but at most half the tile, so tiles overlap."""
    if inp.HasField("tile_stride_width"):
        return inp.tile_stride_width
    return min(DEFAULT_TILE_STRIDE, tile_width(inp) // 2)


def tile_stride_height(inp: types_pb2.GenerateInput) -> int:
    if inp.HasField("tile_stride_height"):
        return inp.tile_stride_height
    return min(DEFAULT_TILE_STRIDE, tile_height(inp) // 2)


def noise_strength(inp: types_pb2.GenerateInput) -> float:
    return inp.noise_strength if inp.HasField("noise_strength") else DEFAULT_NOISE_STRENGTH


def starts_from_image(inp: types_pb2.GenerateInput) -> bool:
    """image-to-image and inpaint: the output starts from `image_url` and takes its size."""
    return inp.endpoint in (types_pb2.ENDPOINT_IMAGE_TO_IMAGE, types_pb2.ENDPOINT_INPAINT)


def custom_timesteps(inp: types_pb2.GenerateInput) -> list[int] | None:
    """The custom timestep schedule (method "array"), or None for the scheduler's own."""
    return list(inp.timesteps.array) if inp.timesteps.method == "array" else None


def custom_sigmas(inp: types_pb2.GenerateInput) -> list[float] | None:
    return list(inp.sigmas.array) if inp.sigmas.method == "array" else None


def controlnet_image_url(cn: types_pb2.ControlNet) -> str:
    """`image_url`, or the newer clients' spelling `control_image_url`."""
    return cn.image_url or cn.control_image_url


def controlnet_mask_url(cn: types_pb2.ControlNet) -> str:
    """`mask_url`, or the newer clients' spelling `mask_image_url`."""
    return cn.mask_url or cn.mask_image_url


def controlnet_scale(cn: types_pb2.ControlNet) -> float:
    return cn.conditioning_scale if cn.HasField("conditioning_scale") else DEFAULT_CONTROLNET_SCALE


def controlnet_end(cn: types_pb2.ControlNet) -> float:
    return cn.end_percentage if cn.HasField("end_percentage") else DEFAULT_CONTROLNET_END


def controlnet_mask_threshold(cn: types_pb2.ControlNet) -> float:
    return cn.mask_threshold if cn.HasField("mask_threshold") else DEFAULT_CONTROLNET_MASK_THRESHOLD


def ip_adapter_scale(ipa: types_pb2.IPAdapter) -> float:
    return ipa.scale if ipa.HasField("scale") else DEFAULT_IP_ADAPTER_SCALE


def ip_adapter_projection_shortcut(ipa: types_pb2.IPAdapter) -> bool:
    return ipa.image_projection_shortcut if ipa.HasField("image_projection_shortcut") else True


def scale_json_problem(value: Any) -> str | None:
    """Why a parsed IP-Adapter `scale_json` is not a per-block scale in diffusers' set_ip_adapter_scale
    form (a number, or {"down"/"up": number | {"block_N": number | [numbers]}, "mid": number});
    None when it is. Whether the named blocks exist depends on the model, which the worker checks.
    """
    if _is_finite_number(value):
        return None
    if not isinstance(value, dict):
        return "must be a number or an object with keys down / mid / up"
    for key, part in value.items():
        if key not in ("down", "mid", "up"):
            return f"unknown key {key!r}; use down, mid and up"
        if key == "mid":
            if not (_is_finite_number(part) or (isinstance(part, list) and len(part) == 1 and _is_finite_number(part[0]))):
                return "mid must be a number"
            continue
        if _is_finite_number(part):
            continue
        if not isinstance(part, dict):
            return f"{key} must be a number or an object of block_N entries"
        for block, scales in part.items():
            if not (isinstance(block, str) and block.startswith("block_") and block[6:].isdigit()):
                return f"{key}: unknown block {block!r}; use block_0, block_1, …"
            if not (
                _is_finite_number(scales)
                or (isinstance(scales, list) and scales and all(_is_finite_number(s) for s in scales))
            ):
                return f"{key}.{block} must be a number or a list of numbers (one per attention layer)"
    return None


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
