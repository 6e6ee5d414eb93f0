"""Tiny random-weight ControlNets, IP-Adapters and IC-Light models that fit the tiny pipelines.

They are built from a tiny pipeline (serving/tiny.py) so shapes match, and saved in the layouts
users publish them in, so they load through exactly the code real ones do:

- ControlNet: a diffusers folder (`config.json` + `diffusion_pytorch_model.safetensors`, plus an
  `fp16` variant file with other weights, so `variant` visibly changes the image), and the same
  weights as one `.safetensors` file (loaded with a config derived from the base U-Net or given
  by `config_url`).
- IP-Adapter: a folder shaped like `h94/IP-Adapter`: `models/ip-adapter_tiny.safetensors`
  (`image_proj.*` + `ip_adapter.*` keys) and `models/image_encoder/` (a tiny
  CLIPVisionModelWithProjection saved as `model.safetensors`), plus a second encoder under
  `alt_encoder/` whose weights file has a custom name.
- IC-Light: a U-Net offset file, as lllyasviel's `iclight_sd15_fc/fbc.safetensors`: one tensor
  per U-Net parameter, added to the base U-Net, with `conv_in.weight` widened to 8 (foreground)
  or 12 (foreground + background) input channels.

diffusers zero-initialises a ControlNet's output convolutions (a no-op ControlNet), so those get
seeded random values, like the LoRAs in serving/tiny.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

# Large enough to move the tiny models' pixels visibly, small enough to stay finite.
INIT_STD = 0.3
# The tiny VAE downsamples by 2, so the conditioning embedding downsamples once (a real one, 8×: 3 times).
TINY_CONDITIONING_CHANNELS = (16, 32)
IMAGE_ENCODER_SIZE = 32
IMAGE_EMBED_DIM = 32
IP_ADAPTER_WEIGHT_NAME = "ip-adapter_tiny.safetensors"
IP_ADAPTER_SUBFOLDER = "models"
ALT_ENCODER_SUBFOLDER = "alt_encoder"
ALT_ENCODER_WEIGHT_NAME = "encoder_weights.safetensors"
# IC-Light's offset is small everywhere but the new conv_in channels, which carry the foreground.
IC_LIGHT_OFFSET_STD = 0.01


@dataclass(frozen=True)
class TinyControlNet:
    folder: Path
    single_file: Path
    config_file: Path
    variant: str


@dataclass(frozen=True)
class TinyIPAdapter:
    repo: Path
    model_subfolder: str
    weight_name: str
    image_encoder_subfolder: str
    alt_encoder_subfolder: str
    alt_encoder_weight_name: str


@dataclass(frozen=True)
class TinyAdapters:
    controlnet: TinyControlNet
    ip_adapter: TinyIPAdapter
    # IC-Light exists for SD 1.5 only.
    ic_light: Path | None
    ic_light_background: Path | None


def make_tiny_adapters(out_dir: Path, pipeline_dir: Path, family: str, seed: int = 0) -> TinyAdapters:
    """Every adapter kind for the tiny pipeline saved at `pipeline_dir`; same seed, same files."""
    out_dir = Path(out_dir)
    sd15 = family == "sd15"
    return TinyAdapters(
        controlnet=make_tiny_controlnet(out_dir / "controlnet", pipeline_dir, seed=seed),
        ip_adapter=make_tiny_ip_adapter(out_dir / "ip_adapter", pipeline_dir, seed=seed),
        ic_light=make_tiny_ic_light(out_dir / "iclight_fc.safetensors", pipeline_dir, seed=seed) if sd15 else None,
        ic_light_background=(
            make_tiny_ic_light(out_dir / "iclight_fbc.safetensors", pipeline_dir, background=True, seed=seed)
            if sd15
            else None
        ),
    )


def make_tiny_controlnet(out_dir: Path, pipeline_dir: Path, *, seed: int = 0, variant: str = "fp16") -> TinyControlNet:
    out_dir = Path(out_dir)
    unet = _unet(pipeline_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=TINY_CONDITIONING_CHANNELS)
        _randomise_outputs(controlnet, seed)
        folder = out_dir / "diffusers"
        controlnet.save_pretrained(folder, safe_serialization=True)
        single_file = out_dir / "controlnet.safetensors"
        safetensors.torch.save_file(_contiguous(controlnet.state_dict()), str(single_file))
        # The variant holds other weights (still float32 here), so choosing it changes the image.
        _randomise_outputs(controlnet, seed + 1)
        controlnet.save_pretrained(folder, safe_serialization=True, variant=variant)
    config_file = out_dir / "config.json"
    config_file.write_text((folder / "config.json").read_text())
    return TinyControlNet(folder=folder, single_file=single_file, config_file=config_file, variant=variant)


def make_tiny_ip_adapter(out_dir: Path, pipeline_dir: Path, *, seed: int = 0) -> TinyIPAdapter:
    """A plain IP-Adapter (4 image tokens from the encoder's projected embedding) for the tiny U-Net."""
    out_dir = Path(out_dir)
    unet = _unet(pipeline_dir)
    generator = torch.Generator().manual_seed(seed + 100)
    cross_attention_dim = unet.config.cross_attention_dim
    tensors: dict[str, torch.Tensor] = {
        "image_proj.proj.weight": torch.randn(4 * cross_attention_dim, IMAGE_EMBED_DIM, generator=generator) * INIT_STD,
        "image_proj.proj.bias": torch.zeros(4 * cross_attention_dim),
        "image_proj.norm.weight": torch.ones(cross_attention_dim),
        "image_proj.norm.bias": torch.zeros(cross_attention_dim),
    }
    # The original IP-Adapter numbering: cross-attention processors in order, odd ids (1, 3, 5, …).
    key_id = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        hidden_size = _hidden_size(unet, name)
        for proj in ("to_k_ip", "to_v_ip"):
            tensors[f"ip_adapter.{key_id}.{proj}.weight"] = (
                torch.randn(hidden_size, cross_attention_dim, generator=generator) * INIT_STD
            )
        key_id += 2
    models = out_dir / IP_ADAPTER_SUBFOLDER
    models.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(tensors, str(models / IP_ADAPTER_WEIGHT_NAME))
    _save_image_encoder(models / "image_encoder", seed=seed + 200)
    alt = _save_image_encoder(out_dir / ALT_ENCODER_SUBFOLDER, seed=seed + 300)
    (alt / "model.safetensors").rename(alt / ALT_ENCODER_WEIGHT_NAME)
    return TinyIPAdapter(
        repo=out_dir,
        model_subfolder=IP_ADAPTER_SUBFOLDER,
        weight_name=IP_ADAPTER_WEIGHT_NAME,
        image_encoder_subfolder=f"{IP_ADAPTER_SUBFOLDER}/image_encoder",
        alt_encoder_subfolder=ALT_ENCODER_SUBFOLDER,
        alt_encoder_weight_name=ALT_ENCODER_WEIGHT_NAME,
    )


def make_tiny_ic_light(out_path: Path, pipeline_dir: Path, *, background: bool = False, seed: int = 0) -> Path:
    """An IC-Light offset for the tiny SD 1.5 U-Net: 8 input channels (fc) or 12 (fbc, with background)."""
    out_path = Path(out_path)
    unet = _unet(pipeline_dir)
    generator = torch.Generator().manual_seed(seed + (500 if background else 400))
    offset: dict[str, torch.Tensor] = {}
    for name, tensor in unet.state_dict().items():
        offset[name] = torch.randn(tensor.shape, generator=generator) * IC_LIGHT_OFFSET_STD
    conv_in = unet.conv_in.weight
    channels = 12 if background else 8
    widened = torch.randn((conv_in.shape[0], channels, *conv_in.shape[2:]), generator=generator) * INIT_STD
    widened[:, : conv_in.shape[1]] = offset["conv_in.weight"]
    offset["conv_in.weight"] = widened
    out_path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(offset, str(out_path))
    return out_path


def _unet(pipeline_dir: Path) -> UNet2DConditionModel:
    unet = UNet2DConditionModel.from_pretrained(Path(pipeline_dir) / "unet", use_safetensors=True)
    assert isinstance(unet, UNet2DConditionModel)
    return unet


def _randomise_outputs(controlnet: ControlNetModel, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed + 10)
    zero_initialised = [
        *controlnet.controlnet_down_blocks.parameters(),
        *controlnet.controlnet_mid_block.parameters(),
        *controlnet.controlnet_cond_embedding.conv_out.parameters(),
    ]
    with torch.no_grad():
        for parameter in zero_initialised:
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * INIT_STD)


def _save_image_encoder(folder: Path, *, seed: int) -> Path:
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        projection_dim=IMAGE_EMBED_DIM,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_ENCODER_SIZE,
        patch_size=8,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = CLIPVisionModelWithProjection(config).eval()
    encoder.save_pretrained(folder, safe_serialization=True)
    CLIPImageProcessor(
        size={"shortest_edge": IMAGE_ENCODER_SIZE},
        crop_size={"height": IMAGE_ENCODER_SIZE, "width": IMAGE_ENCODER_SIZE},
    ).save_pretrained(folder)
    return folder


def _hidden_size(unet: UNet2DConditionModel, processor_name: str) -> int:
    channels = list(unet.config.block_out_channels)
    if processor_name.startswith("mid_block"):
        return int(channels[-1])
    block = int(processor_name.split(".")[1])
    return int(list(reversed(channels))[block] if processor_name.startswith("up_blocks") else channels[block])


def _contiguous(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().contiguous() for name, tensor in state_dict.items()}


def describe(adapters: TinyAdapters) -> str:
    """What `loraserve make-tiny-model --adapters` prints: one JSON object of paths."""
    cn, ipa = adapters.controlnet, adapters.ip_adapter
    return json.dumps(
        {
            "controlnet": {"path": str(cn.folder), "single_file": str(cn.single_file), "variant": cn.variant},
            "ip_adapter": {
                "path": str(ipa.repo),
                "model_subfolder": ipa.model_subfolder,
                "weight_name": ipa.weight_name,
                "image_encoder_path": str(ipa.repo),
                "image_encoder_subfolder": ipa.image_encoder_subfolder,
            },
            "ic_light_model_url": str(adapters.ic_light) if adapters.ic_light else None,
            "ic_light_background_model_url": str(adapters.ic_light_background)
            if adapters.ic_light_background
            else None,
        },
        indent=2,
    )
