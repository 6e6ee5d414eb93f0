"""fal-ai/lora defaults and enumerations, read by the gateway (validation) and workers alike.

proto3 cannot carry non-zero defaults, so unset `optional` fields resolve here, once.
"""

from __future__ import annotations

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

SCHEDULERS = (
    "DPM++ 2M",
    "DPM++ 2M Karras",
    "DPM++ 2M SDE",
    "DPM++ 2M SDE Karras",
    "Euler",
    "Euler A",
    "Euler (trailing timesteps)",
    "LCM",
    "LCM (trailing timesteps)",
    "DDIM",
    "TCD",
)
IMAGE_FORMATS = {"png": "image/png", "jpeg": "image/jpeg"}
PREDICTION_TYPES = ("epsilon", "v_prediction")
SCHEDULE_METHODS = ("default", "array")

DEFAULT_STEPS = 30
DEFAULT_GUIDANCE_SCALE = 7.5
DEFAULT_NUM_IMAGES = 1
DEFAULT_IMAGE_FORMAT = "png"
DEFAULT_LORA_SCALE = 1.0
DEFAULT_TILE_SIZE = 4096
DEFAULT_TILE_STRIDE = 2048
DEFAULT_IMAGE_ENCODER_WEIGHT_NAME = "pytorch_model.bin"


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


def custom_timesteps(inp: types_pb2.GenerateInput) -> list[int] | None:
    """The custom timestep schedule (method "array"), or None for the scheduler's own."""
    return list(inp.timesteps.array) if inp.timesteps.method == "array" else None


def custom_sigmas(inp: types_pb2.GenerateInput) -> list[float] | None:
    return list(inp.sigmas.array) if inp.sigmas.method == "array" else None
