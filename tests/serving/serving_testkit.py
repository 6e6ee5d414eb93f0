"""Request helpers the in-process serving tests share: one small request, and its pixels."""

from __future__ import annotations

import numpy as np

from serving.pipelines import GenerationParams, LoadedPipeline, generate

# Small and fast on the tiny models; modules that need more steps pass num_inference_steps.
DEFAULTS: dict[str, object] = {
    "prompt": "a photo of a cat",
    "width": 64,
    "height": 64,
    "num_inference_steps": 2,
    "guidance_scale": 5.0,
    "num_images": 1,
    "seed": 1,
}


def params(**overrides: object) -> GenerationParams:
    return GenerationParams(**{**DEFAULTS, **overrides})  # type: ignore[arg-type]


def pixels(loaded: LoadedPipeline, **overrides: object) -> np.ndarray:
    """Every image of the request, stacked, as signed integers so differences don't wrap."""
    return np.stack([np.asarray(image) for image in generate(loaded, params(**overrides))]).astype(np.int16)
