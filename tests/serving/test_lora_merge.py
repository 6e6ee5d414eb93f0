"""A request's LoRAs run merged into copies of the weights; no module is wrapped and the resident weights stay."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from serving.pipelines import GenerationParams, LoadedPipeline, generate, load_pipeline
from serving_testkit import params, pixels
from serving.tiny import TinyModel, make_tiny_lora, make_tiny_model

FAMILIES = ["sd15", "sdxl"]
# Merged (W + s·BA) and unfused (xW + s·(xA)B) differ by float rounding only.
MAX_PIXEL_DIFFERENCE = 2


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TinyModel]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {family: make_tiny_model(root / family, family=family, num_loras=2) for family in FAMILIES}


@pytest.fixture(scope="module")
def pipelines(tiny_models: dict[str, TinyModel]) -> dict[str, LoadedPipeline]:
    return {family: load_pipeline(str(model.pipeline_dir)) for family, model in tiny_models.items()}


@pytest.fixture(scope="module")
def text_encoder_loras(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("te-loras")
    return {
        family: make_tiny_lora(root / f"{family}.safetensors", family, lora_format="kohya", alpha=2, seed=5)  # type: ignore[arg-type]
        for family in FAMILIES
    }


def unfused_diffusers(model: TinyModel, loras: list[tuple[str, float]]) -> np.ndarray:
    """What diffusers' own load_lora_weights + set_adapters gives: PEFT's unfused forward."""
    pipe = load_pipeline(str(model.pipeline_dir)).pipe
    names = []
    for i, (path, _) in enumerate(loras):
        pipe.load_lora_weights(path, adapter_name=f"a{i}", use_safetensors=True)
        names.append(f"a{i}")
    pipe.set_adapters(names, adapter_weights=[scale for _, scale in loras])
    p = params()
    image = pipe(
        prompt=p.prompt,
        negative_prompt=None,
        width=p.width,
        height=p.height,
        num_inference_steps=p.num_inference_steps,
        guidance_scale=p.guidance_scale,
        generator=torch.Generator("cpu").manual_seed(p.seed),
    ).images[0]
    return np.asarray(image).astype(int)


def weights_digest(loaded: LoadedPipeline) -> str:
    digest = hashlib.sha256()
    for component in (loaded.pipe.unet, loaded.pipe.text_encoder):
        for name, tensor in sorted(component.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_loras_match_diffusers_unfused_output(
    family: str, tiny_models: dict[str, TinyModel], pipelines: dict[str, LoadedPipeline], text_encoder_loras: dict[str, Path]
) -> None:
    model = tiny_models[family]
    loras = [(str(model.lora_paths[0]), 0.8), (str(model.lora_paths[1]), 0.5), (str(text_encoder_loras[family]), 1.0)]
    ours = np.asarray(generate(pipelines[family], params(loras=loras))[0]).astype(int)
    theirs = unfused_diffusers(model, loras)
    plain = np.asarray(generate(pipelines[family], params())[0]).astype(int)
    assert np.abs(ours - plain).mean() > 1.0
    assert np.abs(ours - theirs).max() <= MAX_PIXEL_DIFFERENCE


def test_no_wrapper_runs_during_a_request_and_resident_weights_stay_untouched(
    tiny_models: dict[str, TinyModel], pipelines: dict[str, LoadedPipeline]
) -> None:
    loaded = pipelines["sdxl"]
    lora = str(tiny_models["sdxl"].lora_paths[0])
    generate(loaded, params(loras=[(lora, 1.0)]))  # resident from here on
    generate(loaded, params())  # a set stays installed until a request without it
    before = weights_digest(loaded)
    wrappers_seen: list[int] = []
    merged_seen: list[bool] = []

    def look(_step: int, _total: int) -> None:
        wrappers_seen.append(sum(isinstance(m, BaseTunerLayer) for m in loaded.pipe.unet.modules()))
        merged_seen.append(weights_digest(loaded) != before)

    for loras in ([(lora, 1.0)], []):
        generate(loaded, params(loras=loras), on_step=look)
    assert wrappers_seen and set(wrappers_seen) == {0}
    assert merged_seen[0] and not merged_seen[-1], "merged weights run with the LoRA, the resident ones without"
    assert weights_digest(loaded) == before


def test_lora_at_scale_zero_runs_the_plain_weights(tiny_models: dict[str, TinyModel], pipelines: dict[str, LoadedPipeline]) -> None:
    loaded = pipelines["sd15"]
    lora = str(tiny_models["sd15"].lora_paths[0])
    plain = np.asarray(generate(loaded, params())[0])
    assert np.array_equal(np.asarray(generate(loaded, params(loras=[(lora, 0.0)]))[0]), plain)
    assert np.array_equal(np.asarray(generate(loaded, params(loras=[(lora, 0.5), (lora, -0.5)]))[0]), plain)
