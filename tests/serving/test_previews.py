"""Live previews' latent-to-RGB projection and rate, on the tiny random-weight VAEs."""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F

from serving.pipelines import LoadedPipeline, load_pipeline
from serving.previews import (
    Previews,
    fit_projection,
    is_released_vae,
    projection_for,
    published_projection,
)
from serving.tiny import Family, make_tiny_model

FAMILIES: list[Family] = ["sd15", "sdxl"]


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, LoadedPipeline]:
    root = tmp_path_factory.mktemp("tiny-preview-models")
    return {
        family: load_pipeline(str(make_tiny_model(root / family, family=family, num_loras=0).pipeline_dir))
        for family in FAMILIES
    }


def test_published_factors_map_each_latent_channel_to_its_colour() -> None:
    """One latent pixel per channel, and one of zeros: the projection gives that channel's row (+ bias), from
    [-1, 1] to 0-255. The colours are worked out by hand from the published factors, (factor + bias + 1) x 127.5
    truncated: SD 1.5's first row (0.3512, 0.2297, 0.3227) gives (172, 156, 168); SDXL's bias
    (0.1084, -0.0175, -0.0011) alone gives (141, 125, 127)."""
    expected = {
        "sd15": ([[172, 156, 168], [168, 190, 157], [91, 149, 162], [100, 94, 35]], [127, 127, 127]),
        "sdxl": ([[187, 179, 182], [109, 124, 140], [155, 139, 122], [100, 93, 99]], [141, 125, 127]),
    }
    for family, (channels, zero) in expected.items():
        latents = torch.zeros(4, 1, 5)
        for channel in range(4):
            latents[channel, 0, channel] = 1.0
        rgb = published_projection(family).to_rgb(latents)
        assert rgb.shape == (1, 5, 3) and rgb.dtype == torch.uint8
        assert rgb[0].tolist() == [*channels, zero], family


def test_released_vaes_are_told_from_others(pipelines: dict[str, LoadedPipeline]) -> None:
    released = SimpleNamespace(
        config=SimpleNamespace(block_out_channels=[128, 256, 512, 512], latent_channels=4, scaling_factor=0.13025)
    )
    assert is_released_vae(released, "sdxl")  # type: ignore[arg-type]
    assert not is_released_vae(released, "sd15")  # type: ignore[arg-type]
    for family, loaded in pipelines.items():
        assert not is_released_vae(loaded.pipe.vae, family)


@pytest.mark.parametrize("family", FAMILIES)
def test_fitted_projection_draws_what_the_vae_decodes(pipelines: dict[str, LoadedPipeline], family: str) -> None:
    """On latents it was not fitted on, the fitted projection follows the VAE's pooled output; the published
    factors, made for another VAE, do not."""
    vae = pipelines[family].pipe.vae
    fitted = projection_for(vae, family)
    assert projection_for(vae, family) is fitted
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(123))
    with torch.no_grad():
        decoded = vae.decode(latents / vae.config.scaling_factor).sample
    pooled = ((F.avg_pool2d(decoded, decoded.shape[-1] // 16)[0].permute(1, 2, 0) + 1) * 127.5).clamp(0, 255)
    truth = pooled.numpy().ravel()

    def correlation(rgb: torch.Tensor) -> float:
        return float(np.corrcoef(rgb.numpy().astype(float).ravel(), truth)[0, 1])

    assert correlation(fitted.to_rgb(latents[0])) > 0.5
    assert correlation(fitted.to_rgb(latents[0])) > correlation(published_projection(family).to_rgb(latents[0])) + 0.3


def test_a_fit_is_reproducible(pipelines: dict[str, LoadedPipeline]) -> None:
    """Seeded latents: a replica that loads the model again previews it as before (up to float rounding)."""
    vae = pipelines["sd15"].pipe.vae
    assert torch.allclose(fit_projection(vae).weight, fit_projection(vae).weight, atol=1e-5)
    assert not torch.allclose(fit_projection(vae).weight, fit_projection(vae, seed=1).weight, atol=1e-5)


def _jpeg_size(data: bytes) -> tuple[int, int]:
    image = PIL.Image.open(io.BytesIO(data))
    assert image.format == "JPEG"
    return image.size


def test_previews_at_most_once_per_interval_and_always_at_the_last_step(pipelines: dict[str, LoadedPipeline]) -> None:
    now = [0.0]
    previews = Previews(pipelines["sd15"].pipe.vae, "sd15", interval_seconds=1.0, max_side=256, clock=lambda: now[0])
    latents = torch.randn(2, 4, 24, 40)
    made = []
    for step, at in enumerate([0.0, 0.5, 0.9, 1.2, 1.3, 1.4], start=1):
        now[0] = at
        previews.offer(step, 6, latents)
        made.append(bool(previews.take(step, 6)))
    assert made == [True, False, False, True, False, True]
    now[0] = 1.45
    previews.offer(6, 6, latents)
    assert _jpeg_size(previews.take(6, 6)) == (40, 24)
    # take without a new offer (a step whose latents were already used) makes nothing
    assert previews.take(6, 6) == b""


def test_previews_shrink_to_max_side_and_can_be_turned_off(pipelines: dict[str, LoadedPipeline]) -> None:
    vae = pipelines["sdxl"].pipe.vae
    previews = Previews(vae, "sdxl", interval_seconds=1.0, max_side=32)
    previews.offer(1, 1, torch.randn(1, 4, 48, 96))
    assert _jpeg_size(previews.take(1, 1)) == (32, 16)
    off = Previews(vae, "sdxl", interval_seconds=0.0, max_side=32)
    off.offer(1, 1, torch.randn(1, 4, 48, 96))
    assert off.take(1, 1) == b""


def test_latents_of_another_channel_count_make_no_preview(pipelines: dict[str, LoadedPipeline]) -> None:
    previews = Previews(pipelines["sd15"].pipe.vae, "sd15", interval_seconds=1.0, max_side=64)
    previews.offer(1, 1, torch.randn(1, 16, 8, 8))
    assert previews.take(1, 1) == b""
