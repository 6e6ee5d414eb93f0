"""IC-Light relighting (SD 1.5) for one request, as in lllyasviel's IC-Light reference code.

An IC-Light model is an offset for every parameter of an SD 1.5 U-Net; its `conv_in` takes 8
input channels (the "fc" model: noisy latent + foreground latent) or 12 ("fbc": + background
latent). The reference widens the U-Net's `conv_in` with zeros, adds the offset to every
parameter, and concatenates the VAE-encoded conditions (`latent_dist.mode() * scaling_factor`)
to the latent on every U-Net call.

Here the resident U-Net is left as it is: for this request each of its parameters holds base +
offset in its own tensor (its values are put back by the request's ExitStack, so nothing leaks;
only conv_in's weight, which the offset widens, is replaced for the request), and the view's
U-Net is wrapped so every call gets the conditions concatenated. The wrapper sits outside any
tiling wrapper, so tiles crop the conditions together with the latent. The U-Net's config keeps
in_channels 4, so the pipeline still makes 4-channel latents, as in the reference.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import PIL.Image
import safetensors.torch
import torch

from serving.errors import AdapterLoadError, OptionUnavailableError, reason
from serving.model_cache import file_key

if TYPE_CHECKING:
    from serving.model_cache import ModelCache
    from serving.request import ICLightSpec

LATENT_CHANNELS = 4
FOREGROUND_CHANNELS = 2 * LATENT_CHANNELS
BACKGROUND_CHANNELS = 3 * LATENT_CHANNELS
MAX_REASON_CHARS = 300
# Parameters that a request's IP-Adapters add to the U-Net (processors and projection); LoRAs add none.
_ADAPTER_MARKERS = (".processor.", "encoder_hid_proj.")


class ICLightUNet:
    """Callable like the U-Net it wraps, with the condition latents concatenated to every sample."""

    def __init__(self, unet: Any, conditions: torch.Tensor) -> None:
        self._unet = unet
        self._conditions = conditions

    def __getattr__(self, name: str) -> Any:
        return getattr(self._unet, name)

    def __call__(self, sample: torch.Tensor, timestep: Any, *args: Any, **kwargs: Any) -> Any:
        conditions = self._conditions.to(device=sample.device, dtype=sample.dtype)
        conditions = torch.cat([conditions] * (sample.shape[0] // conditions.shape[0]), dim=0)
        return self._unet(torch.cat([sample, conditions], dim=1), timestep, *args, **kwargs)


def check_images(spec: ICLightSpec) -> None:
    if spec.image is None:
        raise OptionUnavailableError("ic_light_image_url", "ic_light_image_url: the foreground image is required")


def apply(
    stack: contextlib.ExitStack,
    unet: Any,
    view_unet: Any,
    vae: Any,
    spec: ICLightSpec,
    *,
    models: ModelCache,
    width: int,
    height: int,
    model_name: str,
) -> ICLightUNet:
    """Swaps the offset into `unet` until `stack` closes; returns the view's new U-Net."""
    if spec.weights is None or spec.image is None:
        raise OptionUnavailableError("ic_light_model_url", "ic_light_model_url: the model was not resolved")
    path = spec.weights
    device, dtype = unet.device, unet.dtype
    offset = models.get(("ic_light", *file_key(path), str(device)), lambda: read_offset(path, spec.model_url, device))
    parameters = _base_parameters(unet)
    channels = check_fits(offset, parameters, spec.model_url, model_name)
    if channels == BACKGROUND_CHANNELS and spec.background is None:
        raise OptionUnavailableError(
            "ic_light_model_background_image_url",
            f"ic_light_model_background_image_url: IC-Light model {spec.model_url!r} is background-conditioned (fbc, "
            "12 input channels) and needs a background image",
        )
    if channels == FOREGROUND_CHANNELS and spec.background is not None:
        raise OptionUnavailableError(
            "ic_light_model_background_image_url",
            f"ic_light_model_background_image_url: IC-Light model {spec.model_url!r} is foreground-only (fc, 8 input "
            "channels) and cannot use a background image; use a background-conditioned (fbc) model or leave it unset",
        )
    images = [spec.image] if spec.background is None else [spec.image, spec.background]
    conditions = encode_conditions(vae, images, width, height)
    stack.enter_context(_offset_parameters(unet, parameters, offset, dtype))
    return ICLightUNet(view_unet, conditions)


def read_offset(path: Path, label: str, device: torch.device) -> dict[str, torch.Tensor]:
    if path.suffix.lower() != ".safetensors":
        raise AdapterLoadError(f"IC-Light model {label!r}: only .safetensors files are read (pickle files are refused)")
    try:
        return safetensors.torch.load_file(str(path), device=str(device))
    except Exception as exc:
        why = reason(exc, MAX_REASON_CHARS)
        raise AdapterLoadError(f"IC-Light model {label!r} is not a readable safetensors file: {why}") from exc


def _base_parameters(unet: Any) -> list[str]:
    """The U-Net's own parameter names, as an IC-Light file names them."""
    return [
        name
        for name, _ in unet.named_parameters()
        if not any(marker in name for marker in _ADAPTER_MARKERS) and not name.startswith("encoder_hid_proj")
    ]


def check_fits(offset: dict[str, torch.Tensor], parameters: list[str], label: str, model_name: str) -> int:
    """The offset must cover exactly this U-Net's parameters; returns conv_in's input channels (8 or 12)."""
    missing = sorted(set(parameters) - set(offset))
    unexpected = sorted(set(offset) - set(parameters))
    if missing or unexpected:
        detail = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise AdapterLoadError(
            f"IC-Light model {label!r} does not fit model {model_name!r} ({detail}, {len(missing)} missing, "
            f"{len(unexpected)} unexpected); is it an IC-Light model for SD 1.5?"
        )
    conv_in = offset["conv_in.weight"]
    if conv_in.ndim != 4 or conv_in.shape[1] not in (FOREGROUND_CHANNELS, BACKGROUND_CHANNELS):
        raise AdapterLoadError(
            f"IC-Light model {label!r}: conv_in.weight has shape {tuple(conv_in.shape)}; an IC-Light U-Net takes "
            f"{FOREGROUND_CHANNELS} (foreground) or {BACKGROUND_CHANNELS} (foreground + background) input channels"
        )
    return int(conv_in.shape[1])


@contextlib.contextmanager
def _offset_parameters(
    unet: Any, parameters: list[str], offset: dict[str, torch.Tensor], dtype: torch.dtype
) -> Any:
    """Each parameter's own tensor holds base + offset for the request, and its values again after.

    Written in place, as LoRAs are (serving/lora_merge.py): a compiled U-Net (serving/compiled.py)
    keeps the tensors its graphs were built on. `conv_in.weight` alone is replaced, by the
    zero-widened one the offset needs (8 or 12 input channels, not 4); a call with those channels
    runs eagerly, and the original parameter is back before any other request.
    """
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    replaced: list[tuple[torch.nn.Module, str, torch.nn.Parameter]] = []
    try:
        with torch.no_grad():
            for name in parameters:
                module_name, _, attr = name.rpartition(".")
                module = unet.get_submodule(module_name) if module_name else unet
                base = module._parameters[attr]
                delta = offset[name].to(device=base.device, dtype=torch.float32)
                if tuple(delta.shape) == tuple(base.shape):
                    saved.append((base, base.detach().clone()))
                    base.copy_((base.float() + delta).to(dtype))
                elif name == "conv_in.weight":
                    widened = torch.zeros(delta.shape, device=base.device, dtype=torch.float32)
                    widened[:, : base.shape[1]] = base.float()
                    widened += delta
                    replaced.append((module, attr, base))
                    module._parameters[attr] = torch.nn.Parameter(widened.to(dtype), requires_grad=False)
                else:
                    raise AdapterLoadError(
                        f"IC-Light offset for {name} has shape {tuple(delta.shape)}, the model's is {tuple(base.shape)}"
                    )
        yield
    finally:
        with torch.no_grad():
            for base, original in reversed(saved):
                base.copy_(original)
        for module, attr, base in reversed(replaced):
            module._parameters[attr] = base


@torch.no_grad()
def encode_conditions(vae: Any, images: list[PIL.Image.Image], width: int, height: int) -> torch.Tensor:
    """Each image resized and centre-cropped to the output, VAE-encoded; concatenated on channels (1, 4·n, h, w)."""
    parameter = next(vae.parameters())
    pixels = torch.stack([_to_tensor(_resize_and_center_crop(image, width, height)) for image in images])
    latents = vae.encode(pixels.to(parameter.device, parameter.dtype)).latent_dist.mode() * vae.config.scaling_factor
    return torch.cat([latent[None] for latent in latents], dim=1)


def _resize_and_center_crop(image: PIL.Image.Image, width: int, height: int) -> PIL.Image.Image:
    """The reference's resize_and_center_crop: cover the target, then crop the middle."""
    image = image.convert("RGB")
    scale = max(width / image.width, height / image.height)
    resized = image.resize(
        (max(width, round(image.width * scale)), max(height, round(image.height * scale))), PIL.Image.Resampling.LANCZOS
    )
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    return resized.crop((left, top, left + width, top + height))


def _to_tensor(image: PIL.Image.Image) -> torch.Tensor:
    """HWC uint8 → CHW in [-1, 1], as the reference's numpy2pytorch (÷127.5 here, the VAE's own range)."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)
