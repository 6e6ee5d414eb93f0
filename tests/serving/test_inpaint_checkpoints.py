"""Dedicated inpainting checkpoints (9-channel U-Net) on tiny SD 1.5 / SDXL models, without Ray.

The models are saved as the published ones are (model_index.json names diffusers' inpaint
pipeline, the U-Net takes latents + mask + masked-image latents) and loaded back by path through
load_pipeline. With random weights the model does not learn to keep the unmasked region, so what
is checked is that the U-Net really receives the mask and the masked image: at noise strength 1
the latents start as pure noise and only the masked image carries the start image, so pixels
changed under the mask change nothing and pixels changed outside it change the output.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image

from serving import image_to_image
from serving.conditioning import Conditioning, ControlNetSpec, ICLightSpec
from serving.pipelines import (
    GenerationParams,
    LoadedPipeline,
    ModelLoadError,
    OptionUnavailableError,
    generate_result,
    load_pipeline,
)
from serving.request import StartImage
import serving_testkit as testkit
from serving_testkit import half_mask, picture
from serving.tiny import INPAINT_UNET_CHANNELS, Family, TinyModel, _build_sd15_unet, make_tiny_model, make_tiny_unet
from serving.tiny_adapters import TinyControlNet, make_tiny_controlnet

FAMILIES: list[Family] = ["sd15", "sdxl"]
SIZE = 64
RESIDENT = {"sd15": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}
INPAINT_CLASS = {"sd15": "StableDiffusionInpaintPipeline", "sdxl": "StableDiffusionXLInpaintPipeline"}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TinyModel]:
    root = tmp_path_factory.mktemp("tiny-inpaint")
    return {family: make_tiny_model(root / family, family=family, num_loras=1, inpaint=True) for family in FAMILIES}


@pytest.fixture(scope="module")
def pipelines(models: dict[str, TinyModel]) -> dict[str, LoadedPipeline]:
    return {family: load_pipeline(str(model.pipeline_dir)) for family, model in models.items()}


@pytest.fixture(scope="module")
def controlnets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TinyControlNet]:
    """Published ControlNets take the 4 latent channels; these come from the plain tiny model of each family."""
    root = tmp_path_factory.mktemp("tiny-inpaint-controlnets")
    plain = {family: make_tiny_model(root / f"model-{family}", family=family, num_loras=0) for family in FAMILIES}
    return {family: make_tiny_controlnet(root / f"cn-{family}", plain[family].pipeline_dir) for family in FAMILIES}




def repainted(image: Image.Image, columns: slice, seed: int) -> Image.Image:
    """`image` with other random pixels in `columns`."""
    array = np.asarray(image).copy()
    array[:, columns] = np.asarray(picture(seed))[:, columns]
    return Image.fromarray(array)


def params(start: StartImage | None, **overrides: Any) -> GenerationParams:
    return testkit.params(**{"start_image": start, "num_inference_steps": 3, **overrides})


def inpaint(
    strength: float = 0.6, *, image: Image.Image | None = None, mask: Image.Image | None = None
) -> StartImage:
    return StartImage(
        image_url="img", strength=strength, mask_url="mask", image=image or picture(1), mask=mask or half_mask()
    )


def pixels(loaded: LoadedPipeline, start: StartImage | None, **overrides: Any) -> np.ndarray:
    result = generate_result(loaded, params(start, **overrides))
    return np.stack([np.asarray(image) for image in result.images]).astype(np.int16)


def test_an_inpainting_checkpoint_loads_by_path_as_its_family(
    models: dict[str, TinyModel], pipelines: dict[str, LoadedPipeline], family: str
) -> None:
    """Saved as the published ones are; kept resident as the text-to-image class every endpoint starts from."""
    index = json.loads((models[family].pipeline_dir / "model_index.json").read_text())
    assert index["_class_name"] == INPAINT_CLASS[family]
    loaded = pipelines[family]
    assert type(loaded.pipe) is RESIDENT[family] and loaded.family == family
    assert loaded.pipe.unet.config.in_channels == INPAINT_UNET_CHANNELS
    assert image_to_image.is_inpainting_model(loaded.pipe)


def test_inpaint_feeds_the_mask_and_the_masked_image_to_the_unet(
    pipelines: dict[str, LoadedPipeline], family: str
) -> None:
    loaded = pipelines[family]
    first = pixels(loaded, inpaint(1.0))
    assert first.shape == (1, SIZE, SIZE, 3)
    assert np.array_equal(first, pixels(loaded, inpaint(1.0))), "same seed, other bytes"
    masked, kept = slice(0, SIZE // 2), slice(SIZE // 2, SIZE)
    # Under the mask the start image is blanked before the U-Net sees it: nothing changes.
    under_mask = pixels(loaded, inpaint(1.0, image=repainted(picture(1), masked, seed=9)))
    assert np.array_equal(under_mask, first)
    outside = pixels(loaded, inpaint(1.0, image=repainted(picture(1), kept, seed=9)))
    assert np.abs(outside - first).mean() > 0.2, "the masked image did not reach the U-Net"
    other_mask = pixels(loaded, inpaint(1.0, mask=half_mask(columns=SIZE // 4)))
    assert np.abs(other_mask - first).mean() > 1.0, "the mask did not reach the U-Net"
    # Below 1 the latents start from the noised start image too.
    assert np.abs(pixels(loaded, inpaint(0.6)) - pixels(loaded, inpaint(0.6, image=picture(2)))).mean() > 1.0


def test_loras_controlnets_tiling_and_debug_latents_work_on_it(
    pipelines: dict[str, LoadedPipeline],
    models: dict[str, TinyModel],
    controlnets: dict[str, TinyControlNet],
    family: str,
) -> None:
    loaded = pipelines[family]
    bare = pixels(loaded, inpaint())
    with_lora = pixels(loaded, inpaint(), loras=[(str(models[family].lora_paths[0]), 1.0)])
    assert np.abs(with_lora - bare).mean() > 1.0, "the LoRA had no effect"
    assert np.array_equal(pixels(loaded, inpaint()), bare), "the LoRA leaked into the next request"
    controlled = pixels(
        loaded,
        inpaint(),
        conditioning=Conditioning(
            controlnets=[ControlNetSpec(path="cn", image_url="c", weights=controlnets[family].folder, image=picture(5))]
        ),
    )
    assert np.abs(controlled - bare).mean() > 1.0, "the ControlNet had no effect"
    # A single file without config_url gets a config derived from the model's U-Net: 4 input channels, not 9.
    single_file = controlnets[family].single_file
    single = ControlNetSpec(path="cn.safetensors", image_url="c", weights=single_file, image=picture(5))
    from_single_file = pixels(loaded, inpaint(), conditioning=Conditioning(controlnets=[single]))
    assert np.array_equal(from_single_file, controlled), "the single file is the folder's weights"
    tiled = pixels(loaded, inpaint(), tile_width=32, tile_height=32, tile_stride_width=16, tile_stride_height=16)
    assert np.abs(tiled - bare).mean() > 0.5, "tiling had no effect"
    result = generate_result(loaded, params(inpaint(), debug_latents=True, num_images=2))
    assert result.debug_latents is not None
    latents = safetensors.torch.load(result.debug_latents.data)["latents"]
    assert tuple(latents.shape) == (2, 4, SIZE // 2, SIZE // 2)


def test_what_an_inpainting_model_cannot_run_is_refused_by_field(
    pipelines: dict[str, LoadedPipeline], family: str
) -> None:
    loaded = pipelines[family]
    bare = pixels(loaded, inpaint())
    cases: list[tuple[StartImage | None, str]] = [
        (None, "not text-to-image"),
        (StartImage(image_url="img", strength=0.5, image=picture(1)), "not image-to-image"),
        # Full noise runs image-to-image as text-to-image, which this model cannot run either.
        (StartImage(image_url="img", strength=1.0, image=picture(1)), "not image-to-image"),
    ]
    for start, endpoint in cases:
        with pytest.raises(OptionUnavailableError) as refused:
            generate_result(loaded, params(start))
        assert refused.value.field_name == "model_name"
        assert "inpainting model" in str(refused.value) and f"{INPAINT_UNET_CHANNELS} input channels" in str(
            refused.value
        )
        assert endpoint in str(refused.value) and "fal-ai/lora/inpaint" in str(refused.value)
    relit = Conditioning(ic_light=ICLightSpec(model_url="ic", image_url="fg", image=picture(4)))
    with pytest.raises(OptionUnavailableError) as ic_light:
        generate_result(loaded, params(inpaint(), conditioning=relit))
    assert ic_light.value.field_name == "ic_light_model_url" and "inpainting model" in str(ic_light.value)
    assert np.array_equal(pixels(loaded, inpaint()), bare), "a refusal left something behind"


def test_a_unet_taking_other_channels_is_refused_at_load(
    pipelines: dict[str, LoadedPipeline], models: dict[str, TinyModel], tmp_path: Path
) -> None:
    components = dict(pipelines["sd15"].pipe.components)
    pipe = StableDiffusionPipeline(**{**components, "unet": _build_sd15_unet(in_channels=8)})
    with pytest.raises(ModelLoadError) as refused:
        image_to_image.resident_pipeline(pipe, "odd-model")
    assert "'odd-model'" in str(refused.value) and "8 input channels" in str(refused.value)
    # unet_name: a 4-channel U-Net does not replace an inpainting one.
    with pytest.raises(ModelLoadError) as swapped:
        load_pipeline(str(models["sd15"].pipeline_dir), unet=str(make_tiny_unet(tmp_path / "unet", "sd15")))
    assert "in_channels 4 (model has 9)" in str(swapped.value)
