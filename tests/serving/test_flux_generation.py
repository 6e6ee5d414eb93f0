"""A fal-ai/flux-lora request through serving/flux_generation.py on the tiny FLUX model, in process:
cancellation stops at the next step and leaves the plain weights, fal's defaults and size rules."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from loraserve.v1 import flux_pb2
from serving import flux_generation
from serving.errors import GenerationCancelled, ModelLoadError, OptionUnavailableError
from serving.pipelines import LoadedPipeline, load_pipeline
from serving.tiny import TinyModel

SIZE = 32


@pytest.fixture(scope="module")
def flux(tiny_flux: TinyModel) -> LoadedPipeline:
    return load_pipeline(str(tiny_flux.pipeline_dir))


def params(steps: int = 2, **fields: object) -> flux_generation.FluxParams:
    inp = flux_pb2.FluxInput(prompt="a cat", num_inference_steps=steps, enable_safety_checker=False, **fields)
    inp.image_size.custom.width = inp.image_size.custom.height = SIZE
    return flux_generation.flux_params(inp, seed=1)


def pixels(flux: LoadedPipeline, request: flux_generation.FluxParams) -> np.ndarray:
    return np.asarray(flux_generation.generate_flux(flux, request).images[0])


def test_a_cancelled_request_stops_at_the_next_step_and_leaves_the_plain_weights(
    flux: LoadedPipeline, tiny_flux: TinyModel
) -> None:
    plain = pixels(flux, params())
    with_lora = params(steps=10)
    with_lora.loras = [(str(tiny_flux.lora_paths[0]), 1.0)]
    steps: list[int] = []
    with pytest.raises(GenerationCancelled):
        flux_generation.generate_flux(flux, with_lora, on_step=lambda i, n: steps.append(i), should_stop=lambda: True)
    assert steps == [1]
    np.testing.assert_array_equal(pixels(flux, params()), plain)


def test_image_to_image_and_inpainting_take_the_start_image_and_mask(flux: LoadedPipeline) -> None:
    start = Image.new("RGB", (SIZE, SIZE), "red")
    i2i = params(endpoint=flux_pb2.FLUX_ENDPOINT_IMAGE_TO_IMAGE, image_url="x")
    assert i2i.strength == 0.85
    with pytest.raises(OptionUnavailableError, match="image_url"):
        flux_generation.generate_flux(flux, i2i)
    i2i.image = start
    inpaint = params(endpoint=flux_pb2.FLUX_ENDPOINT_INPAINTING, image_url="x", mask_url="m")
    inpaint.image, inpaint.mask = start, Image.new("L", (SIZE, SIZE), 255)
    for request in (i2i, inpaint):
        assert flux_generation.generate_flux(flux, request).images[0].size == (SIZE, SIZE)


def test_the_safety_checker_is_required_when_asked_for_and_the_base_must_be_flux(flux: LoadedPipeline) -> None:
    request = params()
    request.enable_safety_checker = True
    with pytest.raises(OptionUnavailableError, match="enable_safety_checker"):
        flux_generation.generate_flux(flux, request)

    class NotFlux:
        family, model_name = "sdxl", "org/sdxl"

    with pytest.raises(ModelLoadError, match="flux_model"):
        flux_generation.generate_flux(NotFlux(), params())  # type: ignore[arg-type]
