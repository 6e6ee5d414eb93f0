"""`unet_name`: another U-Net swapped in for the base model's (fine-tunes, LCM / Lightning U-Nets).

A custom U-Net comes as a diffusers U-Net folder (`config.json` + weights), a whole diffusers
pipeline folder (its `unet/` is used), or one .safetensors file of `UNet2DConditionModel`
weights (what e.g. SDXL-Lightning publishes). A single file carries no config, so it is read
into the base model's own U-Net config; a folder brings its config and must still fit the
pipeline it joins. Either way a U-Net that does not fit (another family, an inpainting U-Net)
is refused at load time with the mismatch named, rather than failing mid-denoise with a
shape error.

Errors are `UNetLoadError`; serving.pipelines turns them into `ModelLoadError`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from diffusers import UNet2DConditionModel

CONFIG_NAME = "config.json"
SAFETENSORS_SUFFIX = ".safetensors"
# Config entries that fix what the U-Net takes and returns; the rest (sample_size, block
# layout, LCM's time_cond_proj_dim) may differ without breaking the pipeline around it.
INTERFACE_KEYS = (
    "in_channels",
    "out_channels",
    "cross_attention_dim",
    "addition_embed_type",
    "addition_time_embed_dim",
    "projection_class_embeddings_input_dim",
    "encoder_hid_dim",
    "encoder_hid_dim_type",
    "class_embed_type",
)
# Key prefixes of U-Nets in the original (LDM / SGM) layout rather than diffusers'.
ORIGINAL_LAYOUT_PREFIXES = ("model.diffusion_model.", "input_blocks.", "middle_block.", "output_blocks.")
MAX_LISTED_MISMATCHES = 3


class UNetLoadError(Exception):
    """The custom U-Net could not be loaded or does not fit the base model; the message says which."""


def load_unet(
    source: Path,
    label: str,
    *,
    base: UNet2DConditionModel,
    model_label: str,
    variant: str | None,
    torch_dtype: torch.dtype,
) -> UNet2DConditionModel:
    """The U-Net at `source` (already a local path), checked against the base model's `base` U-Net.

    `label` / `model_label` are what the caller asked for (a URL, a repo id), used in messages.
    `variant` picks `*.{variant}.safetensors` files in folders; a single file is used as it is.
    """
    if source.is_file():
        return _from_single_file(source, label, base=base, model_label=model_label, torch_dtype=torch_dtype)
    if not source.is_dir():
        raise UNetLoadError(f"U-Net {label!r}: no such file or folder")
    folder = _unet_folder(source, label)
    if variant and not any(folder.glob(f"*.{variant}{SAFETENSORS_SUFFIX}")):
        raise UNetLoadError(
            f"U-Net {label!r} has no {variant!r} variant: no *.{variant}{SAFETENSORS_SUFFIX} file in its folder"
        )
    try:
        unet = UNet2DConditionModel.from_pretrained(
            str(folder), variant=variant or None, use_safetensors=True, dtype=torch_dtype
        )
    except Exception as exc:
        raise UNetLoadError(f"could not load U-Net {label!r}: {type(exc).__name__}: {_first_line(exc)}") from exc
    check_fits(unet.config, base.config, label=label, model_label=model_label)
    return unet


def check_fits(config: Mapping[str, Any], base_config: Mapping[str, Any], *, label: str, model_label: str) -> None:
    """Refuse a U-Net whose inputs/outputs differ from the one the pipeline was built around."""
    differences = [
        f"{key} {_norm(config.get(key))!r} (model has {_norm(base_config.get(key))!r})"
        for key in INTERFACE_KEYS
        if _norm(config.get(key)) != _norm(base_config.get(key))
    ]
    if differences:
        raise UNetLoadError(
            f"U-Net {label!r} does not fit model {model_label!r}: {'; '.join(differences)}"
            " — is it a U-Net for another model family or task?"
        )


def _unet_folder(source: Path, label: str) -> Path:
    """A U-Net folder, or a pipeline folder's `unet/` (a repo id of a whole pipeline resolves to one)."""
    if (source / CONFIG_NAME).is_file():
        return source
    if (source / "unet" / CONFIG_NAME).is_file():
        return source / "unet"
    raise UNetLoadError(
        f"U-Net {label!r}: the folder is neither a diffusers U-Net ({CONFIG_NAME}) nor a pipeline with a unet/ folder"
    )


def _from_single_file(
    path: Path, label: str, *, base: UNet2DConditionModel, model_label: str, torch_dtype: torch.dtype
) -> UNet2DConditionModel:
    if path.suffix.lower() != SAFETENSORS_SUFFIX:
        raise UNetLoadError(f"U-Net {label!r}: a single-file U-Net must be a .safetensors file")
    try:
        state_dict = safetensors.torch.load_file(str(path), device="cpu")
    except Exception as exc:
        raise UNetLoadError(f"U-Net {label!r} is not a readable safetensors file: {_first_line(exc)}") from exc
    if any(key.startswith(ORIGINAL_LAYOUT_PREFIXES) for key in state_dict):
        raise UNetLoadError(
            f"U-Net {label!r} is in the original (LDM) checkpoint layout; give diffusers-format U-Net weights "
            "(a UNet2DConditionModel folder or its .safetensors), or a whole single-file model as model_name"
        )
    _check_tensors(state_dict, base.state_dict(), label=label, model_label=model_label)
    # Built on the meta device: the weights are assigned, never randomly initialised first.
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(base.config)
    unet.load_state_dict(state_dict, strict=True, assign=True)
    return unet.to(dtype=torch_dtype).eval()


def _check_tensors(
    state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], *, label: str, model_label: str
) -> None:
    """Names and shapes must match the base U-Net exactly; the message lists the first few differences."""
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    reshaped = [
        f"{key} {tuple(state_dict[key].shape)} vs {tuple(tensor.shape)}"
        for key, tensor in expected.items()
        if key in state_dict and state_dict[key].shape != tensor.shape
    ]
    problems = []
    for what, items in (("missing", missing), ("unexpected", unexpected), ("other shapes", reshaped)):
        if items:
            listed = ", ".join(items[:MAX_LISTED_MISMATCHES]) + (", …" if len(items) > MAX_LISTED_MISMATCHES else "")
            problems.append(f"{len(items)} {what} ({listed})")
    if problems:
        raise UNetLoadError(
            f"U-Net {label!r} does not fit model {model_label!r}: {'; '.join(problems)}"
            " — is it a U-Net for another model family?"
        )


def _norm(value: Any) -> Any:
    """`cross_attention_dim` may be written per block; the same value everywhere is that value."""
    if isinstance(value, (list, tuple)):
        return value[0] if value and all(item == value[0] for item in value) else tuple(value)
    return value


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
