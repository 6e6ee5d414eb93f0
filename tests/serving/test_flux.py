"""FLUX.1 through the serving core: the tiny FLUX model loads by path as users' models do, and
its LoRAs, in every layout the FLUX ecosystem writes, give what diffusers' own loader gives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from diffusers import DiffusionPipeline
from peft.tuners.tuners_utils import BaseTunerLayer

from serving import flux_memory
from serving.flux_memory import CUDA_OVERHEAD, GIB, H100_BYTES
from serving.pipelines import AdapterLoadError, LoadedPipeline, load_pipeline
from serving.tiny import TinyModel, make_tiny_lora
from serving.tiny_flux import (
    FluxLoraComponent,
    build_tiny_flux_pipeline,
    flux1_dev_models,
    make_tiny_flux_layouts,
    make_tiny_flux_lora,
)

SIZE = 64
STEPS = 2


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


# Merged the same way in float32; only the order of float additions differs.
MAX_WEIGHT_DIFFERENCE = 1e-5
# Under half an 8-bit level, in the pipeline's [0, 1] output.
MAX_PIXEL_DIFFERENCE = 1 / 512
LORA_MODELS = ("transformer", "text_encoder")


def flux_lora_sets(model: TinyModel, folder: Path) -> dict[str, list[tuple[str, float]]]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        pipe = build_tiny_flux_pipeline()
    both: tuple[FluxLoraComponent, ...] = ("transformer", "text_encoder")
    peft = make_tiny_flux_lora(folder / "peft.safetensors", seed=3, alpha=8, components=both, pipe=pipe)
    kohya_alpha_2 = make_tiny_flux_lora(
        folder / "kohya.safetensors", seed=4, lora_format="kohya", alpha=2, components=both, pipe=pipe
    )
    # What `make-tiny-model --family flux` writes beside its PEFT LoRAs.
    kohya, xlabs, text = (str(path) for path in make_tiny_flux_layouts(folder / "layouts"))
    plain = str(model.lora_paths[0])
    return {
        "peft-alpha-with-text-encoder": [(str(peft), 1.0)],
        "peft-without-metadata": [(plain, 0.9)],
        "kohya-alpha-with-text-encoder": [(kohya, 1.0)],
        "kohya-alpha-2": [(str(kohya_alpha_2), 0.6)],
        "xlabs": [(xlabs, 1.0)],
        "text-encoder-only": [(text, 0.7)],
        "several-with-scales": [(plain, 0.8), (str(kohya_alpha_2), -0.4), (xlabs, 1.3), (text, 0.5)],
    }


def diffusers_fused(model: TinyModel, loras: list[tuple[str, float]]) -> DiffusionPipeline:
    """diffusers' own way, on a fresh copy: load_lora_weights, set_adapters, fuse_lora into both models."""
    pipe = DiffusionPipeline.from_pretrained(str(model.pipeline_dir), use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    names = [f"a{i}" for i in range(len(loras))]
    for name, (path, _) in zip(names, loras):
        pipe.load_lora_weights(path, adapter_name=name)
    pipe.set_adapters(names, adapter_weights=[scale for _, scale in loras])
    pipe.fuse_lora(components=list(LORA_MODELS), adapter_names=names)
    return pipe


def lora_weights(pipe: DiffusionPipeline) -> dict[str, torch.Tensor]:
    """Every weight of the LoRA-able models, named as in the plain model (PEFT's wrappers add `base_layer`)."""
    return {
        f"{attr}.{name.replace('.base_layer', '')}": tensor.detach().clone()
        for attr in LORA_MODELS
        for name, tensor in getattr(pipe, attr).named_parameters()
        if ".lora_" not in name
    }


def flux_pixels(pipe: DiffusionPipeline) -> np.ndarray:
    return np.asarray(
        pipe(
            "a photo of a cat",
            num_inference_steps=STEPS,
            height=SIZE,
            width=SIZE,
            generator=torch.Generator().manual_seed(1),
            output_type="np",
        ).images
    )


def test_every_flux_layout_gives_diffusers_fused_weights_and_pixels(
    tiny_flux: TinyModel, flux: LoadedPipeline, tmp_path: Path
) -> None:
    flux.activate_loras([])
    plain = lora_weights(flux.pipe)
    plain_pixels = flux_pixels(flux.pipe)
    for label, loras in flux_lora_sets(tiny_flux, tmp_path).items():
        theirs = diffusers_fused(tiny_flux, loras)
        expected = lora_weights(theirs)
        flux.activate_loras(loras)
        try:
            ours = lora_weights(flux.pipe)
            served = flux_pixels(flux.pipe)
        finally:
            flux.deactivate_loras()
        assert ours.keys() == expected.keys(), label
        changed = {name.split(".")[0] for name in ours if not torch.equal(ours[name], plain[name])}
        assert changed == {name.split(".")[0] for name in expected if not torch.equal(expected[name], plain[name])}
        assert changed, f"{label}: the LoRA changed no weight"
        worst = max(float((ours[name] - expected[name]).abs().max()) for name in ours)
        assert worst <= MAX_WEIGHT_DIFFERENCE, f"{label}: weights differ from diffusers' fuse_lora by {worst}"
        assert np.abs(served - plain_pixels).max() > 0.01, label
        assert np.abs(served - flux_pixels(theirs)).max() <= MAX_PIXEL_DIFFERENCE, label
    flux.activate_loras([])
    assert all(torch.equal(tensor, plain[name]) for name, tensor in lora_weights(flux.pipe).items())


def test_a_repeated_flux_set_merges_nothing(tiny_flux: TinyModel, flux: LoadedPipeline) -> None:
    loras = [(str(tiny_flux.lora_paths[0]), 0.6)]
    flux.activate_loras(loras)
    flux.deactivate_loras()
    merges = flux.lora_merges
    flux.activate_loras(loras)
    assert not any(isinstance(module, BaseTunerLayer) for module in flux.pipe.transformer.modules())
    flux.deactivate_loras()
    assert flux.lora_merges == merges


def test_a_prefetched_flux_lora_is_resident_before_its_request(flux: LoadedPipeline, tmp_path: Path) -> None:
    path = make_tiny_flux_lora(tmp_path / "waiting.safetensors", seed=21, transformer=flux.pipe.transformer)
    assert path.resolve() not in flux.resident_loras
    flux.prefetch_loras([str(path)])
    assert path.resolve() in flux.resident_loras
    flux.activate_loras([(str(path), 1.0)])
    flux.deactivate_loras()
    assert flux.resident_loras.count(path.resolve()) == 1


def unmatched_files(folder: Path) -> dict[str, tuple[Path, list[str]]]:
    """LoRA files diffusers loads into FLUX without a word while skipping some of their keys, and those keys."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        pipe = build_tiny_flux_pipeline()
    files: dict[str, tuple[Path, list[str]]] = {}
    generator = torch.Generator().manual_seed(11)

    def extended(name: str, source: Path, layer: str, down: str, up: str) -> None:
        """`source` plus one rank-4 layer of width 32 named `layer` (`down` / `up`: the layout's suffixes)."""
        extra = {f"{layer}.{down}": (4, 32), f"{layer}.{up}": (32, 4)}
        tensors = safetensors.torch.load_file(str(source))
        tensors.update({key: torch.randn(shape, generator=generator) * 0.3 for key, shape in extra.items()})
        path = folder / f"{name}.safetensors"
        safetensors.torch.save_file(tensors, str(path))
        files[name] = (path, sorted(extra))

    peft = make_tiny_flux_lora(folder / "peft-ok.safetensors", seed=3, pipe=pipe)
    kohya = make_tiny_flux_lora(folder / "kohya-ok.safetensors", seed=4, lora_format="kohya", alpha=2, pipe=pipe)
    peft_suffixes = ("lora_A.weight", "lora_B.weight")
    kohya_suffixes = ("lora_down.weight", "lora_up.weight")
    extended("peft-block-the-model-lacks", peft, "transformer.transformer_blocks.7.attn.to_q", *peft_suffixes)
    extended("peft-t5-layers", peft, "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q", *peft_suffixes)
    extended("kohya-t5-layers", kohya, "lora_te3_encoder_block_0_layer_0_SelfAttention_q", *kohya_suffixes)
    extended("kohya-block-the-model-lacks", kohya, "lora_unet_double_blocks_5_img_attn_proj", *kohya_suffixes)
    return files


def test_flux_lora_keys_that_match_no_layer_are_refused_by_name(
    tiny_flux: TinyModel, flux: LoadedPipeline, tmp_path: Path
) -> None:
    """diffusers 0.42's `load_lora_weights` + `fuse_lora` takes each of these files without an error."""
    for label, (path, keys) in unmatched_files(tmp_path).items():
        with pytest.raises(AdapterLoadError) as refused:
            flux.activate_loras([(str(path), 1.0)])
        flux.deactivate_loras()
        message = str(refused.value)
        assert f"{len(keys)} of its keys match no layer of this FLUX model" in message, (label, message)
        assert all(key in message for key in keys), (label, message)
        assert path.resolve() not in flux.resident_loras


def test_an_sd_lora_is_refused_by_flux(flux: LoadedPipeline, tmp_path: Path) -> None:
    sd_lora = make_tiny_lora(tmp_path / "sd15.safetensors", "sd15", components=["unet"])
    with pytest.raises(AdapterLoadError, match="match no layer of this FLUX model: unet[.]"):
        flux.activate_loras([(str(sd_lora), 1.0)])
    flux.deactivate_loras()


RANK = 32


def test_the_default_flux_budget_keeps_the_largest_merged_set_on_an_h100() -> None:
    """serving/flux_memory.py's figures, from FLUX.1 [dev]'s structure on the meta device."""
    with torch.device("meta"):
        transformer, t5, clip, vae = flux1_dev_models()
    bf16 = 2
    weights = sum(p.numel() for m in (transformer, t5, clip, vae) for p in m.parameters()) * bf16
    assert 31 * GIB < weights < 32 * GIB
    block_linears = [
        m for name, m in transformer.named_modules()
        if isinstance(m, torch.nn.Linear) and name.startswith(("transformer_blocks.", "single_transformer_blocks."))
    ]
    merged = sum(m.weight.numel() for m in block_linears) * bf16
    adapter = sum(RANK * (m.in_features + m.out_features) for m in block_linears) * bf16
    assert (len(block_linears), round(merged / GIB, 2), round(adapter / 2**20)) == (494, 22.04, 328)
    budget = flux_memory.default_budget(H100_BYTES - CUDA_OVERHEAD - weights)
    assert budget >= merged + 4 * adapter
    assert weights + CUDA_OVERHEAD + budget + flux_memory.ACTIVATION_RESERVE <= H100_BYTES
