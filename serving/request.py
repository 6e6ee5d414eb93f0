"""What one request asks of the serving core and what it gets back: plain data, imported by every layer.

A leaf module (no serving imports at run time), so the pipeline code, the conditioning code and
the worker can all name these types without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import PIL.Image
from diffusers import DiffusionPipeline

from loraserve.request import schema
from serving.latents import OutputFile


class LoadedModel(Protocol):
    """What request-scoped code needs of a hot pipeline (serving/loaded.py `LoadedPipeline`)."""

    pipe: DiffusionPipeline
    family: str
    model_name: str

    def weights_ready(self) -> None:
        """For code that reads the U-Net's weights before its first call (the LoRAs' merge may still run)."""


@dataclass(kw_only=True)
class ControlNetSpec:
    """One `controlnets[i]`; `weights`/`config`/`image`/`mask` are filled by resolve_conditioning."""

    path: str
    image_url: str
    mask_url: str = ""
    config_url: str = ""
    variant: str = ""
    conditioning_scale: float = schema.DEFAULT_CONTROLNET_SCALE
    start_percentage: float = 0.0
    end_percentage: float = schema.DEFAULT_CONTROLNET_END
    mask_threshold: float = schema.DEFAULT_CONTROLNET_MASK_THRESHOLD
    # Which spelling the caller used, so errors name the field they sent.
    image_field: str = "image_url"
    mask_field: str = "mask_url"
    weights: Path | None = None
    config: dict[str, Any] | None = None
    image: PIL.Image.Image | None = None
    mask: PIL.Image.Image | None = None


@dataclass(kw_only=True)
class IPAdapterSpec:
    """One `ip_adapter[i]`; `weights`/`images`/`mask` are filled by resolve_conditioning."""

    path: str
    image_urls: list[str]
    mask_url: str = ""
    model_subfolder: str = ""
    weight_name: str = ""
    scale: float = schema.DEFAULT_IP_ADAPTER_SCALE
    # JSON text: a number, or per-block scales as diffusers' set_ip_adapter_scale takes them.
    scale_json: str = ""
    unconditional_noising_factor: float = 0.0
    image_projection_shortcut: bool = True
    insight_face_model_path: str = ""
    weights: Path | None = None
    images: list[PIL.Image.Image] = field(default_factory=list)
    mask: PIL.Image.Image | None = None


@dataclass(kw_only=True)
class ImageEncoderSpec:
    """The request-wide IP-Adapter image encoder; `folder` is filled by resolve_conditioning.

    `weight_name` None means the fal default (`pytorch_model.bin`); see ip_adapter.encoder_weights_file.
    """

    path: str = ""
    subfolder: str = ""
    weight_name: str | None = None
    folder: Path | None = None


@dataclass(kw_only=True)
class ICLightSpec:
    model_url: str
    image_url: str
    background_image_url: str = ""
    weights: Path | None = None
    image: PIL.Image.Image | None = None
    background: PIL.Image.Image | None = None


@dataclass(kw_only=True)
class Conditioning:
    controlnets: list[ControlNetSpec] = field(default_factory=list)
    guess_mode: bool = False
    ip_adapters: list[IPAdapterSpec] = field(default_factory=list)
    image_encoder: ImageEncoderSpec = field(default_factory=ImageEncoderSpec)
    ic_light: ICLightSpec | None = None
    # The operator's allow_pickle_weights, copied from the weights cache that resolved the files.
    allow_pickle: bool = False


@dataclass(kw_only=True)
class StartImage:
    """image-to-image and inpaint (serving/image_to_image.py); `image`/`mask` are filled by resolve_start_image.

    `mask_url` set means inpaint: white is repainted, black kept.
    """

    image_url: str
    strength: float = schema.DEFAULT_NOISE_STRENGTH
    mask_url: str = ""
    image: PIL.Image.Image | None = None
    mask: PIL.Image.Image | None = None


@dataclass(kw_only=True)
class GenerationParams:
    """One request, already validated by the caller; keyword-only so fields can't swap.

    Every option after `loras` defaults to "off" / the fal default, so older callers keep working.
    """

    prompt: str
    negative_prompt: str = ""
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    num_images: int
    seed: int
    loras: list[tuple[str, float]] = field(default_factory=list)
    # Textual inversions: (local .safetensors path, tokens naming its vectors); see serving/embeddings.py.
    embeddings: list[tuple[str, list[str]]] = field(default_factory=list)
    # One of loraserve.request.schema.SCHEDULERS; None keeps the model's own scheduler class.
    scheduler: str | None = None
    # Custom schedules (method "array"); at most one. They override num_inference_steps.
    timesteps: list[int] | None = None
    sigmas: list[float] | None = None
    # "epsilon" / "v_prediction"; None keeps the model's scheduler config.
    prediction_type: str | None = None
    rescale_betas_snr_zero: bool = False
    eta: float = 0.0
    # fal's N (skip the last N CLIP layers) is diffusers' clip_skip=N; 0 means none.
    clip_skip: int = 0
    prompt_weighting: bool = False
    # Pixels; images larger than a tile are denoised in overlapping tiles. A stride wider than the
    # tile is clamped to it; params_from_input defaults an unset stride to half the tile.
    tile_width: int = schema.DEFAULT_TILE_SIZE
    tile_height: int = schema.DEFAULT_TILE_SIZE
    tile_stride_width: int = schema.DEFAULT_TILE_STRIDE
    tile_stride_height: int = schema.DEFAULT_TILE_STRIDE
    enable_safety_checker: bool = False
    debug_latents: bool = False
    debug_per_pass_latents: bool = False
    # ControlNets, IP-Adapters, IC-Light (serving/conditioning.py); None: none of them.
    conditioning: Conditioning | None = None
    # image-to-image / inpaint; None: text-to-image. width/height become the start image's size.
    start_image: StartImage | None = None


@dataclass
class GenerationResult:
    images: list[PIL.Image.Image]
    # One flag per image when the safety checker ran; None when the request did not ask for it.
    has_nsfw_concepts: list[bool] | None = None
    debug_latents: OutputFile | None = None
    debug_per_pass_latents: OutputFile | None = None
