"""ControlNets, IP-Adapters and IC-Light for one request: what it asks for, and applying it.

A request's image conditioning travels in three stages:

1. `conditioning_from_input` (via serving/params.py) copies the fal fields into a `Conditioning`
   that still holds URLs, exactly as the caller wrote them.
2. `resolve_conditioning` (in the worker, before the generation lock) turns every weights
   reference into a checked local file through the node's weights cache and fetches every image
   through the SSRF-guarded fetcher; each failure names its field.
3. `applied` (inside `generate_result`, after LoRA activation) loads the models — through a small
   per-replica LRU, so a ControlNet, IP-Adapter or image encoder is not re-read per request —
   and wires them into the per-request pipeline view:
   - ControlNets: `StableDiffusion[XL]ControlNetPipeline.from_pipe` on the resident pipeline's
     own modules (never a reload), with the view's scheduler and wrappers carried over;
   - IP-Adapters: loaded into the U-Net for this request only and removed in a `finally`
     (serving/ip_adapter.py), image embeddings computed here (so `unconditional_noising_factor`
     and custom encoders work);
   - IC-Light: the offset added to the U-Net's parameters for this request only and the
     foreground (and background) latents concatenated on every step (serving/ic_light.py).

Nothing here survives the request: the next request sees the resident pipeline as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import PIL.Image
from diffusers import DiffusionPipeline

from loraserve.request import schema
from loraserve.v1 import types_pb2
from serving import controlnet as controlnets_
from serving import ic_light as ic_light_
from serving import ip_adapter as ip_adapters_
from serving import tiling
from serving.errors import OptionUnavailableError
from serving.model_cache import (
    CONDITIONING_TIER,
    MODELS,
    ModelCache,
    configure_cache,
    file_key,
)
from serving.request import (
    Conditioning,
    ControlNetSpec,
    ICLightSpec,
    ImageEncoderSpec,
    IPAdapterSpec,
)
from storage.fetch import FetchPolicy, InputFetchError, StoredFiles, fetch_bytes, fetch_image

if TYPE_CHECKING:
    from serving.request import GenerationParams, LoadedModel
    from storage.weights import WeightsCache

# Re-exported: the worker and the tests reach the request's conditioning types and the model
# cache through this module.
__all__ = [
    "CONDITIONING_TIER",
    "Conditioning",
    "ControlNetSpec",
    "ICLightSpec",
    "IPAdapterSpec",
    "ImageEncoderSpec",
    "ModelCache",
    "applied",
    "conditioning_from_input",
    "configure_cache",
    "file_key",
    "resolve_conditioning",
]
MAX_CONFIG_BYTES = 1024 * 1024


def conditioning_from_input(inp: types_pb2.GenerateInput) -> Conditioning | None:
    """The request's ControlNets / IP-Adapters / IC-Light as URLs; None when it uses none of them."""
    if not (inp.controlnets or inp.ip_adapter or inp.ic_light_model_url):
        return None
    return Conditioning(
        controlnets=[_controlnet_spec(cn) for cn in inp.controlnets],
        guess_mode=inp.controlnet_guess_mode,
        ip_adapters=[_ip_adapter_spec(ipa) for ipa in inp.ip_adapter],
        image_encoder=ImageEncoderSpec(
            path=inp.image_encoder_path,
            subfolder=inp.image_encoder_subfolder,
            weight_name=inp.image_encoder_weight_name if inp.HasField("image_encoder_weight_name") else None,
        ),
        ic_light=(
            ICLightSpec(
                model_url=inp.ic_light_model_url,
                image_url=inp.ic_light_image_url,
                background_image_url=inp.ic_light_model_background_image_url,
            )
            if inp.ic_light_model_url
            else None
        ),
    )


def _controlnet_spec(cn: types_pb2.ControlNet) -> ControlNetSpec:
    return ControlNetSpec(
        path=cn.path,
        image_url=schema.controlnet_image_url(cn),
        mask_url=schema.controlnet_mask_url(cn),
        config_url=cn.config_url,
        variant=cn.variant,
        conditioning_scale=schema.controlnet_scale(cn),
        start_percentage=cn.start_percentage,
        end_percentage=schema.controlnet_end(cn),
        mask_threshold=schema.controlnet_mask_threshold(cn),
        image_field="image_url" if cn.image_url else "control_image_url",
        mask_field="mask_url" if cn.mask_url else "mask_image_url",
    )


def _ip_adapter_spec(ipa: types_pb2.IPAdapter) -> IPAdapterSpec:
    return IPAdapterSpec(
        path=ipa.path,
        image_urls=list(ipa.ip_adapter_image_url),
        mask_url=ipa.ip_adapter_mask_url,
        model_subfolder=ipa.model_subfolder,
        weight_name=ipa.weight_name,
        scale=schema.ip_adapter_scale(ipa),
        scale_json=ipa.scale_json,
        unconditional_noising_factor=ipa.unconditional_noising_factor,
        image_projection_shortcut=schema.ip_adapter_projection_shortcut(ipa),
        insight_face_model_path=ipa.insight_face_model_path,
    )


# ----------------------------------------------------------------------------- resolving


def resolve_conditioning(
    cond: Conditioning,
    *,
    weights: WeightsCache,
    image_policy: FetchPolicy,
    store: StoredFiles | None = None,
    on_progress: Callable[[str], None] | None = None,
) -> None:
    """Weights → checked local files (weights cache), images → decoded PIL images; in place.

    Every failure is an InputFetchError naming the field (`input.controlnets[0].image_url`, …).
    """
    cond.allow_pickle = weights.allow_pickle

    def image(url: str, field_name: str) -> PIL.Image.Image:
        return fetch_image(url, field_name, image_policy, store=store)

    for i, cn in enumerate(cond.controlnets):
        prefix = f"input.controlnets[{i}]"
        cn.weights = weights.resolve(cn.path, f"{prefix}.path", variant=cn.variant or None, on_progress=on_progress)
        if cn.config_url:
            cn.config = _fetch_json(cn.config_url, f"{prefix}.config_url", image_policy, store)
        cn.image = image(cn.image_url, f"{prefix}.{cn.image_field}")
        if cn.mask_url:
            cn.mask = image(cn.mask_url, f"{prefix}.{cn.mask_field}")
    for i, ipa in enumerate(cond.ip_adapters):
        prefix = f"input.ip_adapter[{i}]"
        weights.check_local_path(ipa.path, f"{prefix}.path")
        if not ipa.weight_name and not _names_one_file(ipa.path):
            raise InputFetchError(
                f"{prefix}.weight_name",
                ipa.path,
                "weight_name is required when path is a folder or a Hugging Face repo: name the IP-Adapter "
                ".safetensors file (e.g. ip-adapter_sd15.safetensors)",
            )
        ipa.weights = weights.resolve(
            ipa.path,
            f"{prefix}.path",
            subfolder=ipa.model_subfolder or None,
            weight_name=ipa.weight_name or None,
            on_progress=on_progress,
        )
        ipa.images = [image(url, f"{prefix}.ip_adapter_image_url[{j}]") for j, url in enumerate(ipa.image_urls)]
        if ipa.mask_url:
            ipa.mask = image(ipa.mask_url, f"{prefix}.ip_adapter_mask_url")
    if cond.ip_adapters:
        cond.image_encoder.folder = _resolve_image_encoder(cond, weights, on_progress)
    if cond.ic_light is not None:
        ic = cond.ic_light
        ic.weights = weights.resolve(ic.model_url, "input.ic_light_model_url", on_progress=on_progress)
        ic.image = image(ic.image_url, "input.ic_light_image_url")
        if ic.background_image_url:
            ic.background = image(ic.background_image_url, "input.ic_light_model_background_image_url")


def _resolve_image_encoder(
    cond: Conditioning, weights: WeightsCache, on_progress: Callable[[str], None] | None
) -> Path:
    """The encoder folder named by image_encoder_path, else the `image_encoder` folder beside the first adapter.

    The fallback is diffusers' own layout (`h94/IP-Adapter`: `models/ip-adapter_sd15.safetensors`
    next to `models/image_encoder/`).
    """
    spec = cond.image_encoder
    field_name = "input.image_encoder_path"
    if spec.path:
        folder = weights.resolve(spec.path, field_name, subfolder=spec.subfolder or None, on_progress=on_progress)
        if not folder.is_dir():
            raise InputFetchError(
                field_name,
                spec.path,
                "must be a folder or a Hugging Face repo holding the encoder's config.json and weights, not one file",
            )
        return folder
    first = cond.ip_adapters[0]
    if _names_one_file(first.path):
        raise InputFetchError(
            field_name,
            first.path,
            "is required: ip_adapter[0].path is a single file, so there is no image_encoder folder beside it",
        )
    subfolder = spec.subfolder or "/".join(part for part in (first.model_subfolder, "image_encoder") if part)
    try:
        folder = weights.resolve(first.path, field_name, subfolder=subfolder, on_progress=on_progress)
    except InputFetchError as exc:
        raise InputFetchError(
            field_name,
            first.path,
            f"is required: no usable {subfolder!r} folder beside the IP-Adapter ({exc.reason})",
        ) from None
    return folder


def _names_one_file(ref: str) -> bool:
    """URLs and data URIs are one file; so is an existing local file."""
    if ref[:5].lower() == "data:" or "://" in ref:
        return True
    return Path(ref).expanduser().is_file()


def _fetch_json(url: str, field_name: str, policy: FetchPolicy, store: StoredFiles | None) -> dict[str, Any]:
    small = dataclasses.replace(policy, max_bytes=min(policy.max_bytes, MAX_CONFIG_BYTES))
    data = fetch_bytes(url, field_name, small, store=store)
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InputFetchError(field_name, url, f"not a JSON file ({exc})") from None
    if not isinstance(value, dict):
        raise InputFetchError(field_name, url, "a config.json must hold a JSON object")
    return value


# ----------------------------------------------------------------------------- applying


@contextlib.contextmanager
def applied(
    loaded: LoadedModel,
    view: DiffusionPipeline,
    params: GenerationParams,
    call_kwargs: dict[str, Any],
    *,
    models: ModelCache | None = None,
) -> Iterator[tuple[DiffusionPipeline, dict[str, Any]]]:
    """The view and call options with this request's conditioning; everything is undone on exit."""
    cond: Conditioning | None = getattr(params, "conditioning", None)
    if cond is None or not (cond.controlnets or cond.ip_adapters or cond.ic_light):
        yield view, call_kwargs
        return
    models = models or MODELS
    pipe = loaded.pipe
    _check_request(loaded, params, cond)
    kwargs = dict(call_kwargs)
    device, dtype = pipe.unet.device, pipe.unet.dtype
    with contextlib.ExitStack() as stack:
        if cond.ip_adapters:
            kwargs.update(
                ip_adapters_.apply(
                    stack,
                    pipe.unet,
                    cond.ip_adapters,
                    cond.image_encoder,
                    models=models,
                    allow_pickle=cond.allow_pickle,
                    classifier_free_guidance=_uses_cfg(pipe, params),
                    seed=params.seed,
                    width=params.width,
                    height=params.height,
                    vae_scale_factor=pipe.vae_scale_factor,
                    model_name=loaded.model_name,
                )
            )
        if cond.ic_light is not None:
            # IC-Light adds its offsets to the U-Net's weights (the request's merged copies among them).
            loaded.weights_ready()
            view.__dict__["unet"] = ic_light_.apply(
                stack,
                pipe.unet,
                view.unet,
                pipe.vae,
                cond.ic_light,
                models=models,
                width=params.width,
                height=params.height,
                model_name=loaded.model_name,
            )
        if cond.controlnets:
            nets = [
                controlnets_.cached_controlnet(
                    models,
                    spec,
                    pipe.unet,
                    pipe.vae_scale_factor,
                    device,
                    dtype,
                    f"controlnets[{i}]",
                    loaded.model_name,
                )
                for i, spec in enumerate(cond.controlnets)
            ]
            view = controlnets_.compose(pipe, view, nets, cond.controlnets, params.width, params.height)
            kwargs.pop("guidance_rescale", None)
            kwargs.update(controlnets_.call_kwargs(cond.controlnets, guess_mode=cond.guess_mode))
        yield view, kwargs


def _check_request(loaded: LoadedModel, params: GenerationParams, cond: Conditioning) -> None:
    """Combinations this build would otherwise get wrong silently, refused before any work."""
    tiled = tiling.needs_tiling(params.width, params.height, params.tile_width, params.tile_height)
    if cond.controlnets and tiled:
        raise OptionUnavailableError(
            "controlnets",
            f"controlnets: not supported yet together with tiled generation ({params.width}x{params.height} is larger "
            f"than the {params.tile_width}x{params.tile_height} tile); raise tile_width/tile_height to the image size",
        )
    if tiled and any(ipa.mask_url or ipa.mask is not None for ipa in cond.ip_adapters):
        raise OptionUnavailableError(
            "ip_adapter",
            "ip_adapter: masks are not supported yet together with tiled generation; raise tile_width/tile_height "
            "to the image size or leave ip_adapter_mask_url unset",
        )
    if cond.controlnets and params.rescale_betas_snr_zero:
        raise OptionUnavailableError(
            "rescale_betas_snr_zero",
            "rescale_betas_snr_zero: diffusers' ControlNet pipelines do not apply the guidance rescale that zero "
            "terminal SNR needs, so it cannot be combined with controlnets yet",
        )
    if cond.ic_light is not None and loaded.family != "sd15":
        raise OptionUnavailableError(
            "ic_light_model_url",
            f"ic_light_model_url: IC-Light models exist for the SD 1.5 family only; model {loaded.model_name!r} is "
            f"{loaded.family.upper()}",
        )
    for i, ipa in enumerate(cond.ip_adapters):
        if ipa.insight_face_model_path:
            raise OptionUnavailableError(f"ip_adapter[{i}].insight_face_model_path", ip_adapters_.FACE_ID_REFUSAL)
    controlnets_.check_images(cond.controlnets)
    ip_adapters_.check_images(cond.ip_adapters)
    if cond.ic_light is not None:
        ic_light_.check_images(cond.ic_light)


def _uses_cfg(pipe: DiffusionPipeline, params: GenerationParams) -> bool:
    """What the diffusers pipelines call do_classifier_free_guidance, known before the call."""
    return params.guidance_scale > 1 and getattr(pipe.unet.config, "time_cond_proj_dim", None) is None
