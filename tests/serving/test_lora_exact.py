"""Served LoRAs give what diffusers' own `load_lora_weights` + `set_adapters` + `fuse_lora` give.

The service keeps LoRAs as low-rank tensors and merges a request's set into copies of the weights
(serving/lora_tensors.py, serving/lora_merge.py), without PEFT. Every format it accepts is checked
against diffusers on the tiny models, weight by weight and pixel by pixel: diffusers/PEFT files with
alpha in the metadata, kohya / A1111 files with `.alpha` keys, text-encoder-only LoRAs, LoRAs on
convolutions with per-layer ranks, DoRA, and several LoRAs at different scales.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from diffusers import DiffusionPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from serving.pipelines import LoadedPipeline, generate, load_pipeline
from serving.tiny import TinyModel, make_tiny_lora, make_tiny_model
from serving_testkit import params

FAMILIES = ["sd15", "sdxl"]
# Merged the same way in float32; only the order of float additions differs.
MAX_WEIGHT_DIFFERENCE = 1e-5
MAX_PIXEL_DIFFERENCE = 1
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TinyModel]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {family: make_tiny_model(root / family, family=family, num_loras=2) for family in FAMILIES}


@pytest.fixture(scope="module")
def pipelines(tiny_models: dict[str, TinyModel]) -> dict[str, LoadedPipeline]:
    return {family: load_pipeline(str(model.pipeline_dir)) for family, model in tiny_models.items()}


def conv_lora(path: Path, pipe: DiffusionPipeline) -> Path:
    """A PEFT-format U-Net LoRA on 3×3 convolutions and attention, with two ranks and no metadata.

    Without metadata diffusers takes alpha = rank per layer and a rank pattern for the minority
    rank; the convolutions' down matrices are 3×3 kernels, the up matrices 1×1.
    """
    generator = torch.Generator().manual_seed(7)
    tensors: dict[str, torch.Tensor] = {}
    chosen = [
        (name, module)
        for name, module in pipe.unet.named_modules()
        if (isinstance(module, torch.nn.Conv2d) and name.endswith(("conv1", "conv2")))
        or (isinstance(module, torch.nn.Linear) and name.endswith("attn1.to_q"))
    ]
    for i, (name, module) in enumerate(chosen):
        rank = 2 if i % 3 == 0 else 4
        weight = module.weight
        down_shape = (rank, *weight.shape[1:])
        up_shape = (weight.shape[0], rank, 1, 1) if weight.ndim == 4 else (weight.shape[0], rank)
        tensors[f"unet.{name}.lora_A.weight"] = torch.randn(down_shape, generator=generator) * 0.3
        tensors[f"unet.{name}.lora_B.weight"] = torch.randn(up_shape, generator=generator) * 0.3
    safetensors.torch.save_file(tensors, str(path))
    return path


def dora_lora(path: Path, pipe: DiffusionPipeline) -> Path:
    """A DoRA on attention and 3×3 convolutions, made by PEFT, with random up matrices and magnitudes."""
    pipe.unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v", "conv1"], use_dora=True), adapter_name="d"
    )
    generator = torch.Generator().manual_seed(9)
    layers = {}
    for key, tensor in get_peft_model_state_dict(pipe.unet, adapter_name="d").items():
        if ".lora_B." in key:
            tensor = torch.randn(tensor.shape, generator=generator) * 0.3
        elif "magnitude" in key:
            tensor = tensor * (1 + 0.2 * torch.randn(tensor.shape, generator=generator))
        layers[key] = tensor.detach().clone()
    type(pipe).save_lora_weights(path.parent, unet_lora_layers=layers, weight_name=path.name)
    return path


def lora_sets(family: str, model: TinyModel, folder: Path) -> dict[str, list[tuple[str, float]]]:
    text = ["text_encoder"] if family == "sd15" else ["text_encoder", "text_encoder_2"]
    peft = make_tiny_lora(folder / "peft.safetensors", family, alpha=2, seed=3)  # type: ignore[arg-type]
    kohya = make_tiny_lora(folder / "kohya.safetensors", family, lora_format="kohya", alpha=1, seed=4)  # type: ignore[arg-type]
    te_kohya = make_tiny_lora(
        folder / "te-kohya.safetensors", family, lora_format="kohya", alpha=2, components=text, seed=5  # type: ignore[arg-type]
    )
    te_peft = make_tiny_lora(folder / "te-peft.safetensors", family, alpha=8, components=text[-1:], seed=6)  # type: ignore[arg-type]
    with torch.random.fork_rng(devices=[]):
        conv = conv_lora(folder / "conv.safetensors", DiffusionPipeline.from_pretrained(model.pipeline_dir))
        dora = dora_lora(folder / "dora.safetensors", DiffusionPipeline.from_pretrained(model.pipeline_dir))
    first, second = (str(path) for path in model.lora_paths)
    return {
        "peft-alpha": [(str(peft), 1.0)],
        "kohya-alpha": [(str(kohya), 1.0)],
        "text-encoder-kohya": [(str(te_kohya), 1.0)],
        "text-encoder-peft": [(str(te_peft), 0.7)],
        "conv-rank-pattern": [(str(conv), 1.0)],
        "several-with-scales": [(first, 0.8), (str(kohya), -0.4), (str(te_kohya), 1.3), (second, 0.5)],
        "dora": [(str(dora), 0.8)],
        "dora-after-a-lora": [(first, 0.5), (str(dora), 1.0)],
    }


def diffusers_fused(
    model: TinyModel, loras: list[tuple[str, float]], dtype: torch.dtype = torch.float32
) -> DiffusionPipeline:
    pipe = load_pipeline(str(model.pipeline_dir), torch_dtype=dtype).pipe
    names = [f"a{i}" for i in range(len(loras))]
    for name, (path, _) in zip(names, loras):
        pipe.load_lora_weights(path, adapter_name=name, use_safetensors=True)
    pipe.set_adapters(names, adapter_weights=[scale for _, scale in loras])
    pipe.fuse_lora(adapter_names=names)
    return pipe


def weights(pipe: DiffusionPipeline) -> dict[str, torch.Tensor]:
    """Every weight of the LoRA-able models, named as in the plain model (PEFT's wrappers add `base_layer`)."""
    found: dict[str, torch.Tensor] = {}
    for attr in COMPONENTS:
        model = getattr(pipe, attr, None)
        if model is None:
            continue
        for name, tensor in model.named_parameters():
            if ".lora_" not in name:
                found[f"{attr}.{name.replace('.base_layer', '')}"] = tensor.detach().clone()
    return found


def image(pipe: DiffusionPipeline) -> np.ndarray:
    p = params()
    return np.asarray(
        pipe(
            prompt=p.prompt,
            negative_prompt=None,
            width=p.width,
            height=p.height,
            num_inference_steps=p.num_inference_steps,
            guidance_scale=p.guidance_scale,
            generator=torch.Generator("cpu").manual_seed(p.seed),
        ).images[0]
    ).astype(int)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_format_gives_diffusers_fused_weights_and_pixels(
    family: str, tiny_models: dict[str, TinyModel], pipelines: dict[str, LoadedPipeline], tmp_path: Path
) -> None:
    model, loaded = tiny_models[family], pipelines[family]
    plain = weights(loaded.pipe)
    plain_pixels = np.asarray(generate(loaded, params())[0]).astype(int)
    for label, loras in lora_sets(family, model, tmp_path).items():
        theirs = diffusers_fused(model, loras)
        expected = weights(theirs)
        loaded.activate_loras(loras)
        try:
            ours = weights(loaded.pipe)
        finally:
            loaded.deactivate_loras()
        assert ours.keys() == expected.keys(), label
        changed = [name for name in ours if not torch.equal(ours[name], plain[name])]
        assert changed, f"{label}: the LoRA changed no weight"
        worst = max(float((ours[name] - expected[name]).abs().max()) for name in ours)
        assert worst <= MAX_WEIGHT_DIFFERENCE, f"{label}: weights differ from diffusers' fuse_lora by {worst}"
        served = np.asarray(generate(loaded, params(loras=loras))[0]).astype(int)
        assert np.abs(served - plain_pixels).mean() > 1.0, label
        assert np.abs(served - image(theirs)).max() <= MAX_PIXEL_DIFFERENCE, label
    loaded.activate_loras([])  # the last set stays installed until a request without it
    assert all(torch.equal(tensor, plain[name]) for name, tensor in weights(loaded.pipe).items())


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_merge_on_a_cpu_is_diffusers_fused_within_its_roundings(
    family: str, tiny_models: dict[str, TinyModel], tmp_path: Path
) -> None:
    """The CPU merges half-precision weights in their own dtype (serving/lora_merge.py `_merge_layers`).

    One LoRA: PEFT's `fuse_lora` rounds the delta to bfloat16 and then the sum, the service's
    `addmm` rounds the sum once. Each rounding is within half a unit in the last place (2⁻⁸
    relative) of what it rounds, and the delta is at most |W| + |W'|, so the two differ by at most
    2⁻⁸ · (|W| + 3 · |W'|) per element. Several LoRAs: both round after each LoRA, where the
    partial sums may be larger than the result, so per weight the service's distance from the
    exact merge (float32, from the same bfloat16 weights) is held to diffusers' own distance plus
    one unit in the last place of the largest weight (either may round the other way at the worst element).
    """
    model = tiny_models[family]
    loaded = load_pipeline(str(model.pipeline_dir), torch_dtype=torch.bfloat16)
    exact_pipeline = load_pipeline(str(model.pipeline_dir), torch_dtype=torch.bfloat16)
    exact_pipeline.pipe.to(torch.float32)
    plain = weights(loaded.pipe)
    assert {tensor.dtype for tensor in plain.values()} == {torch.bfloat16}
    sets = lora_sets(family, model, tmp_path)
    for label in ("peft-alpha", "kohya-alpha", "text-encoder-kohya", "conv-rank-pattern", "several-with-scales"):
        loras = sets[label]
        expected = weights(diffusers_fused(model, loras, torch.bfloat16))
        for pipeline in (loaded, exact_pipeline):
            pipeline.activate_loras(loras)
        try:
            ours, exact = weights(loaded.pipe), weights(exact_pipeline.pipe)
        finally:
            loaded.deactivate_loras()
            exact_pipeline.deactivate_loras()
        assert any(not torch.equal(ours[name], plain[name]) for name in ours), label
        for name, tensor in ours.items():
            theirs, before, mine = expected[name].float(), plain[name].float(), tensor.float()
            if len(loras) == 1:
                excess = float(((mine - theirs).abs() - 2.0**-8 * (before.abs() + 3 * theirs.abs())).max())
            else:
                slack = 2.0**-8 * float(exact[name].abs().max())
                excess = float((mine - exact[name]).abs().max() - (theirs - exact[name]).abs().max()) - slack
            assert excess <= 0, f"{label}: {name} differs from diffusers' fuse_lora beyond its roundings by {excess}"
    loaded.activate_loras([])  # the last set stays installed until a request without it
    assert all(torch.equal(tensor, plain[name]) for name, tensor in weights(loaded.pipe).items())
