"""Tiny random-weight SD 1.5 / SDXL pipelines and LoRAs, built without the Hugging Face Hub.

Tests and local demos need real diffusers checkpoints that go through exactly the code users
run (save_pretrained → from_pretrained, safetensors LoRAs → load_lora_weights), but this
project has no hub access and no GPU. The shapes follow diffusers' own fast-test components,
so a whole pipeline fits in a few megabytes and denoises a 64×64 image in well under a second.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import safetensors.torch
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

Family = Literal["sd15", "sdxl"]

LORA_RANK = 4
LORA_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
# Large enough that a LoRA at scale 1 moves the output pixels visibly, small enough to stay finite.
LORA_INIT_STD = 0.3

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
# Whole words get merged into single tokens, so prompts tokenise the way real CLIP prompts do.
MERGE_WORDS = ("a", "photo", "of", "cat", "dog", "the", "red", "blue", "house", "tree")

# A dedicated inpainting U-Net (runwayml/stable-diffusion-inpainting, SDXL inpainting 0.1) takes the
# latents, the mask and the masked image's latents stacked: 4 + 1 + 4 channels.
LATENT_CHANNELS = 4
INPAINT_UNET_CHANNELS = 2 * LATENT_CHANNELS + 1

# Standard Stable Diffusion noise-schedule values, shared by both families.
SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1}


@dataclass(frozen=True)
class TinyModel:
    """Where a built tiny model lives, so callers can load it by path like any user model."""

    pipeline_dir: Path
    lora_paths: list[Path]
    family: str


def make_tiny_model(
    out_dir: Path, family: Family | Literal["flux"] = "sdxl", num_loras: int = 3, seed: int = 0, *, inpaint: bool = False
) -> TinyModel:
    """Build, save and describe a tiny pipeline plus `num_loras` LoRAs; same seed, same files.

    `inpaint` builds a dedicated inpainting checkpoint instead: a 9-channel U-Net, saved as the
    published ones are, under diffusers' inpaint pipeline class in model_index.json. "flux" is
    serving/tiny_flux.py's FLUX.1 pipeline (FLUX inpaints with its text-to-image checkpoint).
    """
    if family == "flux":
        if inpaint:
            raise ValueError("FLUX has no dedicated inpainting checkpoint here; inpaint with the plain one")
        from serving.tiny_flux import make_tiny_flux_model

        return make_tiny_flux_model(out_dir, num_loras, seed)
    out_dir = Path(out_dir)
    # Seeded random weights, without disturbing the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = _build_pipeline(family, inpaint=inpaint)
        pipeline_dir = out_dir / "pipeline"
        pipe.save_pretrained(pipeline_dir, safe_serialization=True)
        template = _unet_lora_template(pipe.unet)
    lora_paths = [
        _save_random_lora(type(pipe), template, out_dir / "loras" / f"lora_{i}.safetensors", seed * 1000 + i + 1)
        for i in range(num_loras)
    ]
    return TinyModel(pipeline_dir=pipeline_dir, lora_paths=lora_paths, family=family)


def make_tiny_safety_checker(out_dir: Path, *, flag_everything: bool = False, seed: int = 0) -> Path:
    """Save a tiny random StableDiffusionSafetyChecker + CLIPImageProcessor folder; returns its path.

    A real checker flags an image when its CLIP embedding is closer to a concept embedding than
    that concept's threshold. Thresholds of -2 (below any cosine similarity) flag every image,
    thresholds of 2 (above any) flag none, so tests can force either outcome.
    """
    out_dir = Path(out_dir)
    image_size = 32
    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4},
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": image_size,
            "patch_size": 8,
        },
        projection_dim=32,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        checker = StableDiffusionSafetyChecker(config).eval()
        threshold = -2.0 if flag_everything else 2.0
        with torch.no_grad():
            checker.concept_embeds.normal_()
            checker.special_care_embeds.normal_()
            checker.concept_embeds_weights.fill_(threshold)
            checker.special_care_embeds_weights.fill_(2.0)
    checker.save_pretrained(out_dir, safe_serialization=True)
    processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor.save_pretrained(out_dir)
    return out_dir


def _build_pipeline(family: Family, *, inpaint: bool = False) -> DiffusionPipeline:
    tokenizer = _build_tokenizer()
    text_config = _text_encoder_config(tokenizer)
    in_channels = INPAINT_UNET_CHANNELS if inpaint else LATENT_CHANNELS
    if family == "sd15":
        return (StableDiffusionInpaintPipeline if inpaint else StableDiffusionPipeline)(
            vae=_build_vae(norm_num_groups=2),
            text_encoder=CLIPTextModel(text_config),
            tokenizer=tokenizer,
            unet=_build_sd15_unet(in_channels),
            scheduler=DDIMScheduler(**SCHEDULE, clip_sample=False, set_alpha_to_one=False),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    if family == "sdxl":
        return (StableDiffusionXLInpaintPipeline if inpaint else StableDiffusionXLPipeline)(
            vae=_build_vae(norm_num_groups=32),
            text_encoder=CLIPTextModel(text_config),
            text_encoder_2=CLIPTextModelWithProjection(text_config),
            tokenizer=tokenizer,
            tokenizer_2=tokenizer,
            unet=_build_sdxl_unet(text_config, in_channels),
            scheduler=EulerDiscreteScheduler(**SCHEDULE, timestep_spacing="leading"),
        )
    raise ValueError(f"unknown model family {family!r}; expected 'sd15' or 'sdxl'")


def _build_sd15_unet(in_channels: int = LATENT_CHANNELS) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=in_channels,
        out_channels=LATENT_CHANNELS,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=2,
    )


def _build_sdxl_unet(text_config: CLIPTextConfig, in_channels: int = LATENT_CHANNELS) -> UNet2DConditionModel:
    """SDXL conditions on both encoders' hidden states (concatenated) and on size/crop ids."""
    addition_time_embed_dim = 8
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=in_channels,
        out_channels=LATENT_CHANNELS,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=addition_time_embed_dim,
        transformer_layers_per_block=(1, 2),
        # six time ids (original size, crop, target size) plus the pooled text embedding
        projection_class_embeddings_input_dim=6 * addition_time_embed_dim + text_config.projection_dim,
        cross_attention_dim=2 * text_config.hidden_size,
        norm_num_groups=1,
    )


def _build_vae(norm_num_groups: int) -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=norm_num_groups,
    )


def _text_encoder_config(tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    """Special-token ids come from our own vocab so CLIP pools at the real end-of-text token."""
    return CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=5,
        vocab_size=1000,
        hidden_act="gelu",
        projection_dim=32,
    )


def _build_tokenizer() -> CLIPTokenizer:
    """Write a byte-level CLIP BPE vocab small enough for vocab_size 1000 and load it back.

    The files only seed the tokenizer; save_pretrained later writes the pipeline's own copy.
    """
    vocab, merges = _tiny_bpe_vocab()
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = Path(tmp) / "vocab.json", Path(tmp) / "merges.txt"
        vocab_file.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        merges_file.write_text(
            "#version: 0.2\n" + "".join(f"{left} {right}\n" for left, right in merges), encoding="utf-8"
        )
        return CLIPTokenizer(vocab=str(vocab_file), merges=str(merges_file), model_max_length=77)


def _tiny_bpe_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [symbol + "</w>" for symbol in symbols]
    merges: list[tuple[str, str]] = []
    for word in MERGE_WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
            tokens.append(pieces[0])
    unique_tokens = list(dict.fromkeys(tokens)) + [BOS_TOKEN, EOS_TOKEN]
    unique_merges = list(dict.fromkeys(merges))
    return {token: index for index, token in enumerate(unique_tokens)}, unique_merges


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable-character table, so every byte has a token."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codepoints = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codepoints.append(256 + extra)
            extra += 1
    return {byte: chr(codepoint) for byte, codepoint in zip(printable, codepoints)}


def _save_random_lora(
    pipeline_class: type[DiffusionPipeline],
    template: dict[str, torch.Tensor],
    path: Path,
    seed: int,
    *,
    std: float = LORA_INIT_STD,
) -> Path:
    """PEFT zero-initialises lora_B (a no-op LoRA), so every tensor gets seeded random values.

    Values are drawn in float32 (the same numbers for any template) and stored in the template's
    dtype, so a float16 model's template gives float16 files, as published LoRAs mostly are.
    A full-size model needs a smaller `std` than the tiny one to keep its activations finite.
    """
    generator = torch.Generator().manual_seed(seed)
    layers = {key: (torch.randn(t.shape, generator=generator) * std).to(t.dtype) for key, t in template.items()}
    pipeline_class.save_lora_weights(path.parent, unet_lora_layers=layers, weight_name=path.name)
    return path


def _unet_lora_template(unet: UNet2DConditionModel, rank: int = LORA_RANK) -> dict[str, torch.Tensor]:
    """Key names and shapes of an attention LoRA (alpha = rank), taken from PEFT itself, sorted for stable files.

    The UNet is wrapped with PEFT layers as a side effect, so call this only after it was saved.
    """
    unet.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGET_MODULES),
        adapter_name="template",
    )
    try:
        state_dict = get_peft_model_state_dict(unet, adapter_name="template")
    finally:
        unet.delete_adapters("template")
    return dict(sorted(state_dict.items()))


# --- fixtures for unet_name, variant, kohya / text-encoder LoRAs and embeddings ---------------


def make_tiny_unet(out_dir: Path, family: Family = "sdxl", seed: int = 1) -> Path:
    """A diffusers U-Net folder with the tiny family's config and other (seeded) weights.

    Fits the tiny pipeline of the same family, so as `unet_name` it changes the image; the other
    family's one does not fit (different cross-attention width), which must be refused.
    """
    out_dir = Path(out_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = _build_sd15_unet() if family == "sd15" else _build_sdxl_unet(_text_encoder_config(_build_tokenizer()))
    unet.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def make_tiny_variant(pipeline_dir: Path, variant: str = "fp16", seed: int = 1) -> Path:
    """Add `*.{variant}.safetensors` files (float16, with a differently seeded U-Net) to a tiny pipeline.

    Real variant files hold the same weights at another precision; these hold other U-Net weights
    too, so a test can see from the image that `variant` really picked them.
    """
    pipeline_dir = Path(pipeline_dir)
    pipe = DiffusionPipeline.from_pretrained(str(pipeline_dir), use_safetensors=True, dtype=torch.float16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        other = UNet2DConditionModel.from_config(pipe.unet.config)
    pipe.unet.load_state_dict(other.state_dict())
    with tempfile.TemporaryDirectory() as tmp:
        for name, component in pipe.components.items():
            if isinstance(component, torch.nn.Module):
                model: Any = component
                model.save_pretrained(Path(tmp) / name, variant=variant, safe_serialization=True)
        for file in Path(tmp).rglob(f"*.{variant}.safetensors"):
            target = pipeline_dir / file.relative_to(tmp)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, target)
    return pipeline_dir


LoraFormat = Literal["peft", "kohya"]
# What kohya's sd-scripts trains by default: every attention / feed-forward projection of the
# U-Net's transformer blocks, and attention + MLP of each text encoder layer.
KOHYA_UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
KOHYA_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2"}
LoraComponent = Literal["unet", "text_encoder", "text_encoder_2"]


def make_tiny_lora(
    path: Path,
    family: Family = "sdxl",
    *,
    seed: int = 1,
    lora_format: LoraFormat = "peft",
    alpha: float | None = None,
    components: Sequence[LoraComponent] | None = None,
    fold_alpha: bool = False,
) -> Path:
    """One seeded random LoRA for the tiny `family` pipeline, written in the format asked for.

    The same seed gives the same matrices in every format, so files can be compared:
    - "peft": diffusers' `save_lora_weights` (keys `unet.….lora_A.weight`); `alpha` is stored
      as diffusers does, in the header's `lora_adapter_metadata` (`lora_alpha`).
    - "kohya": the kohya / A1111 layout (`lora_unet_…`, `lora_te_…` / `lora_te1_…` /
      `lora_te2_…`, `.lora_down.weight` / `.lora_up.weight`, one `.alpha` per layer); SDXL U-Net
      names use the original `input_blocks` / `middle_block` / `output_blocks` layout, as
      sd-scripts writes them. Text-encoder names keep the `text_model.` prefix that
      transformers < 5 had (what published files carry).
    `fold_alpha` multiplies alpha / rank into the up matrices and writes no alpha: the same
    LoRA, as a file without alpha. `components` defaults to the U-Net and every text encoder.
    """
    path = Path(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        pipe = _build_pipeline(family)
    available: list[LoraComponent] = (
        ["unet", "text_encoder", "text_encoder_2"] if family == "sdxl" else ["unet", "text_encoder"]
    )
    chosen = list(components) if components is not None else available
    if unknown := set(chosen) - set(available):
        raise ValueError(f"a {family} pipeline has no {', '.join(sorted(unknown))}")
    generator = torch.Generator().manual_seed(seed)
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for component in available:
        model = getattr(pipe, component)
        targets = KOHYA_UNET_TARGETS if component == "unet" else TEXT_ENCODER_TARGETS
        # Drawn for every component, so one component's matrices do not depend on which others are chosen.
        drawn = {
            key: torch.randn(shape, generator=generator) * LORA_INIT_STD
            for key, shape in _linear_lora_shapes(model, targets).items()
        }
        if component in chosen:
            layers[component] = drawn
    if fold_alpha and alpha is not None:
        layers = {
            component: {key: t * (alpha / LORA_RANK) if ".lora_B." in key else t for key, t in tensors.items()}
            for component, tensors in layers.items()
        }
        alpha = None
    path.parent.mkdir(parents=True, exist_ok=True)
    if lora_format == "kohya":
        layers_per_block = pipe.unet.config.layers_per_block
        safetensors.torch.save_file(_kohya_state_dict(layers, family, alpha, layers_per_block), str(path))
        return path
    kwargs: dict[str, Any] = {f"{component}_lora_layers": tensors for component, tensors in layers.items()}
    if alpha is not None:
        for name in layers:
            targets = KOHYA_UNET_TARGETS if name == "unet" else TEXT_ENCODER_TARGETS
            kwargs[f"{name}_lora_adapter_metadata"] = {
                "r": LORA_RANK,
                "lora_alpha": alpha,
                "target_modules": list(targets),
            }
    type(pipe).save_lora_weights(path.parent, weight_name=path.name, **kwargs)
    return path


def make_tiny_embedding(
    out_dir: Path, family: Family = "sdxl", num_vectors: int = 2, *, seed: int = 1, size: int | None = None
) -> Path:
    """A textual-inversion .safetensors for the tiny `family` pipeline; returns the file.

    SD 1.5: `{"emb_params": (num_vectors, 32)}` (A1111 / kohya); SDXL: `{"clip_l": …, "clip_g": …}`,
    one tensor per text encoder. `size` overrides the vector size (e.g. a wrong one, for tests).
    Vectors are drawn with std 1, well above the tiny vocabulary's, so they move the image.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    width = size or _text_encoder_config(_build_tokenizer()).hidden_size
    generator = torch.Generator().manual_seed(seed)
    keys = ["clip_l", "clip_g"] if family == "sdxl" else ["emb_params"]
    tensors = {key: torch.randn((num_vectors, width), generator=generator) for key in keys}
    path = out_dir / f"embedding-{family}-{num_vectors}v-{width}-seed{seed}.safetensors"
    safetensors.torch.save_file(tensors, str(path))
    return path


def _linear_lora_shapes(model: torch.nn.Module, targets: Sequence[str]) -> dict[str, tuple[int, int]]:
    """PEFT-named A/B shapes for every Linear whose name ends in a target, sorted for stable files."""
    prefix = "text_model." if isinstance(model, CLIPTextModel) and not hasattr(model, "text_model") else ""
    shapes: dict[str, tuple[int, int]] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            shapes[f"{prefix}{name}.lora_A.weight"] = (LORA_RANK, module.in_features)
            shapes[f"{prefix}{name}.lora_B.weight"] = (module.out_features, LORA_RANK)
    return dict(sorted(shapes.items()))


def _kohya_state_dict(
    layers: dict[str, dict[str, torch.Tensor]], family: str, alpha: float | None, layers_per_block: int
) -> dict[str, torch.Tensor]:
    state_dict: dict[str, torch.Tensor] = {}
    for component, tensors in layers.items():
        prefix = "lora_te1" if component == "text_encoder" and family == "sdxl" else KOHYA_PREFIXES[component]
        for key, tensor in tensors.items():
            module, _, kind = key.partition(".lora_")
            if component == "unet" and family == "sdxl":
                module = _sgm_module_name(module, layers_per_block)
            name = f"{prefix}_{module.replace('.', '_')}"
            state_dict[f"{name}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = tensor.contiguous()
            if alpha is not None:
                state_dict[f"{name}.alpha"] = torch.tensor(float(alpha))
    return state_dict


def _sgm_module_name(module: str, layers_per_block: int) -> str:
    """diffusers U-Net attention names → the original SDXL layout kohya trains on."""
    if match := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", module):
        block, layer, rest = int(match[1]), int(match[2]), match[3]
        return f"input_blocks.{1 + block * (layers_per_block + 1) + layer}.1.{rest}"
    if match := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", module):
        block, layer, rest = int(match[1]), int(match[2]), match[3]
        return f"output_blocks.{block * (layers_per_block + 1) + layer}.1.{rest}"
    if match := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", module):
        return f"middle_block.1.{match[1]}"
    raise ValueError(f"no original-layout name for U-Net module {module!r}")
