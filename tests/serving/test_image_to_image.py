"""Image-to-image and inpaint on tiny SD 1.5 / SDXL pipelines, without Ray (serving/image_to_image.py).

What the service tests (tests/integration/test_image_to_image.py) cannot see from outside: the
pipeline a request runs on shares the resident modules (no second copy of the weights), every
text-to-image option composes with the start image (ControlNets, IP-Adapters, LoRAs, tiling,
schedulers, custom schedules, prompt weighting, clip skip, debug latents), combinations that
diffusers' image-to-image pipelines cannot run are refused by field, and nothing leaks into the
next text-to-image request.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import safetensors.torch
from diffusers import (
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionControlNetInpaintPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionXLControlNetImg2ImgPipeline,
    StableDiffusionXLControlNetInpaintPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
)
from PIL import Image

from loraserve.request import schema
from serving import image_to_image
from serving.conditioning import Conditioning, ControlNetSpec, ICLightSpec, ImageEncoderSpec, IPAdapterSpec
from serving.generation import _prepare
from serving.pipelines import GenerationParams, LoadedPipeline, OptionUnavailableError, generate_result, load_pipeline
from serving.request import StartImage
import serving_testkit as testkit
from serving_testkit import half_mask, picture
from serving.tiny import Family, TinyModel, make_tiny_embedding, make_tiny_model
from serving.tiny_adapters import TinyAdapters, make_tiny_adapters
from storage.fetch import FetchPolicy, InputFetchError
from tests.integration.test_conditioning import data_uri

FAMILIES: list[Family] = ["sd15", "sdxl"]
SIZE = 64
CLASSES = {
    ("sd15", False, False): StableDiffusionImg2ImgPipeline,
    ("sd15", True, False): StableDiffusionInpaintPipeline,
    ("sd15", False, True): StableDiffusionControlNetImg2ImgPipeline,
    ("sd15", True, True): StableDiffusionControlNetInpaintPipeline,
    ("sdxl", False, False): StableDiffusionXLImg2ImgPipeline,
    ("sdxl", True, False): StableDiffusionXLInpaintPipeline,
    ("sdxl", False, True): StableDiffusionXLControlNetImg2ImgPipeline,
    ("sdxl", True, True): StableDiffusionXLControlNetInpaintPipeline,
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TinyModel]:
    root = tmp_path_factory.mktemp("tiny-img2img")
    return {family: make_tiny_model(root / family, family=family, num_loras=1) for family in FAMILIES}


@pytest.fixture(scope="module")
def adapters(models: dict[str, TinyModel], tmp_path_factory: pytest.TempPathFactory) -> dict[str, TinyAdapters]:
    root = tmp_path_factory.mktemp("tiny-img2img-adapters")
    return {f: make_tiny_adapters(root / f, models[f].pipeline_dir, f) for f in FAMILIES}


@pytest.fixture(scope="module")
def pipelines(models: dict[str, TinyModel]) -> dict[str, LoadedPipeline]:
    return {family: load_pipeline(str(model.pipeline_dir)) for family, model in models.items()}


def params(start: StartImage | None, **overrides: Any) -> GenerationParams:
    return testkit.params(**{"start_image": start, "num_inference_steps": 4, **overrides})


def start(strength: float = 0.5, *, inpaint: bool = False, image: Image.Image | None = None) -> StartImage:
    return StartImage(
        image_url="img",
        strength=strength,
        mask_url="mask" if inpaint else "",
        image=image or picture(1),
        mask=half_mask() if inpaint else None,
    )


def pixels(loaded: LoadedPipeline, first: StartImage | None, **overrides: Any) -> np.ndarray:
    result = generate_result(loaded, params(first, **overrides))
    return np.stack([np.asarray(image) for image in result.images]).astype(np.int16)


def controlnet_conditioning(kit: TinyAdapters) -> Conditioning:
    return Conditioning(
        controlnets=[ControlNetSpec(path="cn", image_url="img", weights=kit.controlnet.folder, image=picture(5))]
    )


@pytest.mark.parametrize("controlled", [False, True], ids=["plain", "controlnet"])
@pytest.mark.parametrize("inpaint", [False, True], ids=["image-to-image", "inpaint"])
def test_the_request_pipeline_shares_the_resident_modules(
    pipelines: dict[str, LoadedPipeline],
    adapters: dict[str, TinyAdapters],
    family: str,
    inpaint: bool,
    controlled: bool,
) -> None:
    """from_pipe on the resident pipeline: the same module objects, no copy of the weights."""
    loaded = pipelines[family]
    pipe = loaded.pipe
    request = params(start(inpaint=inpaint))
    view, kwargs = _prepare(pipe, request)
    if controlled:
        from serving.controlnet import call_kwargs, cached_controlnet, compose
        from serving.model_cache import MODELS

        specs = controlnet_conditioning(adapters[family]).controlnets
        nets = [
            cached_controlnet(MODELS, specs[0], pipe.unet, pipe.vae_scale_factor, pipe.device, pipe.dtype, "cn", "m")
        ]
        view = compose(pipe, view, nets, specs, SIZE, SIZE)
        kwargs = {**kwargs, **call_kwargs(specs, guess_mode=False)}
        kwargs.pop("guidance_rescale")
    composed, composed_kwargs = image_to_image.adapt(pipe, view, request, kwargs)
    assert type(composed) is CLASSES[(family, inpaint, controlled)]
    for name, module in pipe.components.items():
        if name != "scheduler" and module is not None:
            assert getattr(composed, name) is module, name
    assert composed.scheduler is view.scheduler and composed.scheduler is not pipe.scheduler
    assert composed_kwargs["image"] is request.start_image.image  # type: ignore[union-attr]
    assert ("mask_image" in composed_kwargs) == inpaint
    assert ("control_image" in composed_kwargs) == controlled


def test_text_to_image_and_full_noise_image_to_image_keep_the_view(pipelines: dict[str, LoadedPipeline]) -> None:
    pipe = pipelines["sd15"].pipe
    for request in (params(None), params(start(1.0))):
        view, kwargs = _prepare(pipe, request)
        assert image_to_image.adapt(pipe, view, request, kwargs) == (view, kwargs)


def test_strength_moves_the_output_from_the_start_image(pipelines: dict[str, LoadedPipeline], family: str) -> None:
    loaded = pipelines[family]
    other = picture(2)
    low = [pixels(loaded, start(0.25, image=image)) for image in (picture(1), other)]
    high = [pixels(loaded, start(0.75, image=image)) for image in (picture(1), other)]
    full = [pixels(loaded, start(1.0, image=image)) for image in (picture(1), other)]
    # How much the start image still shows: falls with the strength, and is nothing at 1.0.
    assert np.abs(low[0] - low[1]).mean() > np.abs(high[0] - high[1]).mean() > 0
    assert np.array_equal(full[0], full[1])
    assert np.array_equal(full[0], pixels(loaded, None)), "1.0 is text-to-image at the image's size"


def test_every_option_composes_and_nothing_leaks(
    pipelines: dict[str, LoadedPipeline], adapters: dict[str, TinyAdapters], models: dict[str, TinyModel], family: str
) -> None:
    loaded = pipelines[family]
    kit = adapters[family]
    before = pixels(loaded, None)
    unet, vae = loaded.pipe.unet, loaded.pipe.vae
    ipa = kit.ip_adapter
    conditioning = Conditioning(
        controlnets=controlnet_conditioning(kit).controlnets,
        ip_adapters=[
            IPAdapterSpec(
                path=str(ipa.repo),
                image_urls=["img"],
                weights=ipa.repo / ipa.model_subfolder / ipa.weight_name,
                images=[picture(3)],
            )
        ],
        image_encoder=ImageEncoderSpec(folder=ipa.repo / ipa.image_encoder_subfolder),
    )
    common: dict[str, Any] = {
        "loras": [(str(models[family].lora_paths[0]), 0.8)],
        "scheduler": "Euler A",
        "prompt": "a (photo:1.3) of a red++ cat",
        "prompt_weighting": True,
        "clip_skip": 1,
        "debug_latents": True,
        "debug_per_pass_latents": True,
        "num_images": 2,
    }
    for inpaint in (False, True):
        bare = pixels(loaded, start(0.6, inpaint=inpaint))
        assert pixels(loaded, start(0.6, inpaint=inpaint), num_images=2).shape == (2, SIZE, SIZE, 3)
        result = generate_result(loaded, params(start(0.6, inpaint=inpaint), conditioning=conditioning, **common))
        assert [image.size for image in result.images] == [(SIZE, SIZE)] * 2
        everything = np.stack([np.asarray(image) for image in result.images]).astype(np.int16)
        assert np.abs(everything[:1] - bare).mean() > 1.0
        assert result.debug_latents is not None and result.debug_per_pass_latents is not None
        per_pass = safetensors.torch.load(result.debug_per_pass_latents.data)["latents"]
        # 4 steps at strength 0.6: the last int(4 x 0.6) = 2 of the schedule run.
        assert per_pass.shape[0] == 2
        tiles = {"tile_width": 32, "tile_height": 32, "tile_stride_width": 16, "tile_stride_height": 16}
        tiled = pixels(loaded, start(0.6, inpaint=inpaint), **tiles)
        assert np.abs(tiled - bare).mean() > 0.5, "tiling had no effect"
        custom = pixels(loaded, start(0.6, inpaint=inpaint), scheduler="Euler", timesteps=[900, 600, 300, 100])
        bare_euler = pixels(loaded, start(0.6, inpaint=inpaint), scheduler="Euler")
        assert np.abs(custom - bare_euler).mean() > 0.5, "the custom schedule had no effect"
    assert loaded.pipe.unet is unet and loaded.pipe.vae is vae
    assert np.array_equal(pixels(loaded, None), before), "an image-to-image request leaked into text-to-image"


def test_combinations_diffusers_cannot_run_are_refused_by_field(
    pipelines: dict[str, LoadedPipeline], adapters: dict[str, TinyAdapters]
) -> None:
    sd15 = pipelines["sd15"]
    with pytest.raises(OptionUnavailableError) as info:
        generate_result(sd15, params(start(), rescale_betas_snr_zero=True, scheduler="Euler"))
    assert info.value.field_name == "rescale_betas_snr_zero"
    with pytest.raises(OptionUnavailableError) as info:
        generate_result(
            sd15, params(start(), timesteps=[900, 500, 100], conditioning=controlnet_conditioning(adapters["sd15"]))
        )
    assert info.value.field_name == "timesteps"
    # SDXL's image-to-image pipeline applies the guidance rescale itself.
    generate_result(pipelines["sdxl"], params(start(), rescale_betas_snr_zero=True, scheduler="Euler"))


def test_start_image_sets_the_size_and_the_mask_must_match() -> None:
    request = params(StartImage(image_url=data_uri(picture(1, (70, 61))), mask_url=data_uri(half_mask((70, 61)))))
    image_to_image.resolve_start_image(request, image_policy=FetchPolicy())
    assert (request.width, request.height) == (64, 56)
    assert request.start_image is not None and request.start_image.image is not None
    assert request.start_image.image.size == request.start_image.mask.size == (64, 56)  # type: ignore[union-attr]
    assert image_to_image.output_size(5, 800) == (8, 800)
    too_long = params(StartImage(image_url=data_uri(Image.new("RGB", (schema.MAX_IMAGE_SIDE + 1, 1)))))
    with pytest.raises(OptionUnavailableError) as long_side:
        image_to_image.resolve_start_image(too_long, image_policy=FetchPolicy())
    assert long_side.value.field_name == "image_url"

    mismatched = params(StartImage(image_url=data_uri(picture(1)), mask_url=data_uri(half_mask((32, 32)))))
    with pytest.raises(OptionUnavailableError) as refused:
        image_to_image.resolve_start_image(mismatched, image_policy=FetchPolicy())
    assert refused.value.field_name == "mask_url" and "32x32" in str(refused.value)

    with pytest.raises(InputFetchError) as bad:
        not_an_image = params(StartImage(image_url="data:,not-an-image"))
        image_to_image.resolve_start_image(not_an_image, image_policy=FetchPolicy())
    assert bad.value.field == "input.image_url"
    with pytest.raises(InputFetchError) as blocked:
        image_to_image.resolve_start_image(
            params(StartImage(image_url=data_uri(picture(1)), mask_url="http://169.254.169.254/latest/mask.png")),
            image_policy=FetchPolicy(),
        )
    assert blocked.value.field == "input.mask_url"


def test_embeddings_and_ic_light_work_with_a_start_image(
    pipelines: dict[str, LoadedPipeline],
    adapters: dict[str, TinyAdapters],
    family: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    loaded = pipelines[family]
    folder = tmp_path_factory.mktemp("i2i-embedding")
    embedding = [(str(make_tiny_embedding(folder, "sdxl" if family == "sdxl" else "sd15")), ["<s0>", "<s1>"])]
    prompt = "a photo of <s0> <s1> cat"
    for inpaint in (False, True):
        without = pixels(loaded, start(0.7, inpaint=inpaint), prompt=prompt)
        with_embedding = pixels(loaded, start(0.7, inpaint=inpaint), prompt=prompt, embeddings=embedding)
        assert np.abs(with_embedding - without).mean() > 1.0, "the embedding had no effect"
    if family != "sd15":
        return
    kit = adapters[family]
    assert kit.ic_light is not None
    relit = Conditioning(ic_light=ICLightSpec(model_url="ic", image_url="fg", weights=kit.ic_light, image=picture(4)))
    for inpaint in (False, True):
        bare = pixels(loaded, start(0.7, inpaint=inpaint))
        assert np.abs(pixels(loaded, start(0.7, inpaint=inpaint), conditioning=relit) - bare).mean() > 1.0
