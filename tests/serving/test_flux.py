"""FLUX.1 through the serving core: the tiny FLUX model loads by path as users' models do, and
its LoRAs, in every layout the FLUX ecosystem writes, give what diffusers' own loader gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from serving.pipelines import LoadedPipeline, load_pipeline
from serving.tiny import TinyModel, make_tiny_model

SIZE = 64
STEPS = 2


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-flux"), "flux", num_loras=1)


@pytest.fixture(scope="module")
def flux(tiny_flux: TinyModel) -> LoadedPipeline:
    return load_pipeline(str(tiny_flux.pipeline_dir))


def pixels(loaded: LoadedPipeline, seed: int = 1) -> np.ndarray:
    images = loaded.pipe(
        "a photo of a cat",
        num_inference_steps=STEPS,
        height=SIZE,
        width=SIZE,
        guidance_scale=3.5,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    ).images
    return np.asarray(images)


def test_tiny_flux_loads_by_path_as_flux_and_denoises_deterministically(flux: LoadedPipeline) -> None:
    assert flux.family == "flux"
    assert type(flux.pipe).__name__ == "FluxPipeline"
    assert flux.pipe.vae.config.latent_channels == 16
    first, again, other_seed = pixels(flux), pixels(flux), pixels(flux, seed=2)
    assert first.shape == (1, SIZE, SIZE, 3)
    assert np.isfinite(first).all()
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other_seed).max() > 0.01
