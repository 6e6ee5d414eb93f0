"""ControlNets for one request: loading them safely, checking they fit, and composing the pipeline.

Weights come as a diffusers folder (`config.json` + `diffusion_pytorch_model[.variant].safetensors`,
sharded or not) or as one `.safetensors` file in diffusers or original (`control_model.*`)
layout. Only safetensors are read. A single file carries no config: `config_url` gives one, else
it is derived from the base U-Net the way `ControlNetModel.from_unet` does (every SD 1.5 / SDXL
ControlNet mirrors its U-Net's encoder), with a conditioning embedding that downsamples as much
as the VAE does.

Any number of ControlNets run together through diffusers' `MultiControlNetModel`, each with its
own scale and timestep window (`control_guidance_start/end`). An optional mask limits where a
ControlNet acts: its residuals are multiplied, at every resolution, by the mask (binarised at
`mask_threshold`, then area-averaged down to that resolution), so outside the mask the U-Net
sees no control from it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import PIL.Image
import safetensors.torch
import torch
import torch.nn.functional as F
from accelerate import init_empty_weights
from diffusers import (
    ControlNetModel,
    DiffusionPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

from serving.errors import AdapterLoadError, OptionUnavailableError

if TYPE_CHECKING:
    from collections.abc import Iterator

    from serving.model_cache import ModelCache
    from serving.request import ControlNetSpec

WEIGHTS_NAME = "diffusion_pytorch_model"
# Conditioning-embedding widths of every published SD ControlNet; one entry per 2× downsampling + 1.
CONDITIONING_CHANNELS = (16, 32, 96, 256)
# The image must line up with the U-Net's deepest feature map (3 downsamplings of the latent, 8× VAE).
MASK_MULTIPLE = 32
MAX_REASON_CHARS = 300
# Config fields a ControlNet shares with the U-Net it was built from (ControlNetModel.from_unet).
_FROM_UNET = (
    "encoder_hid_dim",
    "encoder_hid_dim_type",
    "addition_embed_type",
    "addition_time_embed_dim",
    "transformer_layers_per_block",
    "in_channels",
    "flip_sin_to_cos",
    "freq_shift",
    "down_block_types",
    "only_cross_attention",
    "block_out_channels",
    "layers_per_block",
    "downsample_padding",
    "mid_block_scale_factor",
    "act_fn",
    "norm_num_groups",
    "norm_eps",
    "cross_attention_dim",
    "attention_head_dim",
    "num_attention_heads",
    "use_linear_projection",
    "class_embed_type",
    "num_class_embeds",
    "upcast_attention",
    "resnet_time_scale_shift",
    "projection_class_embeddings_input_dim",
    "mid_block_type",
)
# What must agree between a ControlNet and the U-Net it feeds residuals into.
_MUST_MATCH = ("cross_attention_dim", "block_out_channels", "addition_embed_type", "layers_per_block")


class MaskedMultiControlNet(MultiControlNetModel):
    """diffusers' MultiControlNetModel, with each net's residuals multiplied by its own mask (or not)."""

    def __init__(self, controlnets: Sequence[ControlNetModel], masks: Sequence[torch.Tensor | None]) -> None:
        super().__init__(list(controlnets))
        # Plain attribute, not buffers: the masks belong to this request and must not be saved or moved.
        self.masks = list(masks)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: Any,
        encoder_hidden_states: torch.Tensor,
        controlnet_cond: list[torch.Tensor],
        conditioning_scale: list[float],
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guess_mode: bool = False,
        return_dict: bool = True,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        down_total: list[torch.Tensor] | None = None
        mid_total: torch.Tensor | None = None
        for image, scale, net, mask in zip(controlnet_cond, conditioning_scale, self.nets, self.masks):
            down, mid = net(
                sample=sample,
                timestep=timestep,
                encoder_hidden_states=encoder_hidden_states,
                controlnet_cond=image,
                conditioning_scale=scale,
                class_labels=class_labels,
                timestep_cond=timestep_cond,
                attention_mask=attention_mask,
                added_cond_kwargs=added_cond_kwargs,
                cross_attention_kwargs=cross_attention_kwargs,
                guess_mode=guess_mode,
                return_dict=False,
            )
            if mask is not None:
                down = [residual * _mask_at(mask, residual) for residual in down]
                mid = mid * _mask_at(mask, mid)
            if down_total is None or mid_total is None:
                down_total, mid_total = list(down), mid
            else:
                down_total = [total + residual for total, residual in zip(down_total, down)]
                mid_total = mid_total + mid
        assert down_total is not None and mid_total is not None
        return down_total, mid_total


def _mask_at(mask: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """The pixel mask (1, 1, H, W) averaged down to the residual's spatial size."""
    scaled = F.interpolate(mask.to(residual.device, torch.float32), size=residual.shape[-2:], mode="area")
    return scaled.to(residual.dtype)


def mask_tensor(mask: PIL.Image.Image, threshold: float, width: int, height: int) -> torch.Tensor:
    """White (above `threshold` of full brightness) is where the ControlNet acts; (1, 1, height, width)."""
    gray = mask.convert("L").resize((width, height), PIL.Image.Resampling.BILINEAR)
    values = np.asarray(gray, dtype=np.float32) / 255.0
    return torch.from_numpy((values > threshold).astype(np.float32))[None, None]


def check_images(specs: Sequence[ControlNetSpec]) -> None:
    for i, spec in enumerate(specs):
        prefix = f"controlnets[{i}]"
        if spec.image is None:
            raise OptionUnavailableError(
                f"{prefix}.{spec.image_field}", f"{prefix}.{spec.image_field}: no control image"
            )
        if spec.mask is None:
            continue
        field_name = f"{prefix}.{spec.mask_field}"
        if spec.mask.size != spec.image.size:
            raise OptionUnavailableError(
                field_name,
                f"{field_name}: the mask is {spec.mask.width}x{spec.mask.height} but the control image is "
                f"{spec.image.width}x{spec.image.height}; they must be the same size",
            )
        if spec.mask.width % MASK_MULTIPLE or spec.mask.height % MASK_MULTIPLE:
            raise OptionUnavailableError(
                field_name,
                f"{field_name}: the mask (and control image) is {spec.mask.width}x{spec.mask.height}; both sides must "
                f"be divisible by {MASK_MULTIPLE}",
            )


def cached_controlnet(
    models: ModelCache,
    spec: ControlNetSpec,
    base_unet: Any,
    vae_scale_factor: int,
    device: torch.device,
    dtype: torch.dtype,
    field_prefix: str,
    model_name: str,
) -> ControlNetModel:
    """A loaded ControlNet from the replica's LRU (loaded now when missing), checked against the base U-Net."""
    if spec.weights is None:
        raise OptionUnavailableError(f"{field_prefix}.path", f"{field_prefix}.path: weights were not resolved")
    weights = spec.weights
    config = spec.config
    derived = config is None and not (weights.is_dir() and (weights / "config.json").is_file())
    if derived:
        config = derived_config(base_unet, vae_scale_factor)
    key = (
        "controlnet",
        *_path_key(weights),
        spec.variant,
        json.dumps(config, sort_keys=True, default=str) if config is not None else "",
        str(device),
        str(dtype),
    )
    label = spec.path
    net = models.get(
        key,
        lambda: load_controlnet(weights, config=config, variant=spec.variant, label=label, device=device, dtype=dtype),
    )
    check_fits(net, base_unet, label, model_name)
    return net


def _path_key(path: Path) -> tuple[str, ...]:
    """The path plus size and mtime of every file that loading reads, so a rewritten file is reloaded."""
    files = sorted([*path.glob("*.safetensors"), *path.glob("*.json")]) if path.is_dir() else [path]
    return (str(path.resolve()), *(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files))


def derived_config(unet: Any, vae_scale_factor: int) -> dict[str, Any]:
    """The config `ControlNetModel.from_unet(unet)` would give, for single files without config_url."""
    config = {name: unet.config[name] for name in _FROM_UNET if name in unet.config}
    # A ControlNet takes the latents alone, also beside a dedicated inpainting U-Net (whose input adds the
    # mask and the masked image): as many channels as the U-Net predicts.
    config["in_channels"] = unet.config["out_channels"]
    # A real VAE downsamples 8× (3 steps, 4 widths); the embedding must shrink the image as much.
    steps = max(0, int(vae_scale_factor).bit_length() - 1)
    config["conditioning_embedding_out_channels"] = list(CONDITIONING_CHANNELS[: steps + 1])
    config["encoder_hid_dim_type"] = None
    config["encoder_hid_dim"] = None
    return config


def load_controlnet(
    weights: Path, *, config: dict[str, Any] | None, variant: str, label: str, device: torch.device, dtype: torch.dtype
) -> ControlNetModel:
    """Only safetensors are read; the model is built empty and takes the file's tensors directly."""
    if weights.is_dir():
        if config is None:
            config = _read_config(weights / "config.json", label)
        state_dict = _folder_state_dict(weights, variant, label)
    else:
        if weights.suffix.lower() != ".safetensors":
            raise AdapterLoadError(
                f"ControlNet {label!r}: only .safetensors weights are read (pickle files are refused)"
            )
        state_dict = _read_safetensors(weights, label)
        if config is None:
            raise AdapterLoadError(f"ControlNet {label!r}: a single-file ControlNet needs a config (config_url)")
    config = {key: value for key, value in config.items() if not key.startswith("_")}
    try:
        if not any(key.startswith("controlnet_cond_embedding") for key in state_dict):
            state_dict = convert_controlnet_checkpoint(state_dict, config)
        with init_empty_weights():
            model = ControlNetModel.from_config(config)
        missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    except Exception as exc:
        raise AdapterLoadError(
            f"ControlNet {label!r} does not match its config: {_reason(exc)}; if it is a single file, give the "
            "config.json it was trained with as config_url"
        ) from exc
    if missing or unexpected:
        raise AdapterLoadError(
            f"ControlNet {label!r} does not match its config: missing {_some(missing)}, unexpected "
            f"{_some(unexpected)}; if it is a single file, give the config.json it was trained with as config_url"
        )
    assert isinstance(model, ControlNetModel)
    with quiet_dtype_warnings():
        return model.to(device=device, dtype=dtype).eval()


def check_fits(net: ControlNetModel, unet: Any, label: str, model_name: str) -> None:
    """Refused before denoising: a mismatch would otherwise surface as a shape error mid-request."""
    for name in _MUST_MATCH:
        mine, theirs = _normalised(net.config.get(name)), _normalised(unet.config.get(name))
        if mine != theirs:
            raise AdapterLoadError(
                f"ControlNet {label!r} does not fit model {model_name!r}: its {name} is {mine}, the model's is "
                f"{theirs}; is it a ControlNet for another model family?"
            )


def _normalised(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def _folder_state_dict(folder: Path, variant: str, label: str) -> dict[str, torch.Tensor]:
    stem = f"{WEIGHTS_NAME}.{variant}" if variant else WEIGHTS_NAME
    single = folder / f"{stem}.safetensors"
    index = folder / f"{stem}.safetensors.index.json"
    if single.is_file():
        return _read_safetensors(single, label)
    if index.is_file():
        shards = sorted(set(_read_config(index, label).get("weight_map", {}).values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            if Path(shard).name != shard:
                raise AdapterLoadError(f"ControlNet {label!r}: shard name {shard!r} leaves the folder")
            state.update(_read_safetensors(folder / shard, label))
        return state
    what = f"variant {variant!r} ({single.name})" if variant else single.name
    raise AdapterLoadError(
        f"ControlNet {label!r}: the folder has no {what}; only .safetensors weights are read (pickle .bin refused)"
    )


def _read_safetensors(path: Path, label: str) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load_file(str(path), device="cpu")
    except Exception as exc:
        raise AdapterLoadError(
            f"ControlNet {label!r}: {path.name} is not a readable safetensors file: {_reason(exc)}"
        ) from exc


def _read_config(path: Path, label: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AdapterLoadError(f"ControlNet {label!r}: cannot read {path.name}: {_reason(exc)}") from exc
    if not isinstance(value, dict):
        raise AdapterLoadError(f"ControlNet {label!r}: {path.name} is not a JSON object")
    return value


def compose(
    pipe: DiffusionPipeline,
    view: DiffusionPipeline,
    nets: Sequence[ControlNetModel],
    specs: Sequence[ControlNetSpec],
    width: int,
    height: int,
) -> DiffusionPipeline:
    """A ControlNet pipeline on the resident pipeline's own modules, carrying over the view's parts.

    `from_pipe` reuses every module (no reload, no copy); `dtype` is the pipeline's own, since
    from_pipe casts all modules to it. The view's per-request scheduler and any wrappers it put
    in place of the U-Net / VAE (tiling, IC-Light) replace the resident ones on the new pipeline.
    """
    masks = [
        mask_tensor(spec.mask, spec.mask_threshold, width, height) if spec.mask is not None else None for spec in specs
    ]
    multi = MaskedMultiControlNet(nets, masks)
    extra: dict[str, Any] = {}
    if isinstance(pipe, StableDiffusionXLPipeline):
        pipeline_class: type[DiffusionPipeline] = StableDiffusionXLControlNetPipeline
        extra["add_watermarker"] = getattr(pipe, "watermark", None) is not None
    else:
        pipeline_class = StableDiffusionControlNetPipeline
    with quiet_dtype_warnings():
        composed = pipeline_class.from_pipe(pipe, controlnet=multi, scheduler=view.scheduler, dtype=pipe.dtype, **extra)
    for name, value in view.__dict__.items():
        if name in ("unet", "vae") and value is not pipe.__dict__.get(name):
            composed.__dict__[name] = value
    composed.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {"disable": True}))
    return composed


def call_kwargs(specs: Sequence[ControlNetSpec], *, guess_mode: bool) -> dict[str, Any]:
    return {
        "image": [spec.image for spec in specs],
        "controlnet_conditioning_scale": [float(spec.conditioning_scale) for spec in specs],
        "control_guidance_start": [float(spec.start_percentage) for spec in specs],
        "control_guidance_end": [float(spec.end_percentage) for spec in specs],
        "guess_mode": guess_mode,
    }


@contextmanager
def quiet_dtype_warnings() -> Iterator[None]:
    """diffusers' ModelMixin.to(dtype) warns about fp32 modules even when there are none (from_pipe, IP-Adapters)."""
    logger = logging.getLogger("diffusers.models.modeling_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _some(keys: Sequence[str]) -> str:
    shown = ", ".join(list(keys)[:3]) or "none"
    return shown + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")


def _reason(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = f"{type(exc).__name__}: {' '.join(lines[:2])}"
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 1] + "…"
