"""fal-ai/lora/image-to-image and fal-ai/lora/inpaint on the resident pipelines.

Same queue, models and caches as text-to-image; `GenerateInput.endpoint` picks the member of
the family. A request goes through the same stages as the rest of the image inputs:

1. `start_image_from_input` (via serving/params.py) keeps the URLs as the caller wrote them.
2. `resolve_start_image` (in the worker, with the other inputs) fetches the start image and the
   mask through the SSRF-guarded fetcher with its size caps and Pillow bomb limits, refuses a
   mask whose size differs from the image (naming `mask_url`), and makes the image's size,
   rounded down to a multiple of 8 as diffusers' image processor rounds it, the request's
   width and height, so tiling, ControlNet masks, IP-Adapter masks and IC-Light see the
   output's real size.
3. `adapt` (inside `generate_result`, after the LoRAs, embeddings and conditioning are in place)
   turns the request's pipeline view into diffusers' image-to-image or inpaint pipeline with
   `from_pipe` on the resident pipeline's own modules (no second copy of the weights), picking
   the ControlNet variant when the view is a ControlNet pipeline, and carrying over the view's
   scheduler and any wrappers (tiling, IC-Light) it put in place of the U-Net or VAE.

`noise_strength` is diffusers' `strength`: the last `strength` share of the schedule runs,
starting from the start image noised to that level. At 1.0 (complete noise) image-to-image
keeps nothing of the image but its size, so the text-to-image pipeline runs at that size: the
image-to-image pipelines would add the noise to the image's latents, and the SD noise schedule
leaves about 7% of them in at its noisiest step. Inpaint handles 1.0 itself (pure noise in the
masked region).

Dedicated inpainting checkpoints (runwayml/stable-diffusion-inpainting, SDXL inpainting 0.1) have a
U-Net that takes 9 channels: the latents, the mask and the masked image's latents. Their folders
name diffusers' inpaint pipeline class, so `resident_pipeline` keeps the text-to-image class
resident like for every other model (one code path for LoRAs, ControlNets, tiling); diffusers'
inpaint pipelines feed such a U-Net its extra channels themselves. Nothing else can: the
text-to-image and image-to-image pipelines would hand it 4 or 9 channels of noise and fail with
a shape error mid-denoise, and IC-Light widens a 4-channel `conv_in`, so `check_model` refuses
those requests by field before any work.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

import PIL.Image
from diffusers import (
    DiffusionPipeline,
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionControlNetInpaintPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLControlNetImg2ImgPipeline,
    StableDiffusionXLControlNetInpaintPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)

from loraserve.request import schema
from loraserve.v1 import types_pb2
from serving.controlnet import quiet_dtype_warnings
from serving.errors import ModelLoadError, OptionUnavailableError
from serving.request import StartImage
from storage.fetch import fetch_image

if TYPE_CHECKING:
    from serving.request import GenerationParams
    from storage.fetch import FetchPolicy, StoredFiles

# The output side is a multiple of this (diffusers' image processors round down to the VAE's
# factor; 8 fits every SD 1.5 / SDXL VAE and matches text-to-image's image_size rule).
SIZE_MULTIPLE = 8

# (text-to-image class of the view, its image-to-image class, its inpaint class); ControlNet first,
# since a ControlNet view is no subclass of the plain pipeline.
_CLASSES: tuple[tuple[type[DiffusionPipeline], type[DiffusionPipeline], type[DiffusionPipeline]], ...] = (
    (
        StableDiffusionXLControlNetPipeline,
        StableDiffusionXLControlNetImg2ImgPipeline,
        StableDiffusionXLControlNetInpaintPipeline,
    ),
    (
        StableDiffusionControlNetPipeline,
        StableDiffusionControlNetImg2ImgPipeline,
        StableDiffusionControlNetInpaintPipeline,
    ),
    (StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline),
    (StableDiffusionPipeline, StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline),
)

# What a dedicated inpainting U-Net takes besides the latents: the mask (1) and the masked image's latents.
_INPAINT_EXTRA_CHANNELS = 1

_ONE_START_IMAGE_PER_OUTPUT = (StableDiffusionImg2ImgPipeline, StableDiffusionControlNetImg2ImgPipeline)


def start_image_from_input(inp: types_pb2.GenerateInput) -> StartImage | None:
    """The request's start image and mask as URLs; None for text-to-image."""
    if not schema.starts_from_image(inp):
        return None
    return StartImage(
        image_url=inp.image_url,
        strength=schema.noise_strength(inp),
        mask_url=inp.mask_url if inp.endpoint == types_pb2.ENDPOINT_INPAINT else "",
    )


def output_size(width: int, height: int) -> tuple[int, int]:
    """The start image's size rounded down to a multiple of 8 (at least 8)."""
    return (max(SIZE_MULTIPLE, width - width % SIZE_MULTIPLE), max(SIZE_MULTIPLE, height - height % SIZE_MULTIPLE))


def resolve_start_image(
    params: GenerationParams, *, image_policy: FetchPolicy, store: StoredFiles | None = None
) -> None:
    """Fetches the start image (and mask) and sets the request's size to the output's; in place.

    A fetch failure is an InputFetchError naming `input.image_url` / `input.mask_url` (the fetch
    policy caps bytes and pixels); a side longer than text-to-image allows is refused naming
    `image_url`, a mask of another size than the image naming `mask_url`.
    """
    start = params.start_image
    if start is None:
        return
    image = fetch_image(start.image_url, "input.image_url", image_policy, store=store)
    if max(image.size) > schema.MAX_IMAGE_SIDE:
        raise OptionUnavailableError(
            "image_url",
            f"image_url: the image is {image.width}x{image.height}; the output takes its size, and a side may be at "
            f"most {schema.MAX_IMAGE_SIDE} pixels, as for image_size",
        )
    mask = fetch_image(start.mask_url, "input.mask_url", image_policy, store=store) if start.mask_url else None
    if mask is not None and mask.size != image.size:
        raise OptionUnavailableError(
            "mask_url",
            f"mask_url: the mask is {mask.width}x{mask.height} but image_url is {image.width}x{image.height}; "
            "they must be the same size",
        )
    width, height = output_size(*image.size)
    if (width, height) != image.size:
        image = image.resize((width, height), PIL.Image.Resampling.LANCZOS)
        mask = mask.resize((width, height), PIL.Image.Resampling.NEAREST) if mask is not None else None
    start.image, start.mask = image, mask
    params.width, params.height = width, height


def adapt(
    pipe: DiffusionPipeline, view: DiffusionPipeline, params: GenerationParams, call_kwargs: dict[str, Any]
) -> tuple[DiffusionPipeline, dict[str, Any]]:
    """The request's view and call options as image-to-image / inpaint; text-to-image passes through.

    `pipe` is the resident pipeline whose modules the new pipeline shares; `view` is the request's
    pipeline so far (its own scheduler, maybe a ControlNet pipeline or wrapped U-Net / VAE).
    """
    start = params.start_image
    if start is None:
        return view, call_kwargs
    if start.image is None:
        raise OptionUnavailableError("image_url", "image_url: the start image was not fetched")
    inpaint = bool(start.mask_url)
    if not inpaint and start.strength >= 1:
        return view, call_kwargs
    if inpaint and start.mask is None:
        raise OptionUnavailableError("mask_url", "mask_url: the mask was not fetched")
    target = pipeline_class(view, inpaint=inpaint)
    kwargs = dict(call_kwargs)
    components: dict[str, Any] = {"scheduler": view.scheduler}
    if "controlnet" in view.components:
        components["controlnet"] = view.controlnet
        # The ControlNet pipelines call their control images `image`; these call the start image so.
        kwargs["control_image"] = kwargs.pop("image")
    if isinstance(pipe, StableDiffusionXLPipeline):
        components["add_watermarker"] = getattr(pipe, "watermark", None) is not None
    with quiet_dtype_warnings():
        composed = target.from_pipe(pipe, dtype=pipe.dtype, **components)
    for name in ("unet", "vae"):
        value = view.__dict__.get(name)
        if value is not None and value is not pipe.__dict__.get(name):
            composed.__dict__[name] = value
    composed.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {"disable": True}))
    # diffusers' SD 1.5 image-to-image pipelines copy one start image per output only under a
    # deprecation (to be removed in diffusers 1.0); one start image per output is what they expect.
    repeat = target in _ONE_START_IMAGE_PER_OUTPUT and params.num_images > 1
    kwargs["image"] = [start.image] * params.num_images if repeat else start.image
    kwargs["strength"] = float(start.strength)
    if inpaint:
        kwargs["mask_image"] = start.mask
    return composed, _fit_call_options(target, kwargs, params)


def resident_pipeline(pipe: DiffusionPipeline, model_name: str) -> DiffusionPipeline:
    """The text-to-image pipeline on `pipe`'s modules, whatever class its model_index.json named.

    Dedicated inpainting checkpoints are saved as diffusers' inpaint pipelines (others as image-to-image
    ones); every endpoint composes its pipeline from the resident text-to-image one with `from_pipe`.
    A U-Net that takes neither the latents alone nor the inpainting layout is refused here, by name,
    rather than with a shape error in its first request.
    """
    unet = getattr(pipe, "unet", None)
    vae = getattr(pipe, "vae", None)
    if unet is not None and vae is not None:
        latent = int(vae.config.latent_channels)
        channels = int(unet.config.in_channels)
        if channels not in (latent, inpaint_channels(latent)):
            raise ModelLoadError(
                f"model {model_name!r}: its U-Net takes {channels} input channels; only {latent} (the latents) or "
                f"{inpaint_channels(latent)} (a dedicated inpainting model: latents, mask, masked image) are supported"
            )
    for text_to_image, image_to_image, inpainting in _CLASSES:
        if type(pipe) in (image_to_image, inpainting):
            with quiet_dtype_warnings():
                resident = text_to_image.from_pipe(pipe, dtype=pipe.dtype)
            resident.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
            return resident
    return pipe


def inpaint_channels(latent_channels: int) -> int:
    """A dedicated inpainting U-Net's input: the latents, the mask and the masked image's latents."""
    return 2 * latent_channels + _INPAINT_EXTRA_CHANNELS


def is_inpainting_model(pipe: DiffusionPipeline) -> bool:
    return int(pipe.unet.config.in_channels) == inpaint_channels(int(pipe.vae.config.latent_channels))


def check_model(pipe: DiffusionPipeline, params: GenerationParams, model_name: str) -> None:
    """Refuses, by field and before any work, what a dedicated inpainting model cannot run."""
    if not is_inpainting_model(pipe):
        return
    channels = int(pipe.unet.config.in_channels)
    start = params.start_image
    if start is None or not start.mask_url:
        endpoint = "text-to-image" if start is None else "image-to-image"
        raise OptionUnavailableError(
            "model_name",
            f"model_name: model {model_name!r} is a dedicated inpainting model (its U-Net takes {channels} input "
            "channels: the latents, the mask and the masked image), which only the inpaint endpoint "
            f"(fal-ai/lora/inpaint) can run, not {endpoint}; use a model that is not an inpainting one, or the "
            "inpaint endpoint with a mask that is white everywhere to repaint the whole image",
        )
    if params.conditioning is not None and params.conditioning.ic_light is not None:
        raise OptionUnavailableError(
            "ic_light_model_url",
            f"ic_light_model_url: IC-Light widens a 4-channel SD 1.5 U-Net's input, but model {model_name!r} is a "
            f"dedicated inpainting model whose U-Net takes {channels} channels; use IC-Light with a model that is "
            "not an inpainting one",
        )


def pipeline_class(view: DiffusionPipeline, *, inpaint: bool) -> type[DiffusionPipeline]:
    for text_to_image, image_to_image, inpainting in _CLASSES:
        if isinstance(view, text_to_image):
            return inpainting if inpaint else image_to_image
    raise OptionUnavailableError(
        "endpoint", f"endpoint: a {type(view).__name__} has no image-to-image / inpaint counterpart here"
    )


def _fit_call_options(
    target: type[DiffusionPipeline], kwargs: dict[str, Any], params: GenerationParams
) -> dict[str, Any]:
    """Drops options the target pipeline takes from elsewhere; refuses, by field, options it cannot take.

    diffusers' image-to-image pipelines take the size from the start image (already resized to
    the output's size), the SD 1.5 ones have no guidance rescale, and the ControlNet ones no
    custom schedule.
    """
    accepted = inspect.signature(target.__call__).parameters
    for key in [key for key in kwargs if key not in accepted]:
        if key in ("width", "height") or (key == "guidance_rescale" and not kwargs[key]):
            del kwargs[key]
        elif key == "guidance_rescale":
            raise OptionUnavailableError(
                "rescale_betas_snr_zero",
                f"rescale_betas_snr_zero: diffusers' {target.__name__} does not apply the guidance rescale that "
                "zero terminal SNR needs, so it cannot be combined with this endpoint on this model family yet",
            )
        elif key in ("timesteps", "sigmas"):
            field_name = key if getattr(params, key) is not None else "scheduler"
            raise OptionUnavailableError(
                field_name,
                f"{field_name}: diffusers' {target.__name__} takes no custom timestep or sigma schedule, so "
                f"{'a custom schedule' if field_name != 'scheduler' else repr(params.scheduler)} cannot be combined "
                "with controlnets on this endpoint yet",
            )
        else:
            raise OptionUnavailableError(key, f"{key}: not supported by {target.__name__}")
    return kwargs
