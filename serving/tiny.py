"""Tiny random-weight SD 1.5 / SDXL pipelines and LoRAs, built without the Hugging Face Hub.

Tests and local demos need real diffusers checkpoints that go through exactly the code users
run (save_pretrained → from_pretrained, safetensors LoRAs → load_lora_weights), but this
project has no hub access and no GPU. The shapes follow diffusers' own fast-test components,
so a whole pipeline fits in a few megabytes and denoises a 64×64 image in well under a second.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
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

# Standard Stable Diffusion noise-schedule values, shared by both families.
SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1}


@dataclass(frozen=True)
class TinyModel:
    """Where a built tiny model lives, so callers can load it by path like any user model."""

    pipeline_dir: Path
    lora_paths: list[Path]
    family: str


def make_tiny_model(
    out_dir: Path, family: Family = "sdxl", num_loras: int = 3, seed: int = 0
) -> TinyModel:
    """Build, save and describe a tiny pipeline plus `num_loras` LoRAs; same seed, same files."""
    out_dir = Path(out_dir)
    # Seeded random weights, without disturbing the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = _build_pipeline(family)
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


def _build_pipeline(family: Family) -> DiffusionPipeline:
    tokenizer = _build_tokenizer()
    text_config = _text_encoder_config(tokenizer)
    if family == "sd15":
        return StableDiffusionPipeline(
            vae=_build_vae(norm_num_groups=2),
            text_encoder=CLIPTextModel(text_config),
            tokenizer=tokenizer,
            unet=_build_sd15_unet(),
            scheduler=DDIMScheduler(**SCHEDULE, clip_sample=False, set_alpha_to_one=False),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    if family == "sdxl":
        return StableDiffusionXLPipeline(
            vae=_build_vae(norm_num_groups=32),
            text_encoder=CLIPTextModel(text_config),
            text_encoder_2=CLIPTextModelWithProjection(text_config),
            tokenizer=tokenizer,
            tokenizer_2=tokenizer,
            unet=_build_sdxl_unet(text_config),
            scheduler=EulerDiscreteScheduler(**SCHEDULE, timestep_spacing="leading"),
        )
    raise ValueError(f"unknown model family {family!r}; expected 'sd15' or 'sdxl'")


def _build_sd15_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=2,
    )


def _build_sdxl_unet(text_config: CLIPTextConfig) -> UNet2DConditionModel:
    """SDXL conditions on both encoders' hidden states (concatenated) and on size/crop ids."""
    addition_time_embed_dim = 8
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
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
    pipeline_class: type[DiffusionPipeline], template: dict[str, torch.Tensor], path: Path, seed: int
) -> Path:
    """PEFT zero-initialises lora_B (a no-op LoRA), so every tensor gets seeded random values."""
    generator = torch.Generator().manual_seed(seed)
    layers = {key: torch.randn(t.shape, generator=generator) * LORA_INIT_STD for key, t in template.items()}
    pipeline_class.save_lora_weights(path.parent, unet_lora_layers=layers, weight_name=path.name)
    return path


def _unet_lora_template(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """Key names and shapes of a rank-4 attention LoRA, taken from PEFT itself, sorted for stable files.

    The UNet is wrapped with PEFT layers as a side effect, so call this only after it was saved.
    """
    unet.add_adapter(
        LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, target_modules=LORA_TARGET_MODULES),
        adapter_name="template",
    )
    try:
        state_dict = get_peft_model_state_dict(unet, adapter_name="template")
    finally:
        unet.delete_adapters("template")
    return dict(sorted(state_dict.items()))
