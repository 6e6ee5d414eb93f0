"""Request helpers the in-process serving tests share: one small request, and its pixels."""

from __future__ import annotations

import numpy as np
from PIL import Image

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


def picture(seed: int, size: tuple[int, int] = (64, 64)) -> Image.Image:
    """Random pixels, the same for the same seed: a start image or a conditioning image."""
    return Image.fromarray((np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype(np.uint8))


def half_mask(size: tuple[int, int] = (64, 64), value: int = 255, columns: int | None = None) -> Image.Image:
    """`value` (white: repainted) on the first `columns` columns, the left half by default, black elsewhere."""
    mask = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    mask[:, : size[0] // 2 if columns is None else columns] = value
    return Image.fromarray(mask)


def params(**overrides: object) -> GenerationParams:
    return GenerationParams(**{**DEFAULTS, **overrides})  # type: ignore[arg-type]


def pixels(loaded: LoadedPipeline, **overrides: object) -> np.ndarray:
    """Every image of the request, stacked, as signed integers so differences don't wrap."""
    return np.stack([np.asarray(image) for image in generate(loaded, params(**overrides))]).astype(np.int16)
