"""A validated fal-ai/lora GenerateInput → GenerationParams, the one mapping workers use."""

from __future__ import annotations

from loraserve.request import schema
from loraserve.v1 import types_pb2
from serving.conditioning import conditioning_from_input
from serving.image_to_image import start_image_from_input
from serving.request import GenerationParams


def params_from_input(inp: types_pb2.GenerateInput, seed: int) -> GenerationParams:
    """Every option the core implements; defaults resolve through loraserve.request.schema.

    Options the gateway refuses as not supported are not read here. `unet_name` and `variant`
    are part of the base-model key (core/model_key.py), so they shape the loaded pipeline,
    not the request. Paths (loras, embeddings) are as the caller gave them; the worker replaces
    them with local files from its weights cache.
    """
    width, height = schema.image_size(inp)
    return GenerationParams(
        prompt=inp.prompt,
        negative_prompt=inp.negative_prompt,
        width=width,
        height=height,
        num_inference_steps=schema.num_inference_steps(inp),
        guidance_scale=schema.guidance_scale(inp),
        num_images=schema.num_images(inp),
        seed=seed,
        loras=[(lora.path, schema.lora_scale(lora)) for lora in inp.loras],
        embeddings=[(embedding.path, schema.embedding_tokens(embedding)) for embedding in inp.embeddings],
        scheduler=inp.scheduler or None,
        timesteps=schema.custom_timesteps(inp),
        sigmas=schema.custom_sigmas(inp),
        prediction_type=inp.prediction_type or None,
        rescale_betas_snr_zero=inp.rescale_betas_snr_zero,
        eta=inp.eta,
        clip_skip=inp.clip_skip,
        prompt_weighting=inp.prompt_weighting,
        tile_width=schema.tile_width(inp),
        tile_height=schema.tile_height(inp),
        tile_stride_width=schema.tile_stride_width(inp),
        tile_stride_height=schema.tile_stride_height(inp),
        enable_safety_checker=inp.enable_safety_checker,
        debug_latents=inp.debug_latents,
        debug_per_pass_latents=inp.debug_per_pass_latents,
        conditioning=conditioning_from_input(inp),
        start_image=start_image_from_input(inp),
    )
