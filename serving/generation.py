"""Generating one request's images on a hot pipeline.

Per-request options never touch the resident pipeline: each request runs on a shallow copy
(`_prepare`) that shares the modules but has its own scheduler (serving/schedulers.py) and, for
images larger than a tile, tiling wrappers around the U-Net and VAE (serving/tiling.py); prompt
weighting and clip_skip are computed into embeddings (serving/prompts.py). ControlNets compose a
ControlNet pipeline on the same modules; IP-Adapters and IC-Light change the shared U-Net for the
request only (serving/conditioning.py); textual-inversion tokens are added to the shared
tokenizers and text encoders for the request only (serving/embeddings.py); the request's LoRAs
are merged into copies of the weights they touch (serving/lora_tier.py). Every change to shared
modules is undone in a `finally`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import PIL.Image
import torch
from diffusers import DiffusionPipeline

from core import tracing
from serving import latents as debug_files
from serving import image_to_image, prompts, safety, schedulers, tiling
from serving.conditioning import applied
from serving.errors import GenerationCancelled, OptionUnavailableError
from serving.loaded import LoadedPipeline
from serving.request import GenerationParams, GenerationResult


def generate(
    loaded: LoadedPipeline,
    params: GenerationParams,
    *,
    on_step: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    safety_checker: safety.SafetyChecker | None = None,
) -> list[PIL.Image.Image]:
    """Run one request and return only its images (see generate_result for the other outputs)."""
    return generate_result(
        loaded, params, on_step=on_step, should_stop=should_stop, safety_checker=safety_checker
    ).images


def generate_result(
    loaded: LoadedPipeline,
    params: GenerationParams,
    *,
    on_step: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    safety_checker: safety.SafetyChecker | None = None,
    on_latents: Callable[[int, int, torch.Tensor], None] | None = None,
) -> GenerationResult:
    """Run one request; its LoRA set is released (kept installed for a repeat) and no embedding is left loaded
    whatever happens.

    Scheduler, tiling wrappers and prompt embeddings live in a per-request view of the pipeline,
    so nothing but the LoRA activation touches the resident pipeline.
    """
    checker = safety.require(safety_checker) if params.enable_safety_checker else None
    image_to_image.check_model(loaded.pipe, params, loaded.model_name)
    with loaded.in_use():
        view, call_kwargs = _prepare(loaded.pipe, params)
        try:
            loaded.activate_loras(params.loras)
            loaded.load_embeddings(params.embeddings)
            with applied(loaded, view, params, call_kwargs) as (view, call_kwargs):
                view, call_kwargs = image_to_image.adapt(loaded.pipe, view, params, call_kwargs)
                result = _denoise(view, params, call_kwargs, on_step, should_stop, on_latents)
        finally:
            loaded.unload_embeddings()
            loaded.deactivate_loras()
    if checker is not None:
        result.images, result.has_nsfw_concepts = checker.censor(result.images)
    return result


def _prepare(pipe: DiffusionPipeline, params: GenerationParams) -> tuple[DiffusionPipeline, dict[str, Any]]:
    """A shallow per-request copy of the pipeline (same modules, own scheduler) and the call options."""
    try:
        scheduler = schedulers.build_scheduler(
            pipe.scheduler,
            params.scheduler,
            prediction_type=params.prediction_type,
            rescale_betas_snr_zero=params.rescale_betas_snr_zero,
            num_inference_steps=params.num_inference_steps,
        )
        schedulers.check_request_options(
            scheduler,
            timesteps=params.timesteps,
            sigmas=params.sigmas,
            eta=params.eta,
            rescale_betas_snr_zero=params.rescale_betas_snr_zero,
        )
    except schedulers.SchedulerOptionError as exc:
        raise OptionUnavailableError(exc.field_name, str(exc)) from exc
    view = copy.copy(pipe)
    # Assign through __dict__: DiffusionPipeline.__setattr__ would rewrite the shared config.
    view.__dict__["scheduler"] = scheduler
    if tiling.needs_tiling(params.width, params.height, params.tile_width, params.tile_height):
        view.__dict__.update(
            tiling.tiled_components(
                pipe.unet,
                pipe.vae,
                vae_scale_factor=pipe.vae_scale_factor,
                tile_width=params.tile_width,
                tile_height=params.tile_height,
                stride_width=params.tile_stride_width,
                stride_height=params.tile_stride_height,
            )
        )
    kwargs: dict[str, Any] = {
        # Image-to-image pipelines take the size from the start image instead (serving/image_to_image.py).
        "width": params.width,
        "height": params.height,
        "eta": params.eta,
        "guidance_rescale": schedulers.ZERO_SNR_GUIDANCE_RESCALE if params.rescale_betas_snr_zero else 0.0,
    }
    if params.timesteps is not None:
        kwargs["timesteps"] = list(params.timesteps)
    elif params.sigmas is not None:
        kwargs["sigmas"] = list(params.sigmas)
    elif (trailing := schedulers.trailing_timesteps_if_ignored(scheduler, params.num_inference_steps)) is not None:
        kwargs["timesteps"] = trailing
    else:
        kwargs["num_inference_steps"] = params.num_inference_steps
    return view, kwargs


@tracing.traced("worker.denoise")
def _denoise(
    pipe: DiffusionPipeline,
    params: GenerationParams,
    call_kwargs: dict[str, Any],
    on_step: Callable[[int, int], None] | None,
    should_stop: Callable[[], bool] | None,
    on_latents: Callable[[int, int, torch.Tensor], None] | None = None,
) -> GenerationResult:
    cancelled = False
    per_step: list[torch.Tensor] = []
    final: list[torch.Tensor] = []

    def on_step_end(pipeline: DiffusionPipeline, step: int, _timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        nonlocal cancelled
        if params.debug_per_pass_latents:
            per_step.append(tensors["latents"].detach().to("cpu", copy=True))
        if params.debug_latents and step + 1 == pipeline.num_timesteps:
            final.append(tensors["latents"].detach().to("cpu", copy=True))
        # Before on_step: live previews (serving/previews.py) are made from these latents at the steps it streams.
        if on_latents is not None:
            on_latents(step + 1, pipeline.num_timesteps, tensors["latents"])
        if on_step is not None:
            on_step(step + 1, pipeline.num_timesteps)
        if should_stop is not None and should_stop():
            cancelled = True
            pipeline._interrupt = True
        return tensors

    if params.prompt_weighting or params.clip_skip:
        embeddings = prompts.encode_prompts(
            pipe,
            params.prompt,
            params.negative_prompt,
            weighting=params.prompt_weighting,
            clip_skip=params.clip_skip or None,
        )
        prompt_kwargs: dict[str, Any] = embeddings.as_kwargs()
    else:
        # None (not "") lets SDXL use zero negative embeddings, as its config asks for.
        prompt_kwargs = {"prompt": params.prompt, "negative_prompt": params.negative_prompt or None}
    output = pipe(
        **prompt_kwargs,
        **call_kwargs,
        guidance_scale=params.guidance_scale,
        num_images_per_prompt=params.num_images,
        generator=torch.Generator("cpu").manual_seed(params.seed),
        output_type="pil",
        callback_on_step_end=on_step_end,
    )
    if cancelled:
        raise GenerationCancelled("generation was cancelled before it finished")
    result = GenerationResult(images=list(output.images))
    metadata = debug_files.metadata_for(pipe, params)
    if params.debug_latents and final:
        result.debug_latents = debug_files.final_latents_file(final[0], metadata)
    if params.debug_per_pass_latents and per_step:
        result.debug_per_pass_latents = debug_files.per_pass_latents_file(per_step, metadata)
    return result
