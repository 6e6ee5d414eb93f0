"""Generating one fal-ai/flux-lora family request on a hot FLUX.1 pipeline.

Text-to-image runs the resident FluxPipeline; image-to-image and inpainting compose diffusers'
FluxImg2ImgPipeline / FluxInpaintPipeline on the same modules (`from_pipe`: nothing is copied or
loaded). The request's LoRAs go through the pipeline's LoRA tier as SD's do (merged into the weights
they touch, serving/lora_tier.py) and the plain weights are back in a `finally`.

`guidance_scale` is FLUX.1 [dev]'s distilled guidance (one forward pass per step, no negative
prompt); a [schnell] transformer has no guidance embedding and diffusers ignores it. `acceleration`
"regular" runs the transformer and VAE decoder compiled when the service compiles (the `compile`
setting, serving/compiled.py) and the request's size and batch were warmed; "none", fal's default,
and every other case run the same modules eagerly, as fal allows (../shared/spec/fal-flux-lora.md §1.1).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import PIL.Image
import torch
from diffusers import DiffusionPipeline, FluxImg2ImgPipeline, FluxInpaintPipeline

from loraserve.request import flux, schema
from loraserve.v1 import flux_pb2
from serving import compiled, safety
from serving.controlnet import quiet_dtype_warnings
from serving.errors import GenerationCancelled, ModelLoadError, OptionUnavailableError
from serving.request import GenerationResult
from storage.fetch import fetch_image

if TYPE_CHECKING:
    from serving.loaded import LoadedPipeline
    from storage.fetch import FetchPolicy, StoredFiles

log = logging.getLogger(__name__)
REGULAR = "regular"


@dataclass(kw_only=True)
class FluxParams:
    """One request with fal's defaults resolved; `loras` and the start image are filled by the worker."""

    endpoint: int
    prompt: str
    # None until the start image is fetched, for image-to-image and inpainting without `image_size`.
    width: int | None
    height: int | None
    num_inference_steps: int
    guidance_scale: float
    num_images: int
    seed: int
    enable_safety_checker: bool
    output_format: str
    acceleration: str
    strength: float
    image_url: str = ""
    mask_url: str = ""
    loras: list[tuple[str, float]] = field(default_factory=list)
    image: PIL.Image.Image | None = None
    mask: PIL.Image.Image | None = None


def flux_params(inp: flux_pb2.FluxInput, seed: int) -> FluxParams:
    size = flux.image_size(inp)
    return FluxParams(
        endpoint=inp.endpoint,
        prompt=inp.prompt,
        width=size[0] if size else None,
        height=size[1] if size else None,
        num_inference_steps=flux.num_inference_steps(inp),
        guidance_scale=flux.guidance_scale(inp),
        num_images=flux.num_images(inp),
        seed=seed,
        enable_safety_checker=flux.safety_checker(inp),
        output_format=flux.output_format(inp),
        acceleration=flux.acceleration(inp),
        strength=flux.strength(inp),
        image_url=inp.image_url,
        mask_url=inp.mask_url,
    )


def resolve_start_image(params: FluxParams, *, image_policy: FetchPolicy, store: StoredFiles | None = None) -> None:
    """Fetches the start image (and mask) of image-to-image and inpainting; without `image_size` the output
    takes the image's size floored to a multiple of 16. The pipeline resizes image and mask to the output."""
    if params.endpoint == flux_pb2.FLUX_ENDPOINT_UNSPECIFIED:
        return
    image = fetch_image(params.image_url, "flux_input.image_url", image_policy, store=store)
    if params.width is None or params.height is None:
        if max(image.size) > schema.MAX_IMAGE_SIDE:
            raise OptionUnavailableError(
                "image_url",
                f"image_url: the image is {image.width}x{image.height}; without image_size the output takes its "
                f"size, and a side may be at most {schema.MAX_IMAGE_SIDE} pixels",
            )
        params.width, params.height = (flux.floor_to_multiple(side) for side in image.size)
    params.image = image.convert("RGB")
    if params.endpoint == flux_pb2.FLUX_ENDPOINT_INPAINTING:
        # One luminance channel: white is repainted, black kept (diffusers' FluxInpaintPipeline).
        params.mask = fetch_image(params.mask_url, "flux_input.mask_url", image_policy, store=store).convert("L")


def generate_flux(
    loaded: LoadedPipeline,
    params: FluxParams,
    *,
    on_step: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    safety_checker: safety.SafetyChecker | None = None,
) -> GenerationResult:
    """Runs one request; its LoRA set is released whatever happens (kept installed for a repeat)."""
    if loaded.family != "flux":
        raise ModelLoadError(
            f"the flux_model setting names {loaded.model_name!r}, a {loaded.family} model; fal-ai/flux-lora needs a "
            "diffusers FLUX.1 checkpoint (e.g. black-forest-labs/FLUX.1-dev)"
        )
    checker = safety.require(safety_checker) if params.enable_safety_checker else None
    assert params.width is not None and params.height is not None, "resolve_start_image sets the size"
    cancelled = False

    def on_step_end(pipeline: DiffusionPipeline, step: int, _timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        nonlocal cancelled
        if on_step is not None:
            on_step(step + 1, pipeline.num_timesteps)
        if should_stop is not None and should_stop():
            cancelled = True
            pipeline._interrupt = True
        return tensors

    with loaded.in_use(), _acceleration(loaded, params.acceleration):
        try:
            loaded.activate_loras(params.loras)
            pipe, kwargs = _pipeline(loaded.pipe, params)
            output = pipe(
                prompt=params.prompt,
                width=params.width,
                height=params.height,
                num_inference_steps=params.num_inference_steps,
                guidance_scale=params.guidance_scale,
                num_images_per_prompt=params.num_images,
                generator=torch.Generator("cpu").manual_seed(params.seed),
                output_type="pil",
                callback_on_step_end=on_step_end,
                **kwargs,
            )
        finally:
            loaded.deactivate_loras()
    if cancelled:
        raise GenerationCancelled("generation was cancelled before it finished")
    result = GenerationResult(images=list(output.images))
    if checker is not None:
        result.images, result.has_nsfw_concepts = checker.censor(result.images)
    return result


def _acceleration(loaded: LoadedPipeline, acceleration: str) -> contextlib.AbstractContextManager[None]:
    """`regular` runs the compiled forwards where the pipeline has them; anything else runs them eagerly."""
    if acceleration != REGULAR:
        return compiled.eager()
    if loaded.compiled is None:
        _log_eager_fallback(loaded.model_name)
    return contextlib.nullcontext()


@functools.cache
def _log_eager_fallback(model_name: str) -> None:
    """Once per model: the operator sees why `regular` is no faster than `none`."""
    log.info(
        "acceleration 'regular' on %s runs eagerly: the compile setting is off for this device "
        "(set compile to default or max-autotune to compile the FLUX transformer)",
        model_name,
    )


def _pipeline(pipe: DiffusionPipeline, params: FluxParams) -> tuple[DiffusionPipeline, dict[str, Any]]:
    """The pipeline for the request's endpoint on the resident modules, and its endpoint's call options."""
    if params.endpoint == flux_pb2.FLUX_ENDPOINT_UNSPECIFIED:
        return pipe, {}
    if params.image is None:
        raise OptionUnavailableError("image_url", "image_url: the start image was not fetched")
    inpaint = params.endpoint == flux_pb2.FLUX_ENDPOINT_INPAINTING
    target = FluxInpaintPipeline if inpaint else FluxImg2ImgPipeline
    with quiet_dtype_warnings():
        composed = target.from_pipe(pipe, dtype=pipe.dtype)
    composed.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {"disable": True}))
    kwargs: dict[str, Any] = {"image": params.image, "strength": params.strength}
    if inpaint:
        if params.mask is None:
            raise OptionUnavailableError("mask_url", "mask_url: the mask was not fetched")
        kwargs["mask_image"] = params.mask
    return composed, kwargs
