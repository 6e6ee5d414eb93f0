"""unet_name, variant, kohya / text-encoder LoRAs and textual-inversion embeddings on tiny pipelines."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from serving.pipelines import (
    AdapterLoadError,
    GenerationParams,
    LoadedPipeline,
    ModelLoadError,
    generate,
    load_pipeline,
)
from serving_testkit import params, pixels
from serving.tiny import (
    TinyModel,
    make_tiny_embedding,
    make_tiny_lora,
    make_tiny_model,
    make_tiny_unet,
    make_tiny_variant,
)

FAMILIES = ["sd15", "sdxl"]
# Same LoRA, written two ways (alpha in metadata vs folded into the weights): float rounding only.
MAX_PIXEL_DIFFERENCE = 2


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TinyModel]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {family: make_tiny_model(root / family, family=family, num_loras=0) for family in FAMILIES}


@pytest.fixture(scope="module")
def pipelines(tiny_models: dict[str, TinyModel]) -> dict[str, LoadedPipeline]:
    return {family: load_pipeline(str(model.pipeline_dir)) for family, model in tiny_models.items()}




def adapters_in(loaded: LoadedPipeline) -> set[str]:
    return {name for names in loaded.pipe.get_list_adapters().values() for name in names}


# --- unet_name ------------------------------------------------------------------------------


def test_other_unet_folder_changes_the_image(
    tiny_models: dict[str, TinyModel], pipelines: dict[str, LoadedPipeline], family: str, tmp_path: Path
) -> None:
    base = str(tiny_models[family].pipeline_dir)
    other = make_tiny_unet(tmp_path / "unet", family, seed=5)
    swapped = load_pipeline(base, unet=str(other), unet_label="org/other-unet")
    assert not np.array_equal(pixels(swapped), pixels(pipelines[family]))
    # The same weights as one safetensors file (SDXL-Lightning style) give the same image.
    single = tmp_path / "other-unet.safetensors"
    shutil.copyfile(other / "diffusion_pytorch_model.safetensors", single)
    assert np.array_equal(pixels(load_pipeline(base, unet=str(single))), pixels(swapped))


def test_the_base_models_own_unet_changes_nothing(tiny_models: dict[str, TinyModel], loaded: LoadedPipeline) -> None:
    """A whole pipeline folder as unet_name contributes its unet/; here that is the base's own."""
    base = tiny_models[loaded.family].pipeline_dir
    assert np.array_equal(pixels(load_pipeline(str(base), unet=str(base))), pixels(loaded))


def test_unet_of_another_family_is_refused(tiny_models: dict[str, TinyModel], tmp_path: Path) -> None:
    base = str(tiny_models["sdxl"].pipeline_dir)
    sd15_unet = make_tiny_unet(tmp_path / "sd15-unet", "sd15")
    with pytest.raises(ModelLoadError, match=r"U-Net 'org/sd15-unet' does not fit model .*cross_attention_dim"):
        load_pipeline(base, unet=str(sd15_unet), unet_label="org/sd15-unet")
    single = tmp_path / "sd15-unet.safetensors"
    shutil.copyfile(sd15_unet / "diffusion_pytorch_model.safetensors", single)
    with pytest.raises(ModelLoadError, match=r"does not fit model .*other shapes"):
        load_pipeline(base, unet=str(single))


def test_unet_files_that_are_not_diffusers_unets(tiny_models: dict[str, TinyModel], tmp_path: Path) -> None:
    base = str(tiny_models["sd15"].pipeline_dir)
    original_layout = tmp_path / "ldm-unet.safetensors"
    safetensors.torch.save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, str(original_layout))
    with pytest.raises(ModelLoadError, match="original"):
        load_pipeline(base, unet=str(original_layout))
    with pytest.raises(ModelLoadError, match="neither a diffusers U-Net"):
        load_pipeline(base, unet=str(tmp_path))


# --- variant --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def with_fp16(tiny_models: dict[str, TinyModel], tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("variant") / "pipeline"
    shutil.copytree(tiny_models["sd15"].pipeline_dir, folder)
    return make_tiny_variant(folder, "fp16", seed=3)


def test_variant_loads_the_variant_files(with_fp16: Path, pipelines: dict[str, LoadedPipeline]) -> None:
    assert (with_fp16 / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    plain = load_pipeline(str(with_fp16))
    fp16 = load_pipeline(str(with_fp16), variant="fp16")
    assert np.array_equal(pixels(plain), pixels(pipelines["sd15"])), "without variant the plain files load"
    assert not np.array_equal(pixels(fp16), pixels(plain))
    assert fp16.pipe.unet.dtype == torch.float32, "variant files are cast to the worker's dtype"


def test_missing_variant_is_a_clear_error(with_fp16: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"has no 'bf16' variant"):
        load_pipeline(str(with_fp16), variant="bf16")
    other_unet = make_tiny_unet(tmp_path / "unet", "sd15")
    with pytest.raises(ModelLoadError, match=r"U-Net .* has no 'fp16' variant"):
        load_pipeline(str(with_fp16), variant="fp16", unet=str(other_unet))
    single = tmp_path / "model.safetensors"
    safetensors.torch.save_file({"x": torch.zeros(1)}, str(single))
    with pytest.raises(ModelLoadError, match="single .safetensors file"):
        load_pipeline(str(single), variant="fp16")


# --- LoRA formats ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """The same seeded LoRA (rank 4, alpha 8) per family in every way it can be written."""
    root = tmp_path_factory.mktemp("loras")
    files: dict[tuple[str, str], Path] = {}
    for family in FAMILIES:
        folder = root / family
        files[family, "kohya"] = make_tiny_lora(folder / "kohya.safetensors", family, lora_format="kohya", alpha=8)
        files[family, "peft"] = make_tiny_lora(folder / "peft.safetensors", family, alpha=8)
        files[family, "folded"] = make_tiny_lora(folder / "folded.safetensors", family, alpha=8, fold_alpha=True)
        files[family, "no-alpha"] = make_tiny_lora(folder / "no-alpha.safetensors", family)
        for name, fmt in (("te-kohya", "kohya"), ("te-peft", "peft")):
            files[family, name] = make_tiny_lora(
                folder / f"{name}.safetensors", family, lora_format=fmt, alpha=2, components=["text_encoder"]
            )
    files["sdxl", "te2-kohya"] = make_tiny_lora(
        root / "sdxl" / "te2.safetensors", "sdxl", lora_format="kohya", components=["text_encoder_2"]
    )
    files["sdxl", "te1-te2-kohya"] = make_tiny_lora(
        root / "sdxl" / "te1-te2.safetensors",
        "sdxl",
        lora_format="kohya",
        components=["text_encoder", "text_encoder_2"],
    )
    return files


def test_kohya_lora_equals_the_same_lora_in_peft_format(
    loaded: LoadedPipeline, lora_files: dict[tuple[str, str], Path]
) -> None:
    plain = pixels(loaded)
    images = {
        name: pixels(loaded, loras=[(str(lora_files[loaded.family, name]), 1.0)])
        for name in ("kohya", "peft", "folded", "no-alpha")
    }
    assert np.abs(images["kohya"] - plain).mean() > 1.0
    for name in ("peft", "folded"):
        assert np.abs(images["kohya"] - images[name]).max() <= MAX_PIXEL_DIFFERENCE, name
    # lora_alpha in the file's metadata counts: without it the same matrices act at alpha = rank.
    assert np.abs(images["peft"] - images["no-alpha"]).mean() > 1.0
    assert np.array_equal(pixels(loaded), plain)


def test_text_encoder_loras_change_the_image(loaded: LoadedPipeline, lora_files: dict[tuple[str, str], Path]) -> None:
    plain = pixels(loaded)
    kohya = pixels(loaded, loras=[(str(lora_files[loaded.family, "te-kohya"]), 1.0)])
    peft = pixels(loaded, loras=[(str(lora_files[loaded.family, "te-peft"]), 1.0)])
    assert np.abs(kohya - plain).mean() > 1.0
    assert np.abs(kohya - peft).max() <= MAX_PIXEL_DIFFERENCE
    assert np.array_equal(pixels(loaded, loras=[(str(lora_files[loaded.family, "te-kohya"]), 0.0)]), plain)
    if loaded.family == "sdxl":
        second_encoder = pixels(loaded, loras=[(str(lora_files["sdxl", "te2-kohya"]), 1.0)])
        assert np.abs(second_encoder - plain).mean() > 0.5
    assert np.array_equal(pixels(loaded), plain)


@pytest.mark.parametrize("lora_format", ["kohya", "peft"])
def test_lora_of_the_other_family_fails_and_leaves_the_pipeline_clean(
    pipelines: dict[str, LoadedPipeline], lora_files: dict[tuple[str, str], Path], family: str, lora_format: str
) -> None:
    loaded = pipelines[family]
    other = "sd15" if family == "sdxl" else "sdxl"
    plain = pixels(loaded)
    resident = set(adapters_in(loaded))
    with pytest.raises(AdapterLoadError, match=rf"{lora_format}.safetensors.*(does not fit|no weights)"):
        generate(loaded, params(loras=[(str(lora_files[other, lora_format]), 1.0)]))
    assert adapters_in(loaded) == resident
    assert np.array_equal(pixels(loaded), plain)


def test_lora_that_only_partly_fits_is_refused_whole(
    pipelines: dict[str, LoadedPipeline], lora_files: dict[tuple[str, str], Path]
) -> None:
    """An SDXL text-encoder LoRA on SD 1.5: its first encoder's half fits, the second has nowhere to go."""
    loaded = pipelines["sd15"]
    plain = pixels(loaded)
    resident = set(adapters_in(loaded))
    with pytest.raises(AdapterLoadError, match=r"only 30 of its 60 layers match"):
        generate(loaded, params(loras=[(str(lora_files["sdxl", "te1-te2-kohya"]), 1.0)]))
    assert adapters_in(loaded) == resident
    assert np.array_equal(pixels(loaded), plain)


# --- embeddings -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedding_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("embeddings")
    return {family: make_tiny_embedding(root, family, num_vectors=2) for family in FAMILIES}


def test_embedding_tokens_change_the_image_and_leave_nothing_behind(
    loaded: LoadedPipeline, embedding_files: dict[str, Path]
) -> None:
    embedding = [(str(embedding_files[loaded.family]), ["<s0>", "<s1>"])]
    prompt = "a photo of <s0> <s1> cat"
    vocabulary = len(loaded.pipe.tokenizer)
    plain_before = pixels(loaded)
    without = pixels(loaded, prompt=prompt)
    with_embedding = pixels(loaded, prompt=prompt, embeddings=embedding)
    assert np.abs(with_embedding - without).mean() > 1.0
    # Only the tokens' vectors matter: tokens the prompt does not use change nothing.
    assert np.array_equal(pixels(loaded, embeddings=embedding), plain_before)
    assert np.array_equal(pixels(loaded, prompt=prompt, embeddings=embedding), with_embedding)
    weighted = pixels(loaded, prompt=prompt, embeddings=embedding, prompt_weighting=True)
    assert np.abs(weighted - pixels(loaded, prompt=prompt, prompt_weighting=True)).mean() > 1.0
    assert np.array_equal(pixels(loaded), plain_before)
    assert np.array_equal(pixels(loaded, prompt=prompt), without)
    assert len(loaded.pipe.tokenizer) == vocabulary


def test_embedding_tokens_in_the_negative_prompt(loaded: LoadedPipeline, embedding_files: dict[str, Path]) -> None:
    embedding = [(str(embedding_files[loaded.family]), ["<s0>", "<s1>"])]
    without = pixels(loaded, negative_prompt="<s0> <s1>")
    assert np.abs(pixels(loaded, negative_prompt="<s0> <s1>", embeddings=embedding) - without).mean() > 1.0


def test_one_token_stands_for_every_vector(loaded: LoadedPipeline, embedding_files: dict[str, Path]) -> None:
    path = str(embedding_files[loaded.family])
    per_vector = pixels(loaded, prompt="a photo of <s0> <s1> cat", embeddings=[(path, ["<s0>", "<s1>"])])
    one_token = pixels(loaded, prompt="a photo of <style> cat", embeddings=[(path, ["<style>"])])
    assert np.array_equal(one_token, per_vector)


def test_diffusers_format_embedding(pipelines: dict[str, LoadedPipeline], tmp_path: Path) -> None:
    """`{"<token>": vectors}` (diffusers) loads like `{"emb_params": vectors}` (A1111)."""
    loaded = pipelines["sd15"]
    emb_params = make_tiny_embedding(tmp_path, "sd15", num_vectors=1)
    diffusers_file = tmp_path / "learned_embeds.safetensors"
    vectors = safetensors.torch.load_file(str(emb_params))["emb_params"]
    safetensors.torch.save_file({"<cat-toy>": vectors[0]}, str(diffusers_file))
    prompt = "a photo of <tok> cat"
    a1111 = pixels(loaded, prompt=prompt, embeddings=[(str(emb_params), ["<tok>"])])
    assert np.array_equal(pixels(loaded, prompt=prompt, embeddings=[(str(diffusers_file), ["<tok>"])]), a1111)
    assert not np.array_equal(a1111, pixels(loaded, prompt=prompt))


def test_embeddings_that_do_not_fit_fail_cleanly(
    pipelines: dict[str, LoadedPipeline], embedding_files: dict[str, Path], family: str, tmp_path: Path
) -> None:
    loaded = pipelines[family]
    other = "sd15" if family == "sdxl" else "sdxl"
    prompt = "a photo of <s0> <s1> cat"
    plain = pixels(loaded, prompt=prompt)
    vocabulary = len(loaded.pipe.tokenizer)
    wrong_size = make_tiny_embedding(tmp_path, family, num_vectors=2, size=16)
    cases = [
        ([(str(wrong_size), ["<s0>", "<s1>"])], "vectors of size 16"),
        ([(str(embedding_files[other]), ["<s0>", "<s1>"])], "SDXL embedding|one tensor"),
        ([(str(embedding_files[family]), ["<a>", "<b>", "<c>"])], "2 vector.*3 tokens"),
        ([(str(embedding_files[family]), ["cat</w>", "<b>"])], "already exist"),
        ([(str(embedding_files[family]), ["<s0>", "<s1>"])] * 2, "used by embeddings"),
        ([(str(tmp_path / "missing.safetensors"), ["<s0>", "<s1>"])], "not a readable"),
    ]
    for embeddings, message in cases:
        with pytest.raises(AdapterLoadError, match=message):
            generate(loaded, params(prompt=prompt, embeddings=embeddings))
        assert len(loaded.pipe.tokenizer) == vocabulary
    # A failure after the first of two embeddings loaded leaves neither behind.
    with pytest.raises(AdapterLoadError):
        generate(
            loaded, params(embeddings=[(str(embedding_files[family]), ["<s0>", "<s1>"]), (str(wrong_size), ["<x>"])])
        )
    assert np.array_equal(pixels(loaded, prompt=prompt), plain)


def test_embedding_with_a_text_encoder_lora(
    loaded: LoadedPipeline, embedding_files: dict[str, Path], lora_files: dict[tuple[str, str], Path]
) -> None:
    prompt = "a photo of <s0> <s1> cat"
    plain = pixels(loaded, prompt=prompt)
    lora = [(str(lora_files[loaded.family, "te-kohya"]), 1.0)]
    embedding = [(str(embedding_files[loaded.family]), ["<s0>", "<s1>"])]
    both = pixels(loaded, prompt=prompt, loras=lora, embeddings=embedding)
    assert not np.array_equal(both, pixels(loaded, prompt=prompt, loras=lora))
    assert not np.array_equal(both, pixels(loaded, prompt=prompt, embeddings=embedding))
    assert np.array_equal(pixels(loaded, prompt=prompt), plain)
