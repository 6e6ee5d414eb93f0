"""fal-ai/lora sampling, prompting, output and debugging options on tiny SD 1.5 / SDXL pipelines.

Each option is compared with the same request without it, so a test fails when the option is
accepted and has no effect. Models are built once for the module; images are 64×64, 2–3 steps.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from loraserve.request import schema
from loraserve.v1 import types_pb2
from serving import prompts, schedulers, tiling
from serving.params import params_from_input
from serving.pipelines import (
    GenerationParams,
    GenerationResult,
    LoadedPipeline,
    OptionUnavailableError,
    generate,
    generate_result,
    load_pipeline,
)
from serving.safety import SafetyChecker, SafetyCheckerLoadError, load_safety_checker
from serving.tiny import Family, TinyModel, make_tiny_model, make_tiny_safety_checker

FAMILIES: list[Family] = ["sd15", "sdxl"]
TILED = {
    "width": 128,
    "height": 64,
    "tile_width": 64,
    "tile_height": 64,
    "tile_stride_width": 32,
    "tile_stride_height": 32,
}



@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TinyModel]:
    root = tmp_path_factory.mktemp("tiny-option-models")
    return {family: make_tiny_model(root / family, family=family, num_loras=1) for family in FAMILIES}


@pytest.fixture(scope="module")
def pipelines(tiny_models: dict[str, TinyModel]) -> dict[str, LoadedPipeline]:
    return {family: load_pipeline(str(model.pipeline_dir)) for family, model in tiny_models.items()}


@pytest.fixture(scope="module")
def checkers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SafetyChecker]:
    root = tmp_path_factory.mktemp("tiny-safety")
    return {
        "flags_all": load_safety_checker(make_tiny_safety_checker(root / "all", flag_everything=True)),
        "flags_none": load_safety_checker(make_tiny_safety_checker(root / "none", flag_everything=False)),
    }




def params(**overrides: object) -> GenerationParams:
    defaults: dict[str, object] = {
        "prompt": "a photo of a cat",
        "width": 64,
        "height": 64,
        "num_inference_steps": 3,
        "guidance_scale": 5.0,
        "num_images": 1,
        "seed": 1,
    }
    return GenerationParams(**{**defaults, **overrides})  # type: ignore[arg-type]


def pixels(loaded: LoadedPipeline, **overrides: object) -> np.ndarray:
    return as_array(generate_result(loaded, params(**overrides)))


def as_array(result: GenerationResult) -> np.ndarray:
    return np.stack([np.asarray(image) for image in result.images]).astype(np.int16)


def differs(first: np.ndarray, second: np.ndarray) -> bool:
    """Visibly different, not just a rounding flip somewhere."""
    return first.shape != second.shape or float(np.abs(first - second).mean()) > 0.5


# ---------------------------------------------------------------- scheduler


def test_every_scheduler_gives_its_own_image_and_resident_scheduler_is_untouched(loaded: LoadedPipeline) -> None:
    resident = loaded.pipe.scheduler
    resident_config = dict(resident.config)
    images = {name: pixels(loaded, scheduler=name).tobytes() for name in schema.SCHEDULERS}
    # 11 names, 11 different images: every name (Karras, SDE, ancestral, trailing, …) changes sampling.
    assert len(set(images.values())) == len(schema.SCHEDULERS)
    assert loaded.pipe.scheduler is resident
    assert dict(loaded.pipe.scheduler.config) == resident_config


def test_scheduler_names_map_to_diffusers_classes_and_settings(loaded: LoadedPipeline) -> None:
    built = {name: schedulers.build_scheduler(loaded.pipe.scheduler, name) for name in schema.SCHEDULERS}
    expected: dict[str, tuple[str, dict[str, object]]] = {
        "DPM++ 2M": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": False, "algorithm_type": "dpmsolver++"}),
        "DPM++ 2M Karras": (
            "DPMSolverMultistepScheduler",
            {"use_karras_sigmas": True, "algorithm_type": "dpmsolver++"},
        ),
        "DPM++ 2M SDE": (
            "DPMSolverMultistepScheduler",
            {"use_karras_sigmas": False, "algorithm_type": "sde-dpmsolver++"},
        ),
        "DPM++ 2M SDE Karras": (
            "DPMSolverMultistepScheduler",
            {"use_karras_sigmas": True, "algorithm_type": "sde-dpmsolver++"},
        ),
        "Euler": ("EulerDiscreteScheduler", {}),
        "Euler A": ("EulerAncestralDiscreteScheduler", {}),
        "Euler (trailing timesteps)": ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"}),
        "LCM": ("LCMScheduler", {}),
        "LCM (trailing timesteps)": ("LCMScheduler", {"timestep_spacing": "trailing"}),
        "DDIM": ("DDIMScheduler", {}),
        "TCD": ("TCDScheduler", {}),
    }
    for name, (class_name, settings) in expected.items():
        assert type(built[name]).__name__ == class_name, name
        for key, value in settings.items():
            assert built[name].config[key] == value, (name, key)
        # the model's noise schedule is kept
        assert built[name].config["beta_schedule"] == loaded.pipe.scheduler.config["beta_schedule"]


def test_capability_table_matches_installed_diffusers(loaded: LoadedPipeline) -> None:
    """The gateway validates with the static table; it must say what diffusers really does."""
    for name, spec in schedulers.SCHEDULER_SPECS.items():
        scheduler = schedulers.build_scheduler(loaded.pipe.scheduler, name)
        assert spec.accepts_timesteps == _works(scheduler.set_timesteps, timesteps=[999, 500, 100]), name
        assert spec.accepts_sigmas == _works(scheduler.set_timesteps, sigmas=[14.6, 2.0, 0.0]), name
        assert spec.accepts_eta == ("eta" in inspect.signature(scheduler.step).parameters), name
        zero_snr = schedulers.build_scheduler(loaded.pipe.scheduler, name, rescale_betas_snr_zero=True)
        assert spec.zero_snr_safe_for_epsilon == schedulers.zero_snr_is_finite(zero_snr), name
        assert zero_snr.config.rescale_betas_zero_snr and zero_snr.config.timestep_spacing == "trailing"


def test_schedulers_listed_as_ignoring_spacing_really_do(loaded: LoadedPipeline) -> None:
    """Why "LCM (trailing timesteps)" passes explicit trailing timesteps; fails if diffusers fixes it."""
    for class_name in schedulers.SPACING_IGNORED_BY:
        import diffusers

        scheduler_class = getattr(diffusers, class_name)
        schedules = []
        for spacing in ("leading", "trailing"):
            scheduler = scheduler_class.from_config(loaded.pipe.scheduler.config, timestep_spacing=spacing)
            scheduler.set_timesteps(4)
            schedules.append(scheduler.timesteps.tolist())
        assert schedules[0] == schedules[1], class_name
    lcm = schedulers.build_scheduler(loaded.pipe.scheduler, "LCM (trailing timesteps)")
    assert schedulers.trailing_timesteps_if_ignored(lcm, 4) == [999, 749, 499, 249]
    assert schedulers.trailing_timesteps_if_ignored(schedulers.build_scheduler(loaded.pipe.scheduler, "LCM"), 4) is None


def _works(call: Callable[..., object], **kwargs: object) -> bool:
    try:
        call(**kwargs)
    except (ValueError, TypeError):
        return False
    return True


def test_prediction_type_and_zero_snr_rescaling(loaded: LoadedPipeline) -> None:
    plain = pixels(loaded)
    v_prediction = pixels(loaded, prediction_type="v_prediction")
    assert differs(plain, v_prediction)
    assert np.array_equal(pixels(loaded, prediction_type="epsilon"), plain)  # the tiny models are epsilon
    rescaled = pixels(loaded, prediction_type="v_prediction", rescale_betas_snr_zero=True)
    assert differs(rescaled, v_prediction)
    euler_rescaled = pixels(loaded, scheduler="Euler", rescale_betas_snr_zero=True)
    assert differs(euler_rescaled, pixels(loaded, scheduler="Euler"))
    # DDIM at zero terminal SNR divides by zero for an epsilon model: refused, not a NaN image
    with pytest.raises(OptionUnavailableError) as refused:
        generate(loaded, params(scheduler="DDIM", rescale_betas_snr_zero=True))
    assert refused.value.field_name == "rescale_betas_snr_zero"


# ---------------------------------------------------------------- timesteps / sigmas / eta


def test_custom_timesteps_and_sigmas(loaded: LoadedPipeline) -> None:
    euler = pixels(loaded, scheduler="Euler")
    steps: list[tuple[int, int]] = []
    custom_timesteps = as_array(
        generate_result(
            loaded,
            params(scheduler="Euler", num_inference_steps=30, timesteps=[999, 600, 200]),
            on_step=lambda step, total: steps.append((step, total)),
        )
    )
    assert steps == [(1, 3), (2, 3), (3, 3)]  # the array overrides num_inference_steps
    assert differs(custom_timesteps, euler)
    custom_sigmas = pixels(loaded, scheduler="Euler", sigmas=[8.0, 1.0, 0.1, 0.0])
    assert differs(custom_sigmas, euler) and differs(custom_sigmas, custom_timesteps)
    dpm = pixels(loaded, scheduler="DPM++ 2M", timesteps=[999, 500, 100])
    assert differs(dpm, pixels(loaded, scheduler="DPM++ 2M"))


@pytest.mark.parametrize(
    ("overrides", "field_name"),
    [
        ({"scheduler": "DDIM", "timesteps": [999, 500]}, "timesteps"),
        ({"scheduler": "Euler A", "timesteps": [999, 500]}, "timesteps"),
        ({"scheduler": "DPM++ 2M Karras", "timesteps": [999, 500]}, "timesteps"),
        ({"scheduler": "DPM++ 2M", "sigmas": [14.6, 1.0, 0.0]}, "sigmas"),
        ({"scheduler": "Euler", "eta": 0.5}, "eta"),
    ],
)
def test_options_a_scheduler_cannot_take_are_refused_by_name(
    pipelines: dict[str, LoadedPipeline], overrides: dict[str, object], field_name: str
) -> None:
    with pytest.raises(OptionUnavailableError) as refused:
        generate(pipelines["sd15"], params(**overrides))
    assert refused.value.field_name == field_name
    assert field_name in str(refused.value)


def test_models_own_scheduler_is_checked_by_the_worker(pipelines: dict[str, LoadedPipeline]) -> None:
    """Without a scheduler name only the worker knows the class: tiny SD 1.5 uses DDIM, SDXL Euler."""
    with pytest.raises(OptionUnavailableError, match="timesteps"):
        generate(pipelines["sd15"], params(timesteps=[999, 500]))
    assert differs(pixels(pipelines["sdxl"], timesteps=[999, 500]), pixels(pipelines["sdxl"]))
    with pytest.raises(OptionUnavailableError, match="eta"):
        generate(pipelines["sdxl"], params(eta=0.5))
    assert differs(pixels(pipelines["sd15"], eta=0.8), pixels(pipelines["sd15"]))


def test_eta_changes_ddim_and_tcd(loaded: LoadedPipeline) -> None:
    for name in ("DDIM", "TCD"):
        assert differs(pixels(loaded, scheduler=name, eta=0.8), pixels(loaded, scheduler=name)), name


# ---------------------------------------------------------------- prompting


def test_clip_skip_changes_the_image(loaded: LoadedPipeline) -> None:
    images = [pixels(loaded, clip_skip=skip) for skip in (0, 1, 2)]
    assert differs(images[0], images[1]) and differs(images[1], images[2])


def test_clip_skip_means_diffusers_clip_skip(pipelines: dict[str, LoadedPipeline]) -> None:
    """fal's N is diffusers' clip_skip=N: SD 1.5 hidden state -(N+1) + final norm, SDXL -(N+2)."""
    sd15 = pipelines["sd15"].pipe
    ids = sd15.tokenizer("a photo of a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = sd15.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        expected = sd15.text_encoder.final_layer_norm(hidden)
    got = prompts.encode_prompts(sd15, "a photo of a cat", "", weighting=False, clip_skip=1)
    assert torch.equal(got.prompt_embeds, expected)

    sdxl = pipelines["sdxl"].pipe
    theirs = sdxl.encode_prompt("a photo of a cat", num_images_per_prompt=1, clip_skip=2)
    ours = prompts.encode_prompts(sdxl, "a photo of a cat", "", weighting=False, clip_skip=2)
    assert torch.equal(ours.prompt_embeds, theirs[0])
    assert ours.pooled_prompt_embeds is not None and torch.equal(ours.pooled_prompt_embeds, theirs[2])


LONG_WORDS = ("a", "photo", "of", "cat", "dog", "the", "red", "blue", "house", "tree")  # one token each
LONG_PROMPT = " ".join(LONG_WORDS[i % len(LONG_WORDS)] for i in range(90))
FIRST_75 = " ".join(LONG_PROMPT.split()[:75])


def test_prompt_encoder_matches_the_pipelines_own_without_weighting(loaded: LoadedPipeline) -> None:
    pipe = loaded.pipe
    for prompt in ("a photo of a cat", LONG_PROMPT):
        ours = prompts.encode_prompts(pipe, prompt, "blue", weighting=False, clip_skip=None)
        theirs = pipe.encode_prompt(
            prompt,
            device=pipe.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            negative_prompt="blue",
        )
        assert torch.equal(ours.prompt_embeds, theirs[0]) and torch.equal(ours.negative_prompt_embeds, theirs[1])


def test_plain_prompt_with_weighting_on_is_unchanged(loaded: LoadedPipeline) -> None:
    assert np.array_equal(pixels(loaded, prompt_weighting=True), pixels(loaded))
    assert np.array_equal(pixels(loaded, prompt_weighting=True, clip_skip=1), pixels(loaded, clip_skip=1))


def test_weights_change_the_image(loaded: LoadedPipeline) -> None:
    """Tiny random text encoders barely steer the image, so any pixel change counts here;
    test_weights_move_token_embeddings checks the size of the effect."""
    plain = pixels(loaded, prompt="a photo of a red cat", prompt_weighting=True)
    images = [plain.tobytes()]
    for weighted in ("a photo of a (red:1.6) cat", "a photo of a red++ cat", "a photo of a [red] cat"):
        images.append(pixels(loaded, prompt=weighted, prompt_weighting=True).tobytes())
    assert len(set(images)) == len(images)
    # without prompt_weighting the syntax is just text
    literal = pixels(loaded, prompt="a photo of a (red:1.6) cat")
    assert not np.array_equal(literal, pixels(loaded, prompt="a photo of a (red:1.6) cat", prompt_weighting=True))
    negative = pixels(loaded, prompt="a photo of a red cat", negative_prompt="(blue:1.5) house", prompt_weighting=True)
    assert not np.array_equal(
        negative, pixels(loaded, prompt="a photo of a red cat", negative_prompt="blue house", prompt_weighting=True)
    )


def test_weights_move_token_embeddings(loaded: LoadedPipeline) -> None:
    """`(red:2)` doubles red's distance from the empty prompt's embedding; other tokens stay put."""
    pipe = loaded.pipe
    plain = prompts.encode_prompts(pipe, "a photo of a red cat", "", weighting=True, clip_skip=None)
    weighted = prompts.encode_prompts(pipe, "a photo of a (red:2) cat", "", weighting=True, clip_skip=None)
    empty = prompts.encode_prompts(pipe, "", "", weighting=True, clip_skip=None)
    red = 1 + 4  # BOS, then a / photo / of / a
    expected = empty.prompt_embeds[:, red] + 2 * (plain.prompt_embeds[:, red] - empty.prompt_embeds[:, red])
    assert torch.allclose(weighted.prompt_embeds[:, red], expected, atol=1e-5)
    others = [i for i in range(77) if i != red]
    assert torch.equal(weighted.prompt_embeds[:, others], plain.prompt_embeds[:, others])


def test_long_prompts_are_chunked_not_truncated(loaded: LoadedPipeline) -> None:
    assert len(loaded.pipe.tokenizer(LONG_PROMPT).input_ids) > 77
    # without weighting, CLIP's limit cuts the prompt: the tail has no effect
    assert np.array_equal(pixels(loaded, prompt=LONG_PROMPT), pixels(loaded, prompt=FIRST_75))
    long_weighted = pixels(loaded, prompt=LONG_PROMPT, prompt_weighting=True)
    assert differs(long_weighted, pixels(loaded, prompt=FIRST_75, prompt_weighting=True))
    embeddings = prompts.encode_prompts(loaded.pipe, LONG_PROMPT, "", weighting=True, clip_skip=None)
    assert embeddings.prompt_embeds.shape[1] == 2 * 77
    assert embeddings.negative_prompt_embeds.shape == embeddings.prompt_embeds.shape


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a photo of a cat", [("a photo of a cat", 1.0)]),
        ("a (cat:1.3) dog", [("a ", 1.0), ("cat", 1.3), (" dog", 1.0)]),
        ("(cat)", [("cat", 1.1)]),
        ("[cat]", [("cat", 1 / 1.1)]),
        ("((cat))", [("cat", 1.1 * 1.1)]),
        ("(a (b:2) c:0.5)", [("a ", 0.5), ("b", 1.0), (" c", 0.5)]),
        ("cat++ dog-", [("cat", 1.1**2), (" ", 1.0), ("dog", 0.9)]),
        ("(red cat)++", [("red cat", 1.1**2)]),
        ("(red cat)1.4", [("red cat", 1.4)]),
        ("well-lit t-shirt", [("well-lit t-shirt", 1.0)]),
        (r"\(literal\) x", [("(literal) x", 1.0)]),
        ("x) y]", [("x) y]", 1.0)]),
        ("(unclosed cat", [("unclosed cat", 1.1)]),
        ("time: 5pm (a:b)", [("time: 5pm ", 1.0), ("a:b", 1.1)]),
    ],
)
def test_weight_syntax(text: str, expected: list[tuple[str, float]]) -> None:
    parsed = prompts.parse_weighted_prompt(text)
    assert [fragment for fragment, _ in parsed] == [fragment for fragment, _ in expected]
    assert [weight for _, weight in parsed] == pytest.approx([weight for _, weight in expected])


# ---------------------------------------------------------------- tiling


def test_tiles_cover_the_latent_and_blend_to_the_identity() -> None:
    assert tiling.tile_starts(16, 16, 8) == [0]
    assert tiling.tile_starts(32, 16, 8) == [0, 8, 16]
    assert tiling.tile_starts(30, 16, 8) == [0, 8, 14]
    assert tiling.tile_starts(40, 16, 32) == [0, 16, 24]  # stride clamped to the tile

    class Echo:
        def __call__(self, sample: torch.Tensor, timestep: object, return_dict: bool = True) -> tuple[torch.Tensor]:
            return (sample * 2,)

    sample = torch.randn(2, 4, 24, 40)
    out = tiling.TiledUNet(Echo(), tile=(16, 16), stride=(8, 8))(sample, 1, return_dict=False)[0]
    assert torch.allclose(out, sample * 2, atol=1e-5)


def test_large_image_is_denoised_in_tiles(loaded: LoadedPipeline) -> None:
    tiled = generate_result(loaded, params(**TILED, debug_latents=True))
    assert tiled.images[0].size == (128, 64)
    untiled = pixels(loaded, width=128, height=64)
    assert differs(as_array(tiled), untiled)
    # The blended tiles' latents (what the VAE decoded): a NaN there would decode to black, not fail.
    assert tiled.debug_latents is not None
    latents = safetensors.torch.load(tiled.debug_latents.data)["latents"]
    factor = loaded.pipe.vae_scale_factor
    assert latents.shape == (1, 4, 64 // factor, 128 // factor)
    assert torch.isfinite(latents).all()


def test_image_within_one_tile_is_unchanged(loaded: LoadedPipeline) -> None:
    one_tile = {"tile_width": 64, "tile_height": 64, "tile_stride_width": 32, "tile_stride_height": 32}
    assert np.array_equal(pixels(loaded, **one_tile), pixels(loaded))


# ---------------------------------------------------------------- debug latents


def test_debug_latents_files(loaded: LoadedPipeline) -> None:
    plain = generate_result(loaded, params(num_images=2))
    result = generate_result(loaded, params(num_images=2, debug_latents=True, debug_per_pass_latents=True))
    assert np.array_equal(as_array(result), as_array(plain))  # debugging does not change the images
    assert plain.debug_latents is None and plain.debug_per_pass_latents is None
    assert result.debug_latents is not None and result.debug_per_pass_latents is not None
    assert result.debug_latents.file_name.endswith(".safetensors")
    final = safetensors.torch.load(result.debug_latents.data)["latents"]
    per_pass = safetensors.torch.load(result.debug_per_pass_latents.data)["latents"]
    latent_side = 64 // loaded.pipe.vae_scale_factor
    assert final.shape == (2, 4, latent_side, latent_side)
    assert per_pass.shape == (3, 2, 4, latent_side, latent_side)
    assert torch.equal(per_pass[-1], final)
    assert not torch.equal(per_pass[0], per_pass[1])
    # the final latents are what the VAE decoded into the images
    vae = loaded.pipe.vae
    with torch.no_grad():
        decoded = vae.decode(final / vae.config.scaling_factor, return_dict=False)[0]
    images = loaded.pipe.image_processor.postprocess(decoded, output_type="pil")
    assert np.array_equal(np.stack([np.asarray(image) for image in images]), as_array(plain).astype(np.uint8))


def test_only_one_debug_file_when_only_one_is_asked_for(loaded: LoadedPipeline) -> None:
    result = generate_result(loaded, params(debug_per_pass_latents=True))
    assert result.debug_latents is None and result.debug_per_pass_latents is not None


# ---------------------------------------------------------------- safety checker


def test_safety_checker_without_a_configured_model_is_an_error(loaded: LoadedPipeline) -> None:
    with pytest.raises(OptionUnavailableError) as refused:
        generate_result(loaded, params(enable_safety_checker=True))
    assert refused.value.field_name == "enable_safety_checker"
    assert "no safety checker" in str(refused.value)


def test_safety_checker_flags_and_blacks_out(loaded: LoadedPipeline, checkers: dict[str, SafetyChecker]) -> None:
    plain = generate_result(loaded, params(num_images=2))
    assert plain.has_nsfw_concepts is None  # not checked, not claimed clean
    clean = generate_result(
        loaded, params(num_images=2, enable_safety_checker=True), safety_checker=checkers["flags_none"]
    )
    assert clean.has_nsfw_concepts == [False, False]
    assert np.array_equal(as_array(clean), as_array(plain))
    flagged = generate_result(
        loaded, params(num_images=2, enable_safety_checker=True), safety_checker=checkers["flags_all"]
    )
    assert flagged.has_nsfw_concepts == [True, True]
    assert [image.size for image in flagged.images] == [(64, 64), (64, 64)]
    assert not as_array(flagged).any()
    # a checker passed in but not asked for does nothing
    unchecked = generate_result(loaded, params(num_images=2), safety_checker=checkers["flags_all"])
    assert unchecked.has_nsfw_concepts is None and np.array_equal(as_array(unchecked), as_array(plain))


def test_safety_checker_path_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(SafetyCheckerLoadError, match="safety checker"):
        load_safety_checker(tmp_path / "missing")


# ---------------------------------------------------------------- isolation


def test_everything_on_then_plain_gives_the_plain_bytes(
    loaded: LoadedPipeline, tiny_models: dict[str, TinyModel], family: str, checkers: dict[str, SafetyChecker]
) -> None:
    plain_before = pixels(loaded)
    unet, vae, scheduler = loaded.pipe.unet, loaded.pipe.vae, loaded.pipe.scheduler
    everything = params(
        **TILED,
        prompt="a (photo:1.2) of a cat++ " + LONG_PROMPT,
        negative_prompt="[blue] house",
        prompt_weighting=True,
        clip_skip=2,
        scheduler="DDIM",
        eta=0.7,
        prediction_type="v_prediction",
        rescale_betas_snr_zero=True,
        loras=[(str(tiny_models[family].lora_paths[0]), 0.8)],
        num_images=2,
        enable_safety_checker=True,
        debug_latents=True,
        debug_per_pass_latents=True,
    )
    result = generate_result(loaded, everything, safety_checker=checkers["flags_none"])
    assert len(result.images) == 2 and result.debug_latents is not None
    assert np.array_equal(pixels(loaded), plain_before)
    assert loaded.pipe.unet is unet and loaded.pipe.vae is vae and loaded.pipe.scheduler is scheduler
    assert not getattr(vae, "use_tiling", False)


# ---------------------------------------------------------------- request mapping


def test_params_from_input_maps_every_implemented_field() -> None:
    inp = types_pb2.GenerateInput(
        model_name="m",
        prompt="a (cat:1.2)",
        negative_prompt="dog",
        prompt_weighting=True,
        loras=[types_pb2.LoraWeight(path="l.safetensors"), types_pb2.LoraWeight(path="k.safetensors", scale=0.5)],
        image_size=types_pb2.ImageSize(custom=types_pb2.Dimensions(width=1536, height=512)),
        num_inference_steps=12,
        guidance_scale=4.0,
        clip_skip=2,
        scheduler="TCD",
        timesteps=types_pb2.TimestepsInput(method="array", array=[999, 500]),
        prediction_type="v_prediction",
        rescale_betas_snr_zero=True,
        num_images=3,
        enable_safety_checker=True,
        tile_width=1024,
        tile_stride_height=256,
        eta=0.3,
        debug_latents=True,
        debug_per_pass_latents=True,
    )
    got = params_from_input(inp, seed=77)
    assert got == GenerationParams(
        prompt="a (cat:1.2)",
        negative_prompt="dog",
        width=1536,
        height=512,
        num_inference_steps=12,
        guidance_scale=4.0,
        num_images=3,
        seed=77,
        loras=[("l.safetensors", 1.0), ("k.safetensors", 0.5)],
        scheduler="TCD",
        timesteps=[999, 500],
        sigmas=None,
        prediction_type="v_prediction",
        rescale_betas_snr_zero=True,
        eta=pytest.approx(0.3),  # type: ignore[arg-type]
        clip_skip=2,
        prompt_weighting=True,
        tile_width=1024,
        tile_height=4096,
        tile_stride_width=512,  # unset: fal's 2048, at most half the tile
        tile_stride_height=256,
        enable_safety_checker=True,
        debug_latents=True,
        debug_per_pass_latents=True,
    )


def test_params_from_input_defaults() -> None:
    got = params_from_input(types_pb2.GenerateInput(model_name="m", prompt="p"), seed=1)
    assert (got.scheduler, got.timesteps, got.sigmas, got.prediction_type) == (None, None, None, None)
    assert (got.clip_skip, got.eta, got.prompt_weighting, got.enable_safety_checker) == (0, 0.0, False, False)
    assert (got.tile_width, got.tile_height, got.tile_stride_width, got.tile_stride_height) == (4096, 4096, 2048, 2048)
    sigmas = params_from_input(
        types_pb2.GenerateInput(model_name="m", prompt="p", sigmas=types_pb2.SigmasInput(method="array", array=[3, 0])),
        seed=1,
    )
    assert sigmas.sigmas == [3.0, 0.0] and sigmas.timesteps is None
