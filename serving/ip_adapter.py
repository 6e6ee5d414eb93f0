"""IP-Adapters for one request: safe loading, per-request attachment to the U-Net, image embeddings.

An IP-Adapter changes shared modules (the U-Net's cross-attention processors, its
`encoder_hid_proj` and config), so it is attached for one request only: `apply` records what it
replaces and an ExitStack callback puts exactly that back, whatever happens. Its weights are read
once (safetensors, or pickle only where the operator allowed it, with `weights_only`) and kept in
the replica's LRU, as is the CLIP image encoder.

Image embeddings are computed here rather than by the pipeline, which is what makes the fal
options work: the encoder can be any folder (`image_encoder_path` / `_subfolder` /
`_weight_name`), and `unconditional_noising_factor` decides the negative (unconditional) image
input: diffusers uses a blank image (or a zero embedding for plain IP-Adapters); with a factor
f > 0 the negative embedding is that of Gaussian noise of standard deviation f in the encoder's
normalised pixel space (seeded by the request seed), so CFG pushes away from "noise" rather
than from "nothing".

`scale` is one number for the whole adapter; `scale_json` gives per-block scales in the form of
diffusers' `set_ip_adapter_scale` (`{"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0, 1, 0]}}`;
blocks not named get 0), each multiplied by `scale`. A mask (`ip_adapter_mask_url`, the size of
the adapter's images) limits the adapter to the white part of the output image.

FaceID adapters need face embeddings from insightface, which this build cannot run: they are
refused with an error saying so, never run without their face input.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import safetensors
import safetensors.torch
import torch
from diffusers.image_processor import IPAdapterMaskProcessor
from diffusers.loaders.unet_loader_utils import _maybe_expand_lora_scales
from diffusers.models.attention_processor import (
    IPAdapterAttnProcessor,
    IPAdapterAttnProcessor2_0,
    IPAdapterXFormersAttnProcessor,
)
from diffusers.models.embeddings import ImageProjection
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

from loraserve.request import schema
from serving.controlnet import quiet_dtype_warnings
from serving.errors import AdapterLoadError, OptionUnavailableError
from serving.model_cache import file_key
from storage.fetch import InputFetchError

if TYPE_CHECKING:
    from serving.model_cache import ModelCache
    from serving.request import ImageEncoderSpec, IPAdapterSpec

PICKLE_SUFFIXES = frozenset({".ckpt", ".bin", ".pt", ".pth", ".pkl", ".pickle"})
SAFE_ENCODER_WEIGHTS = "model.safetensors"
FACE_ID_REFUSAL = (
    "FaceID IP-Adapters need face embeddings from an insightface model (insight_face_model_path), and "
    "insightface cannot run in this build; FaceID is not supported — use a non-FaceID IP-Adapter"
)
IP_PROCESSORS = (IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0, IPAdapterXFormersAttnProcessor)
MAX_REASON_CHARS = 300

StateDict = dict[str, dict[str, torch.Tensor]]


def check_images(specs: Sequence[IPAdapterSpec]) -> None:
    for i, spec in enumerate(specs):
        prefix = f"ip_adapter[{i}]"
        if not spec.images:
            raise OptionUnavailableError(
                f"{prefix}.ip_adapter_image_url", f"{prefix}.ip_adapter_image_url: at least one image is required"
            )
        if spec.mask is None:
            continue
        for j, image in enumerate(spec.images):
            if image.size != spec.mask.size:
                raise OptionUnavailableError(
                    f"{prefix}.ip_adapter_mask_url",
                    f"{prefix}.ip_adapter_mask_url: the mask is {spec.mask.width}x{spec.mask.height} but image {j} is "
                    f"{image.width}x{image.height}; the mask and the IP-Adapter images must be the same size",
                )


def apply(
    stack: contextlib.ExitStack,
    unet: Any,
    specs: Sequence[IPAdapterSpec],
    encoder_spec: ImageEncoderSpec,
    *,
    models: ModelCache,
    allow_pickle: bool,
    classifier_free_guidance: bool,
    seed: int,
    width: int,
    height: int,
    vae_scale_factor: int,
    model_name: str,
) -> dict[str, Any]:
    """Attaches the adapters to `unet` until `stack` closes; returns the pipeline call options."""
    state_dicts: list[StateDict] = []
    for i, spec in enumerate(specs):
        if spec.weights is None:
            raise OptionUnavailableError(f"ip_adapter[{i}].path", f"ip_adapter[{i}].path: weights were not resolved")
        path, label = spec.weights, spec.path
        state = models.get(
            ("ip_adapter", *file_key(path)),
            lambda path=path, label=label: read_weights(path, label, allow_pickle),  # type: ignore[misc]
        )
        if is_face_id(state):
            raise OptionUnavailableError(f"ip_adapter[{i}].path", f"ip_adapter[{i}].path: {FACE_ID_REFUSAL}")
        if not spec.image_projection_shortcut:
            raise OptionUnavailableError(
                f"ip_adapter[{i}].image_projection_shortcut",
                f"ip_adapter[{i}].image_projection_shortcut: only FaceID Plus models have a projection shortcut, and "
                "FaceID is not supported here; leave it at true",
            )
        check_fits(state, unet, spec.path, model_name)
        state_dicts.append(state)
    scales = [scale_config(spec, unet, f"ip_adapter[{i}].scale_json") for i, spec in enumerate(specs)]

    folder = encoder_spec.folder
    if folder is None:
        raise OptionUnavailableError("image_encoder_path", "image_encoder_path: the image encoder was not resolved")
    weights_file = encoder_weights_file(folder, encoder_spec.weight_name, allow_pickle)
    device, dtype = unet.device, unet.dtype
    encoder, processor = models.get(
        ("image_encoder", *file_key(weights_file), str(device), str(dtype)),
        lambda: load_image_encoder(folder, weights_file, device=device, dtype=dtype, label=encoder_spec.path),
    )
    for spec, state in zip(specs, state_dicts):
        check_encoder_fits(state, encoder, spec.path, encoder_spec.path or str(folder))

    stack.enter_context(attached(unet, state_dicts, model_name))
    set_scales(unet, scales)
    layers = list(unet.encoder_hid_proj.image_projection_layers)
    embeds = image_embeds(
        encoder,
        processor,
        specs,
        layers,
        classifier_free_guidance=classifier_free_guidance,
        seed=seed,
        device=device,
        dtype=dtype,
    )
    kwargs: dict[str, Any] = {"ip_adapter_image_embeds": embeds}
    if any(spec.mask is not None for spec in specs):
        kwargs["cross_attention_kwargs"] = {"ip_adapter_masks": masks(specs, width, height, vae_scale_factor)}
    return kwargs


@contextlib.contextmanager
def attached(unet: Any, state_dicts: list[StateDict], model_name: str) -> Any:
    """The adapters in the U-Net, and afterwards exactly the processors, projection and config it had."""
    processors = dict(unet.attn_processors)
    projection = unet.encoder_hid_proj
    hid_type = unet.config.encoder_hid_dim_type
    try:
        try:
            with quiet_dtype_warnings():
                unet._load_ip_adapter_weights(state_dicts)
        except Exception as exc:
            raise AdapterLoadError(f"IP-Adapter does not fit model {model_name!r}: {_reason(exc)}") from exc
        yield
    finally:
        unet.set_attn_processor(processors)
        unet.encoder_hid_proj = projection
        # diffusers keeps this flag as an attribute of the frozen config (see its unload_ip_adapter).
        setattr(unet.config, "encoder_hid_dim_type", hid_type)  # noqa: B010


def read_weights(path: Path, label: str, allow_pickle: bool) -> StateDict:
    """`image_proj.*` / `ip_adapter.*` tensors, as diffusers' load_ip_adapter splits them."""
    suffix = path.suffix.lower()
    state: StateDict = {"image_proj": {}, "ip_adapter": {}}
    try:
        if suffix in PICKLE_SUFFIXES:
            if not allow_pickle:
                raise AdapterLoadError(
                    f"IP-Adapter {label!r}: {suffix} files are pickle and can run code when loaded; refused (use .safetensors)"
                )
            loaded = torch.load(str(path), map_location="cpu", weights_only=True)
            state = {"image_proj": dict(loaded.get("image_proj", {})), "ip_adapter": dict(loaded.get("ip_adapter", {}))}
        else:
            with safetensors.safe_open(str(path), framework="pt", device="cpu") as handle:
                for key in handle.keys():  # noqa: SIM118 - safe_open is not a dict
                    group, _, rest = key.partition(".")
                    if group in state:
                        state[group][rest] = handle.get_tensor(key)
    except AdapterLoadError:
        raise
    except Exception as exc:
        raise AdapterLoadError(f"IP-Adapter {label!r} is not a readable weights file: {_reason(exc)}") from exc
    if not state["image_proj"] or not state["ip_adapter"]:
        raise AdapterLoadError(
            f"IP-Adapter {label!r} has no image_proj.* / ip_adapter.* weights; is it an IP-Adapter file?"
        )
    return state


def is_face_id(state: StateDict) -> bool:
    """diffusers' own order of checks: plain, full-face, FaceID Plus, FaceID, plus."""
    proj = state["image_proj"]
    if "proj.weight" in proj or "proj.3.weight" in proj:
        return False
    return "perceiver_resampler.proj_in.weight" in proj or "norm.weight" in proj


def check_fits(state: StateDict, unet: Any, label: str, model_name: str) -> None:
    """Every cross-attention processor needs to_k_ip / to_v_ip of its width: checked before anything changes."""
    cross_attention_dim = unet.config.cross_attention_dim
    channels = list(unet.config.block_out_channels)
    key_id = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        if name.startswith("mid_block"):
            hidden = channels[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(channels))[int(name.split(".")[1])]
        else:
            hidden = channels[int(name.split(".")[1])]
        for proj in ("to_k_ip", "to_v_ip"):
            tensor = state["ip_adapter"].get(f"{key_id}.{proj}.weight")
            expected = (hidden, cross_attention_dim)
            if tensor is None or tuple(tensor.shape) != expected:
                found = "missing" if tensor is None else f"shaped {tuple(tensor.shape)}"
                raise AdapterLoadError(
                    f"IP-Adapter {label!r} does not fit model {model_name!r}: {key_id}.{proj}.weight is {found}, "
                    f"the model needs {expected}; is it an IP-Adapter for another model family?"
                )
        key_id += 2


def check_encoder_fits(state: StateDict, encoder: Any, label: str, encoder_label: str) -> None:
    proj = state["image_proj"]
    if "proj.weight" in proj:
        wanted, have, what = proj["proj.weight"].shape[-1], encoder.config.projection_dim, "image embeddings"
    elif "proj_in.weight" in proj:
        wanted, have, what = proj["proj_in.weight"].shape[1], encoder.config.hidden_size, "hidden states"
    elif "proj.0.weight" in proj:
        wanted, have, what = proj["proj.0.weight"].shape[0], encoder.config.hidden_size, "hidden states"
    else:
        return
    if wanted != have:
        raise AdapterLoadError(
            f"IP-Adapter {label!r} expects {wanted}-wide {what} but image encoder {encoder_label!r} gives {have}; "
            "set image_encoder_path to the encoder the adapter was trained with"
        )


def scale_config(spec: IPAdapterSpec, unet: Any, field_name: str) -> float | dict[str, Any]:
    """`scale`, or `scale_json`'s per-block scales times `scale`, checked against this U-Net's blocks."""
    if not spec.scale_json:
        return float(spec.scale)
    try:
        value = json.loads(spec.scale_json)
    except ValueError as exc:
        raise OptionUnavailableError(field_name, f"{field_name}: not valid JSON ({exc})") from None
    problem = schema.scale_json_problem(value)
    if problem:
        raise OptionUnavailableError(field_name, f"{field_name}: {problem}")
    scaled = _times(value, spec.scale)
    if not isinstance(scaled, dict):
        return float(scaled)
    valid = {
        "down": [i for i, block in enumerate(unet.down_blocks) if hasattr(block, "attentions")],
        "up": [i for i, block in enumerate(unet.up_blocks) if hasattr(block, "attentions")],
    }
    for side in ("down", "up"):
        blocks = scaled.get(side)
        if isinstance(blocks, dict):
            unknown = sorted(set(blocks) - {f"block_{i}" for i in valid[side]})
            if unknown:
                names = ", ".join(f"block_{i}" for i in valid[side])
                raise OptionUnavailableError(
                    field_name,
                    f"{field_name}: {side}.{unknown[0]} has no attention layers in this model; its {side} blocks with "
                    f"attention are {names}",
                )
    try:
        _maybe_expand_lora_scales(unet, [scaled], default_scale=0.0)
    except ValueError as exc:
        raise OptionUnavailableError(field_name, f"{field_name}: {exc}") from None
    return scaled


def _times(value: Any, factor: float) -> Any:
    if isinstance(value, dict):
        return {key: _times(part, factor) for key, part in value.items()}
    if isinstance(value, list):
        return [_times(part, factor) for part in value]
    return float(value) * factor


def set_scales(unet: Any, configs: list[float | dict[str, Any]]) -> None:
    """diffusers' set_ip_adapter_scale, on the U-Net module itself (the view's U-Net may be a wrapper)."""
    expanded = _maybe_expand_lora_scales(unet, configs, default_scale=0.0)
    for name, processor in unet.attn_processors.items():
        if not isinstance(processor, IP_PROCESSORS):
            continue
        for index, config in enumerate(expanded):
            if isinstance(config, dict):
                for prefix, scale in config.items():
                    if name.startswith(prefix):
                        processor.scale[index] = scale
            else:
                processor.scale[index] = config


@torch.no_grad()
def image_embeds(
    encoder: Any,
    processor: Any,
    specs: Sequence[IPAdapterSpec],
    layers: Sequence[Any],
    *,
    classifier_free_guidance: bool,
    seed: int,
    device: torch.device,
    dtype: torch.dtype,
) -> list[torch.Tensor]:
    """One tensor per adapter, (2 if CFG else 1, num_images, …): negative first, as the pipelines expect."""
    encoder_param = next(encoder.parameters())
    result = []
    for index, (spec, layer) in enumerate(zip(specs, layers)):
        pixels = processor(images=spec.images, return_tensors="pt").pixel_values
        pixels = pixels.to(encoder_param.device, encoder_param.dtype)
        hidden = not isinstance(layer, ImageProjection)
        positive = _encode(encoder, pixels, hidden)
        if classifier_free_guidance:
            factor = float(spec.unconditional_noising_factor)
            if factor > 0:
                generator = torch.Generator("cpu").manual_seed(seed + index)
                noise = torch.randn(pixels.shape, generator=generator, dtype=torch.float32) * factor
                negative = _encode(encoder, noise.to(pixels.device, pixels.dtype), hidden)
            elif hidden:
                negative = _encode(encoder, torch.zeros_like(pixels), hidden)
            else:
                negative = torch.zeros_like(positive)
            embeds = torch.cat([negative[None], positive[None]])
        else:
            embeds = positive[None]
        result.append(embeds.to(device=device, dtype=dtype))
    return result


def _encode(encoder: Any, pixels: torch.Tensor, hidden: bool) -> torch.Tensor:
    if hidden:
        return encoder(pixels, output_hidden_states=True).hidden_states[-2]
    return encoder(pixels).image_embeds


def masks(specs: Sequence[IPAdapterSpec], width: int, height: int, vae_scale_factor: int) -> list[torch.Tensor | None]:
    """Per adapter (1, num_images, height, width), the same mask for each of its images, or None."""
    processor = IPAdapterMaskProcessor(vae_scale_factor=vae_scale_factor)
    result: list[torch.Tensor | None] = []
    for spec in specs:
        if spec.mask is None:
            result.append(None)
            continue
        mask = processor.preprocess(spec.mask.convert("L"), height=height, width=width)
        result.append(mask.reshape(1, 1, *mask.shape[-2:]).repeat(1, len(spec.images), 1, 1))
    return result


def encoder_weights_file(folder: Path, weight_name: str | None, allow_pickle: bool) -> Path:
    """The file in the image encoder folder that holds its weights.

    fal's schema defaults `image_encoder_weight_name` to "pytorch_model.bin", the name of a pickle
    file, which this service refuses unless the operator allows pickle weights (pickle can run
    code when loaded). The encoder folders IP-Adapters are published with (h94/IP-Adapter's
    `models/image_encoder` and `sdxl_models/image_encoder`, openai/clip-vit-*) also hold
    `model.safetensors`: the same tensors in a safe format. So when the name is unset or that
    default, `model.safetensors` is read if the folder has it; `pytorch_model.bin` only when it is
    the folder's only weights and pickle is allowed. A name given explicitly is used as given,
    and a pickle name is refused unless allowed.
    """
    field_name = "input.image_encoder_weight_name"
    default = weight_name is None or weight_name == schema.DEFAULT_IMAGE_ENCODER_WEIGHT_NAME
    if default and (folder / SAFE_ENCODER_WEIGHTS).is_file():
        return folder / SAFE_ENCODER_WEIGHTS
    name = schema.DEFAULT_IMAGE_ENCODER_WEIGHT_NAME if weight_name is None else weight_name
    if Path(name).name != name or name in ("", ".", ".."):
        raise InputFetchError(field_name, name, "must be a file name inside the image encoder folder")
    suffix = Path(name).suffix.lower()
    if suffix in PICKLE_SUFFIXES and not allow_pickle:
        why = (
            f"the image encoder folder has no {SAFE_ENCODER_WEIGHTS}, and {name} (the default) is"
            if default
            else f"{name} is"
        )
        raise InputFetchError(
            field_name, name, f"{why} a pickle file, which can run code when loaded; refused — use a .safetensors file"
        )
    path = folder / name
    if not path.is_file():
        raise InputFetchError(field_name, name, "no such file in the image encoder folder")
    return path


def load_image_encoder(
    folder: Path, weights_file: Path, *, device: torch.device, dtype: torch.dtype, label: str
) -> tuple[Any, Any]:
    """CLIPVisionModelWithProjection from config.json + the weights file, and its image processor."""
    shown = label or str(folder)
    if not (folder / "config.json").is_file():
        raise AdapterLoadError(f"image encoder {shown!r}: the folder has no config.json")
    try:
        config = CLIPVisionConfig.from_pretrained(str(folder))
        if weights_file.suffix.lower() == ".safetensors":
            state = safetensors.torch.load_file(str(weights_file), device="cpu")
        else:
            state = torch.load(str(weights_file), map_location="cpu", weights_only=True)
        encoder, info = CLIPVisionModelWithProjection.from_pretrained(
            None, config=config, state_dict=state, output_loading_info=True, dtype=dtype
        )
    except Exception as exc:
        raise AdapterLoadError(f"image encoder {shown!r} could not be loaded: {_reason(exc)}") from exc
    missing = [key for key in info.get("missing_keys", []) if not key.endswith("position_ids")]
    if missing:
        raise AdapterLoadError(
            f"image encoder {shown!r}: {weights_file.name} is not a CLIP vision model with projection "
            f"(missing {', '.join(sorted(missing)[:3])}{' …' if len(missing) > 3 else ''})"
        )
    if (folder / "preprocessor_config.json").is_file():
        processor = CLIPImageProcessor.from_pretrained(str(folder))
    else:
        size = int(config.image_size)
        processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return encoder.to(device=device).eval(), processor


def _reason(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = f"{type(exc).__name__}: {' '.join(lines[:2])}"
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 1] + "…"
