"""A tiny random-weight FLUX.1 pipeline and FLUX LoRAs in the layouts its ecosystem writes, without the Hub.

The pipeline has every part FLUX.1 [dev] has (a guidance-embedding `FluxTransformer2DModel` with
double and single blocks, CLIP-L and T5 text encoders with their tokenizers, a 16-channel VAE
with FLUX's 8× downsampling, the dynamically shifted flow-match Euler scheduler) at widths of a
few dozen, so it goes through `save_pretrained` → `from_pretrained` and denoises a 64×64 image in
well under a second, like the SD families' tiny models (serving/tiny.py). The T5 tokenizer is a
Unigram vocabulary of letters and a few whole words, built by the tokenizers library itself.

LoRAs come in each layout diffusers' `FluxLoraLoaderMixin` reads, with seeded random matrices:
- "peft": diffusers / PEFT keys (`transformer.….lora_A.weight`), as diffusers, ai-toolkit and
  fal's trainers write them; `alpha` goes into the header's `lora_adapter_metadata`.
- "kohya": sd-scripts' FLUX names on the original BFL layout (`lora_unet_double_blocks_0_img_attn_qkv`,
  fused q/k/v, `.alpha` per layer; CLIP as `lora_te1_…`). sd-scripts' single-block `linear1`
  (fused q/k/v/MLP) is written only at FLUX.1's own widths: diffusers' converter splits it at
  3072 × 3 + 12288, which a tiny transformer does not have.
- "xlabs": XLabs' processor names (`double_blocks.0.processor.qkv_lora1.down.weight`), double
  blocks only, as XLabs trains them, without alpha.

Beside the pipeline folder, its transformer as single-file FLUX.1 checkpoints ship one
(`flux1-dev.safetensors`): BFL's original layout, q/k/v fused (serving/flux_checkpoint.py);
`save_flux_all_in_one` adds the VAE and text encoders under ComfyUI's names, as all-in-one files carry them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import safetensors.torch
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel, T5Tokenizer

from serving import flux_checkpoint
from serving.tiny import (
    LORA_INIT_STD,
    LORA_RANK,
    MERGE_WORDS,
    TEXT_ENCODER_TARGETS,
    TinyModel,
    _build_tokenizer,
    _linear_lora_shapes,
    _text_encoder_config,
)

FLUX = "flux"
# The tiny transformer in BFL's layout, next to `pipeline/`.
SINGLE_FILE_NAME = "flux1-tiny-transformer.safetensors"
# Where all-in-one files keep the VAE (original LDM names), CLIP-L (under transformers' `text_model.`) and
# T5, as diffusers reads them.
ALL_IN_ONE_VAE_PREFIX = "vae."
ALL_IN_ONE_CLIP_PREFIX = "text_encoders.clip_l.transformer.text_model."
ALL_IN_ONE_T5_PREFIX = "text_encoders.t5xxl.transformer."
FluxLoraFormat = Literal["peft", "kohya", "xlabs"]
FluxLoraComponent = Literal["transformer", "text_encoder"]
# FLUX.1's latents: 16 channels, packed 2×2 into the transformer's 64 input features.
LATENT_CHANNELS = 16
PACKED_CHANNELS = 4 * LATENT_CHANNELS
# Two heads of 16: the rotary axes (text index, row, column) must add up to the head width.
ATTENTION_HEADS = 2
HEAD_DIM = 16
ROPE_AXES = (4, 4, 8)
DOUBLE_BLOCKS = 2
SINGLE_BLOCKS = 2
T5_MAX_LENGTH = 512
# FLUX.1 [dev]'s scheduler_config.json.
SCHEDULER = {
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
# FLUX.1's VAE latent statistics (its vae/config.json).
VAE_SCALING_FACTOR = 0.3611
VAE_SHIFT_FACTOR = 0.1159
# Every Linear in the transformer blocks: attention, MLPs and the modulation projections, what
# ai-toolkit and fal's trainers adapt.
BLOCK_PREFIXES = ("transformer_blocks.", "single_transformer_blocks.")
# sd-scripts' names for a double block's layers, with the diffusers layers each one becomes.
KOHYA_DOUBLE = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn_proj": ("attn.to_out.0",),
    "img_mlp_0": ("ff.net.0.proj",),
    "img_mlp_2": ("ff.net.2",),
    "img_mod_lin": ("norm1.linear",),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn_proj": ("attn.to_add_out",),
    "txt_mlp_0": ("ff_context.net.0.proj",),
    "txt_mlp_2": ("ff_context.net.2",),
    "txt_mod_lin": ("norm1_context.linear",),
}
KOHYA_SINGLE = {"linear2": ("proj_out",), "modulation_lin": ("norm.linear",)}
# sd-scripts' fused single-block input projection, which diffusers' converter splits at FLUX.1's widths only.
KOHYA_LINEAR1 = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
FLUX1_INNER_DIM = 3072
# XLabs' attention processor LoRAs: `1` is the image stream, `2` the text stream.
XLABS_DOUBLE = {
    "qkv_lora1": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "proj_lora1": ("attn.to_out.0",),
    "qkv_lora2": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "proj_lora2": ("attn.to_add_out",),
}


# FLUX.1 [dev]'s transformer (its transformer/config.json), for `build_flux_transformer`: the
# benchmarks build it with fewer blocks, the memory figures on the meta device.
FLUX1_DEV_TRANSFORMER: dict[str, Any] = {
    "num_layers": 19,
    "num_single_layers": 38,
    "num_attention_heads": 24,
    "attention_head_dim": 128,
    "axes_dims_rope": (16, 56, 56),
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
}


def flux1_dev_models() -> tuple[FluxTransformer2DModel, T5EncoderModel, CLIPTextModel, AutoencoderKL]:
    """FLUX.1 [dev]'s transformer, T5-XXL encoder, CLIP-L text encoder and VAE as their configs give them,
    built under the caller's device and dtype (the meta device for byte counts, FakeTensorMode for activations)."""
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu"
        )
    )
    clip = CLIPTextModel(
        CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
    )
    vae = _build_flux_vae([128, 256, 512, 512], layers_per_block=2)
    return build_flux_transformer(**FLUX1_DEV_TRANSFORMER), t5, clip, vae


def make_tiny_flux_model(out_dir: Path, num_loras: int = 3, seed: int = 0) -> TinyModel:
    """Build and save the tiny FLUX pipeline plus `num_loras` PEFT-layout LoRAs; same seed, same files.
    Its transformer is also written as a BFL-layout single file, `SINGLE_FILE_NAME`."""
    out_dir = Path(out_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = build_tiny_flux_pipeline()
    pipeline_dir = out_dir / "pipeline"
    pipe.save_pretrained(pipeline_dir, safe_serialization=True)
    save_flux_single_file(pipe.transformer, out_dir / SINGLE_FILE_NAME)
    lora_paths = [
        make_tiny_flux_lora(out_dir / "loras" / f"lora_{i}.safetensors", seed=seed * 1000 + i + 1, pipe=pipe)
        for i in range(num_loras)
    ]
    return TinyModel(pipeline_dir=pipeline_dir, lora_paths=lora_paths, family=FLUX)


def make_tiny_flux_layouts(folder: Path, seed: int = 0) -> list[Path]:
    """One LoRA for the tiny FLUX pipeline in each other layout: kohya with a CLIP part (alpha 8), XLabs,
    and a CLIP-only PEFT one; `make_tiny_flux_model`'s own are PEFT transformer LoRAs."""
    folder = Path(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        pipe = build_tiny_flux_pipeline()
    both: tuple[FluxLoraComponent, ...] = ("transformer", "text_encoder")
    base = seed * 1000 + 500
    return [
        make_tiny_flux_lora(
            folder / "kohya.safetensors", seed=base, lora_format="kohya", alpha=8, components=both, pipe=pipe
        ),
        make_tiny_flux_lora(folder / "xlabs.safetensors", seed=base + 1, lora_format="xlabs", pipe=pipe),
        make_tiny_flux_lora(folder / "text_encoder.safetensors", seed=base + 2, components=("text_encoder",), pipe=pipe),
    ]


def save_flux_single_file(transformer: FluxTransformer2DModel, path: Path, *, prefix: str = "") -> Path:
    """`transformer` as a single-file checkpoint in BFL's layout, each name after `prefix` (all-in-one
    files use `flux_checkpoint.ALL_IN_ONE_PREFIX`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(flux_checkpoint.to_bfl(transformer.state_dict(), prefix), str(path))
    return path


def save_flux_all_in_one(pipe: FluxPipeline, path: Path, *, vae: bool = True) -> Path:
    """`pipe`'s transformer (BFL's layout, under `model.diffusion_model.`), VAE (unless `vae` is False)
    and text encoders in one file."""
    tensors = flux_checkpoint.to_bfl(pipe.transformer.state_dict(), flux_checkpoint.ALL_IN_ONE_PREFIX)
    if vae:
        tensors.update({ALL_IN_ONE_VAE_PREFIX + key: t for key, t in _ldm_vae(pipe.vae).items()})
    clip = pipe.text_encoder.state_dict()
    # transformers >= 5.6 flattens CLIPTextModel; all-in-one files keep the `text_model.` level.
    tensors.update({ALL_IN_ONE_CLIP_PREFIX + key.removeprefix("text_model."): t for key, t in clip.items()})
    tensors.update({ALL_IN_ONE_T5_PREFIX + key: t for key, t in pipe.text_encoder_2.state_dict().items()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({key: t.detach().clone().contiguous() for key, t in tensors.items()}, str(path))
    return path


def _ldm_vae(vae: AutoencoderKL) -> dict[str, torch.Tensor]:
    """The VAE under the original LDM names: the inverse of diffusers' `convert_ldm_vae_checkpoint`
    (up blocks numbered from the bottom, the mid attention's projections as 1×1 convolutions)."""
    last_up = len(vae.config.up_block_types) - 1
    renames: list[tuple[str, Any]] = [
        (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block."),
        (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
        (r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.", lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.mid.attn_1."),
        (r"^decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{last_up - int(m[1])}.block."),
        (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{last_up - int(m[1])}.upsample."),
        (r"\.conv_shortcut\.", ".nin_shortcut."),
        (r"\.attn_1\.group_norm\.", ".attn_1.norm."),
        (r"\.attn_1\.to_(q|k|v)\.", r".attn_1.\1."),
        (r"\.attn_1\.to_out\.0\.", ".attn_1.proj_out."),
    ]
    ldm: dict[str, torch.Tensor] = {}
    for key, tensor in vae.state_dict().items():
        for pattern, new in renames:
            key = re.sub(pattern, new, key)
        is_projection = ".attn_1." in key and ".norm." not in key and key.endswith(".weight")
        ldm[key] = tensor[:, :, None, None] if is_projection else tensor
    return ldm


def build_tiny_flux_pipeline() -> FluxPipeline:
    """The tiny FLUX pipeline with weights from the current RNG state (seed it first)."""
    clip_tokenizer = _build_tokenizer()
    t5_tokenizer = _build_t5_tokenizer()
    clip_config = _text_encoder_config(clip_tokenizer)
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tokenizer),
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            pad_token_id=t5_tokenizer.pad_token_id,
            eos_token_id=t5_tokenizer.eos_token_id,
            decoder_start_token_id=t5_tokenizer.pad_token_id,
        )
    )
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER),
        vae=_build_flux_vae([8, 16, 16, 16], norm_num_groups=8),
        text_encoder=CLIPTextModel(clip_config),
        tokenizer=clip_tokenizer,
        text_encoder_2=t5,
        tokenizer_2=t5_tokenizer,
        transformer=build_flux_transformer(
            joint_attention_dim=t5.config.d_model, pooled_projection_dim=clip_config.hidden_size
        ),
    )


def build_flux_transformer(
    *,
    joint_attention_dim: int = 32,
    pooled_projection_dim: int = 32,
    num_layers: int = DOUBLE_BLOCKS,
    num_single_layers: int = SINGLE_BLOCKS,
    num_attention_heads: int = ATTENTION_HEADS,
    attention_head_dim: int = HEAD_DIM,
    axes_dims_rope: Sequence[int] = ROPE_AXES,
) -> FluxTransformer2DModel:
    """A FLUX.1 [dev]-structured transformer, tiny by default; `FLUX1_DEV_TRANSFORMER` gives FLUX.1's sizes."""
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=PACKED_CHANNELS,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=attention_head_dim,
        num_attention_heads=num_attention_heads,
        joint_attention_dim=joint_attention_dim,
        pooled_projection_dim=pooled_projection_dim,
        guidance_embeds=True,
        axes_dims_rope=tuple(axes_dims_rope),
    )


def _build_flux_vae(block_out_channels: Sequence[int], **options: Any) -> AutoencoderKL:
    """FLUX.1's VAE structure at these widths: four blocks (8× downsampling, so image sides go in multiples
    of 16), 16 latent channels, no quant convolutions, its scaling and shift."""
    return AutoencoderKL(
        block_out_channels=list(block_out_channels),
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        latent_channels=LATENT_CHANNELS,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=VAE_SCALING_FACTOR,
        shift_factor=VAE_SHIFT_FACTOR,
        **options,
    )


def _build_t5_tokenizer() -> T5Tokenizer:
    """A Unigram vocabulary: special tokens, letters, and the tiny CLIP vocabulary's whole words."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    pieces += [(letter, -5.0) for letter in "abcdefghijklmnopqrstuvwxyz"]
    pieces += [("▁" + word, -2.0) for word in MERGE_WORDS]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=T5_MAX_LENGTH)


def make_tiny_flux_lora(
    path: Path,
    *,
    seed: int = 1,
    lora_format: FluxLoraFormat = "peft",
    alpha: float | None = None,
    components: Sequence[FluxLoraComponent] = ("transformer",),
    pipe: FluxPipeline | None = None,
    transformer: FluxTransformer2DModel | None = None,
    std: float = LORA_INIT_STD,
    rank: int = LORA_RANK,
) -> Path:
    """One seeded random LoRA of `rank` for the tiny FLUX pipeline (or `pipe` / `transformer`), in `lora_format`.

    `alpha` (default: the rank) scales like PEFT's alpha / r; XLabs files have none, so it must stay
    unset there. A text-encoder part ("text_encoder", CLIP) needs `pipe` or the tiny pipeline.
    """
    path = Path(path)
    if lora_format == "xlabs" and (alpha is not None or "text_encoder" in components):
        raise ValueError("XLabs FLUX LoRAs have neither alpha nor text-encoder layers")
    if transformer is None:
        if pipe is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                pipe = build_tiny_flux_pipeline()
        transformer = pipe.transformer
    generator = torch.Generator().manual_seed(seed)

    def draw(shape: tuple[int, ...]) -> torch.Tensor:
        return (torch.randn(shape, generator=generator) * std).to(transformer.dtype)

    state_dict: dict[str, torch.Tensor] = {}
    text_layers: dict[str, torch.Tensor] = {}
    if "transformer" in components:
        state_dict = _TRANSFORMER_WRITERS[lora_format](transformer, draw, alpha, rank)
    if "text_encoder" in components:
        if pipe is None:
            raise ValueError("a text-encoder LoRA needs the pipeline")
        shapes = _linear_lora_shapes(pipe.text_encoder, TEXT_ENCODER_TARGETS)
        # The shapes are at the tiny models' rank: `rank` replaces it.
        text_layers = {
            key: draw((rank, shape[1]) if ".lora_A." in key else (shape[0], rank)) for key, shape in shapes.items()
        }
    path.parent.mkdir(parents=True, exist_ok=True)
    if lora_format == "peft":
        kwargs: dict[str, Any] = {}
        if state_dict:
            kwargs["transformer_lora_layers"] = state_dict
        if text_layers:
            kwargs["text_encoder_lora_layers"] = text_layers
        if alpha is not None:
            for name, layers in (("transformer", state_dict), ("text_encoder", text_layers)):
                if layers:
                    # Text-encoder names as written differ from the module names (transformers < 5's `text_model.`).
                    targets = (
                        list(TEXT_ENCODER_TARGETS)
                        if name == "text_encoder"
                        else sorted({key.rsplit(".lora_", 1)[0] for key in layers})
                    )
                    metadata = {"r": rank, "lora_alpha": alpha, "target_modules": targets}
                    kwargs[f"{name}_lora_adapter_metadata"] = metadata
        FluxPipeline.save_lora_weights(path.parent, weight_name=path.name, **kwargs)
        return path
    for key, tensor in text_layers.items():
        module, _, kind = key.partition(".lora_")
        name = "lora_te1_" + module.replace(".", "_")
        state_dict[f"{name}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = tensor
        if alpha is not None:
            state_dict[f"{name}.alpha"] = torch.tensor(float(alpha))
    safetensors.torch.save_file({key: t.contiguous() for key, t in sorted(state_dict.items())}, str(path))
    return path


def _block_linears(transformer: FluxTransformer2DModel) -> dict[str, torch.nn.Linear]:
    return {
        name: module
        for name, module in transformer.named_modules()
        if isinstance(module, torch.nn.Linear) and name.startswith(BLOCK_PREFIXES)
    }


def _peft_layers(
    transformer: FluxTransformer2DModel, draw: Any, _alpha: float | None, rank: int
) -> dict[str, torch.Tensor]:
    layers: dict[str, torch.Tensor] = {}
    for name, module in sorted(_block_linears(transformer).items()):
        layers[f"{name}.lora_A.weight"] = draw((rank, module.in_features))
        layers[f"{name}.lora_B.weight"] = draw((module.out_features, rank))
    return layers


def _fused_layers(
    transformer: FluxTransformer2DModel,
    draw: Any,
    alpha: float | None,
    rank: int,
    names: Mapping[str, tuple[str, ...]],
    block: str,
    count: int,
    key: Any,
) -> dict[str, torch.Tensor]:
    """One down / up pair per original (fused) layer: the up matrix spans all the diffusers layers it feeds."""
    modules = dict(transformer.named_modules())
    layers: dict[str, torch.Tensor] = {}
    for index in range(count):
        for original, targets in names.items():
            linears = [modules[f"{block}.{index}.{target}"] for target in targets]
            assert all(isinstance(linear, torch.nn.Linear) for linear in linears)
            down_key, up_key, alpha_key = key(index, original)
            layers[down_key] = draw((rank, linears[0].in_features))
            layers[up_key] = draw((sum(linear.out_features for linear in linears), rank))
            if alpha is not None and alpha_key is not None:
                layers[alpha_key] = torch.tensor(float(alpha))
    return layers


def _kohya_layers(
    transformer: FluxTransformer2DModel, draw: Any, alpha: float | None, rank: int
) -> dict[str, torch.Tensor]:
    def key(prefix: str) -> Any:
        def names(index: int, original: str) -> tuple[str, str, str]:
            name = f"lora_unet_{prefix}_{index}_{original}"
            return f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"

        return names

    config = transformer.config
    single: dict[str, tuple[str, ...]] = dict(KOHYA_SINGLE)
    if config.num_attention_heads * config.attention_head_dim == FLUX1_INNER_DIM:
        single = {**KOHYA_LINEAR1, **KOHYA_SINGLE}
    return {
        **_fused_layers(
            transformer, draw, alpha, rank, KOHYA_DOUBLE, "transformer_blocks", config.num_layers, key("double_blocks")
        ),
        **_fused_layers(
            transformer,
            draw,
            alpha,
            rank,
            single,
            "single_transformer_blocks",
            config.num_single_layers,
            key("single_blocks"),
        ),
    }


def _xlabs_layers(
    transformer: FluxTransformer2DModel, draw: Any, alpha: float | None, rank: int
) -> dict[str, torch.Tensor]:
    def key(index: int, original: str) -> tuple[str, str, None]:
        name = f"double_blocks.{index}.processor.{original}"
        return f"{name}.down.weight", f"{name}.up.weight", None

    blocks = transformer.config.num_layers
    return _fused_layers(transformer, draw, alpha, rank, XLABS_DOUBLE, "transformer_blocks", blocks, key)


_TRANSFORMER_WRITERS = {"peft": _peft_layers, "kohya": _kohya_layers, "xlabs": _xlabs_layers}
