"""A LoRA as low-rank tensors per adapted layer of one pipeline, read the way diffusers reads it.

diffusers' `load_lora_weights` normalises the file (kohya / A1111 and older diffusers keys become
PEFT's `lora_A` / `lora_B`), works out each layer's rank and alpha (the file's metadata, kohya
`.alpha` keys, rank and alpha patterns) and then has PEFT wrap every adapted layer: on an SDXL
U-Net that injection took about a second per LoRA. Here the same normalisation runs (diffusers'
own converters and `_create_lora_config`, PEFT's own pattern matching and scaling rule), and the
result is kept as plain tensors: for each adapted Linear / Conv2d, `up` (out × r), `down`
(r × in·k·k) and PEFT's scaling, so that `W + scale · scaling · up @ down` is the weight diffusers'
`fuse_lora` gives (DoRA layers also keep their magnitudes). The matrices stay views of the host
tier's tensors in the file's dtype: on a CPU nothing is copied, and a GPU gets the file's pinned
buffer in one transfer. No module is created or modified.

Layers are grouped by component, shape (out, in·k·k, r) and kind: the merge stacks one group's
matrices on the device, so a request costs one batched matmul per group, not one per layer
(serving/lora_merge.py).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch
from diffusers import DiffusionPipeline, ModelMixin
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft
from diffusers.utils.peft_utils import _create_lora_config
from peft.utils.other import get_pattern_key

from serving.lora_cache import ParsedLora

# The models diffusers loads LoRAs into, by pipeline attribute: Stable Diffusion's, then FLUX's
# (diffusers loads no LoRA into FLUX's T5, its `text_encoder_2`).
LORA_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
FLUX_LORA_COMPONENTS = ("text_encoder", "transformer")
UNET = "unet"
TRANSFORMER = "transformer"
# The denoising model, by pipeline attribute: Stable Diffusion's U-Net, FLUX's transformer.
DENOISERS = (UNET, TRANSFORMER)
# Text-encoder layers whose rank diffusers reads off the file (others take the config's `r`).
TEXT_ENCODER_RANKED = (".q_proj", ".k_proj", ".v_proj", ".out_proj", ".fc1", ".fc2")
MERGEABLE = (torch.nn.Linear, torch.nn.Conv2d)
Mergeable = torch.nn.Linear | torch.nn.Conv2d
LORA_A, LORA_B = ".lora_A.weight", ".lora_B.weight"
# The down (A) matrix of a file's layer in every layout: PEFT, kohya, XLabs (`qkv_lora1.down.weight`).
FILE_DOWN_SUFFIXES = (LORA_A, ".lora_down.weight", ".down.weight")
# sd-scripts' FLUX single-block `linear1`: q, k, v and the MLP's input projection in one.
FUSED_SINGLE_LINEAR1 = re.compile(r"single_blocks_\d+_linear1$")
# Unmatched keys an error names before it says how many more there are.
MAX_KEYS_NAMED = 8
# DoRA's per-output-feature magnitude, as PEFT saves it (with or without `.weight`).
MAGNITUDE = (".lora_magnitude_vector", ".lora_magnitude_vector.weight")


class LoraFitError(Exception):
    """The LoRA cannot be applied to this pipeline (wrong family, unsupported variant); the message says why."""


@dataclass(frozen=True)
class LayerDelta:
    """One adapted layer: its module and the LoRA matrices as 2-D (conv kernels flattened)."""

    component: str
    name: str
    module: Mergeable
    up: torch.Tensor
    down: torch.Tensor
    # PEFT's alpha / r (or alpha / √r with rsLoRA), times diffusers' text-encoder lora_scale.
    scaling: float
    # DoRA: the magnitude per output feature (out,); None for a plain LoRA layer.
    magnitude: torch.Tensor | None = None


@dataclass(frozen=True)
class ShapeGroup:
    """Layers of one component with one weight shape and rank: merged by one batched matmul.

    The matrices stay one tensor per layer, in the file's dtype, so that making a LoRA resident
    copies nothing on a CPU and is one transfer to a GPU; the merge stacks them on the device.
    """

    component: str
    modules: tuple[Mergeable, ...]
    # (out, r) and (r, in·k·k) per layer
    ups: tuple[torch.Tensor, ...]
    downs: tuple[torch.Tensor, ...]
    # Each layer's scaling, (n, 1, 1) float32 on the device, to multiply the stacked `ups` by.
    scalings: torch.Tensor
    # The same on the host: a per-layer merge reads them without waiting for the device.
    host_scalings: tuple[float, ...]
    # DoRA layers' magnitudes (out,) each; None in a group of plain LoRA layers.
    magnitudes: tuple[torch.Tensor, ...] | None = None


@dataclass(frozen=True)
class LoraTensors:
    """One LoRA ready to merge into one pipeline's weights, on the device of the layers it adapts."""

    name: str
    groups: tuple[ShapeGroup, ...]
    # What it holds on that device (on a CPU: the host tier's tensors, shared with it).
    nbytes: int

    @property
    def layer_count(self) -> int:
        return sum(len(group.modules) for group in self.groups)


def is_flux(pipe: DiffusionPipeline) -> bool:
    return isinstance(getattr(pipe, TRANSFORMER, None), torch.nn.Module)


def denoiser(pipe: DiffusionPipeline) -> ModelMixin:
    """The model that runs every step: the U-Net, or FLUX's transformer."""
    for attr in DENOISERS:
        model = getattr(pipe, attr, None)
        if isinstance(model, ModelMixin):
            return model
    raise ValueError(f"a {type(pipe).__name__} has neither a U-Net nor a transformer")


def lora_models(pipe: DiffusionPipeline) -> dict[str, torch.nn.Module]:
    """The models diffusers loads LoRAs into that this pipeline has."""
    components = FLUX_LORA_COMPONENTS if is_flux(pipe) else LORA_COMPONENTS
    models = {attr: getattr(pipe, attr, None) for attr in components}
    return {attr: model for attr, model in models.items() if isinstance(model, torch.nn.Module)}


def lora_tensors(pipe: DiffusionPipeline, parsed: ParsedLora, *, sdxl: bool) -> LoraTensors:
    """The LoRA's layers of this pipeline; every layer the file adapts must be one of them."""
    if is_flux(pipe):
        deltas = _flux_deltas(pipe, parsed)
    else:
        deltas = layer_deltas(pipe, parsed, sdxl=sdxl)
    if not deltas:
        raise LoraFitError("it has no weights for any part of this model")
    if len(deltas) < parsed.layer_count and not is_flux(pipe):
        raise LoraFitError(
            f"only {len(deltas)} of its {parsed.layer_count} layers match a layer of the model"
        )
    deltas, nbytes = _on_device(deltas, parsed)
    return LoraTensors(parsed.name, tuple(_grouped(deltas)), nbytes)


def layer_deltas(
    pipe: DiffusionPipeline,
    parsed: ParsedLora,
    *,
    sdxl: bool,
    missing: list[str] | None = None,
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> list[LayerDelta]:
    """What `load_lora_weights` would put in each layer, as matrices; layers missing from the model are left out.

    They are named in `missing` (when given), as are keys of no component diffusers loads LoRAs into.
    `state_dict` (default: the file's) is a part of the file, read with the file's metadata.
    """
    tensors = dict(parsed.state_dict if state_dict is None else state_dict)
    if is_flux(pipe):
        # FLUX's loader returns alphas only when asked; kohya and XLabs files have them folded in.
        state_dict, network_alphas = pipe.lora_state_dict(tensors, return_alphas=True)
    else:
        config = {"unet_config": pipe.unet.config} if sdxl else {}
        state_dict, network_alphas = pipe.lora_state_dict(tensors, **config)
    if not all("lora" in key for key in state_dict):
        raise LoraFitError("invalid LoRA checkpoint: every parameter name must contain 'lora'")
    models = lora_models(pipe)
    if missing is not None:
        missing.extend(key for key in state_dict if key.split(".")[0] not in models)
    deltas: list[LayerDelta] = []
    for attr, model in models.items():
        part, alphas, metadata = _component_part(state_dict, network_alphas, parsed.metadata, attr)
        if not part:
            continue
        denoising = attr in DENOISERS
        if denoising:
            peft_dict, rank = _unet_peft(part)
        else:
            peft_dict, rank = _text_encoder_peft(part, model)
        config = _create_lora_config(peft_dict, alphas, metadata, rank, is_unet=denoising)
        if config.lora_bias or any(not key.endswith((LORA_A, LORA_B, *MAGNITUDE)) for key in peft_dict):
            raise LoraFitError("LoRA bias and LoRA variants other than DoRA are not supported; use a plain LoRA")
        extra = 1.0 if denoising else pipe.lora_scale
        deltas.extend(_deltas(attr, model, peft_dict, config, extra, missing))
    return deltas


def _flux_deltas(pipe: DiffusionPipeline, parsed: ParsedLora) -> list[LayerDelta]:
    """A FLUX LoRA in any layout diffusers reads, where every key of the file must land on a layer.

    diffusers' FLUX converters turn kohya / sd-scripts, XLabs, ComfyUI and fal Kontext files into
    PEFT keys, splitting fused q/k/v (and single blocks' q/k/v/MLP) layers into diffusers' separate
    ones; but they, and PEFT's injection after them, drop what they do not know without an error
    (T5 layers, blocks the model lacks, unknown prefixes). Here a file whose layers all convert to
    layers of the model is checked by a count (each file layer gives `_fused_parts` layers); only a
    file that fails it is converted layer by layer, to name the keys that match nothing.
    """
    missing: list[str] = []
    stems = _file_layers(parsed.state_dict)
    try:
        deltas = layer_deltas(pipe, parsed, sdxl=False, missing=missing)
    except LoraFitError:
        raise
    except Exception as exc:  # noqa: BLE001 - diffusers' converters raise anything on what they do not know
        failure: Exception | None = exc
    else:
        if not missing and len(deltas) == sum(_fused_parts(stem) for stem in stems):
            return deltas
        failure = None
    if unmatched := _unmatched_keys(pipe, parsed, stems):
        shown = ", ".join(unmatched[:MAX_KEYS_NAMED])
        more = f" (and {len(unmatched) - MAX_KEYS_NAMED} more)" if len(unmatched) > MAX_KEYS_NAMED else ""
        raise LoraFitError(f"{len(unmatched)} of its keys match no layer of this FLUX model: {shown}{more}")
    if failure is not None:
        raise failure
    return deltas


def _file_layers(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """The file's adapted layers as it names them: the key of each down (A) matrix without its suffix."""
    return sorted(
        {key.removesuffix(suffix) for key in state_dict for suffix in FILE_DOWN_SUFFIXES if key.endswith(suffix)}
    )


def _fused_parts(stem: str) -> int:
    """How many diffusers layers one layer of the file becomes: FLUX's original fused projections split."""
    if FUSED_SINGLE_LINEAR1.search(stem):
        return 4
    return 3 if "qkv" in stem else 1


def _unmatched_keys(pipe: DiffusionPipeline, parsed: ParsedLora, stems: list[str]) -> list[str]:
    """The file's keys that land on no layer of the model: each file layer converted on its own."""
    unmatched: list[str] = []
    owned: set[str] = set()
    for stem in stems:
        keys = [key for key in parsed.state_dict if key.startswith(stem + ".")]
        owned.update(keys)
        missing: list[str] = []
        try:
            part = {key: parsed.state_dict[key] for key in keys}
            found = layer_deltas(pipe, parsed, sdxl=False, missing=missing, state_dict=part)
        except Exception:  # noqa: BLE001 - diffusers' converters raise anything on what they do not know
            found = []
        if missing or not found:
            unmatched.extend(keys)
    unmatched.extend(key for key in parsed.state_dict if key not in owned)
    return sorted(unmatched)


def _component_part(
    state_dict: Mapping[str, torch.Tensor],
    network_alphas: Mapping[str, float] | None,
    metadata: Mapping[str, Any] | None,
    prefix: str,
) -> tuple[dict[str, torch.Tensor], dict[str, float] | None, dict[str, Any] | None]:
    """One component's keys with its prefix removed, as diffusers' per-component loaders take them."""
    start = f"{prefix}."
    part = {key.removeprefix(start): value for key, value in state_dict.items() if key.startswith(start)}
    alphas = None
    if network_alphas:
        alphas = {
            key.removeprefix(start): value
            for key, value in network_alphas.items()
            if key.startswith(start) and key.split(".")[0] == prefix
        }
    part_metadata = None
    if metadata is not None:
        part_metadata = {key.removeprefix(start): value for key, value in metadata.items() if key.startswith(start)}
    return part, alphas, part_metadata


def _unet_peft(part: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """diffusers' `load_lora_adapter`: PEFT keys, ranks keyed by anchored pattern."""
    if "lora_A" not in next(iter(part)):
        part = convert_unet_state_dict_to_peft(part)
    rank = {f"^{key}": value.shape[1] for key, value in part.items() if "lora_B" in key and value.ndim > 1}
    return part, rank


def _text_encoder_peft(
    part: dict[str, torch.Tensor], model: torch.nn.Module
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """diffusers' `_load_lora_into_text_encoder`: PEFT keys, ranks of the attention and MLP projections."""
    peft_dict = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
    if not hasattr(model, "text_model"):
        peft_dict = {key.removeprefix("text_model."): value for key, value in peft_dict.items()}
    rank: dict[str, int] = {}
    for key, value in peft_dict.items():
        if key.endswith(LORA_B) and key.removesuffix(LORA_B).endswith(TEXT_ENCODER_RANKED):
            rank[key] = value.shape[1]
    return peft_dict, rank


def _deltas(
    component: str,
    model: torch.nn.Module,
    peft_dict: Mapping[str, torch.Tensor],
    config: Any,
    extra: float,
    missing: list[str] | None = None,
) -> Iterable[LayerDelta]:
    # One walk of the model: `get_submodule` per layer went through diffusers' attribute lookup
    # (a third of a miss on SDXL).
    modules = dict(model.named_modules())
    for key, down in peft_dict.items():
        if not key.endswith(LORA_A):
            continue
        name = key.removesuffix(LORA_A)
        up = peft_dict.get(name + LORA_B)
        if up is None:
            raise LoraFitError(f"layer {component}.{name} has a down matrix and no up matrix")
        module = modules.get(name)
        if module is None:
            if missing is not None:
                missing.append(f"{component}.{name}")
            continue
        if not isinstance(module, MERGEABLE):
            # Qualified: a PEFT wrapper left in the module is also called `Linear`.
            kind = f"{type(module).__module__}.{type(module).__qualname__}"
            raise LoraFitError(f"layer {component}.{name} is a {kind}, not a torch.nn.Linear or Conv2d")
        r = _per_layer(config.rank_pattern, name, config.r)
        alpha = _per_layer(config.alpha_pattern, name, config.lora_alpha)
        scaling = (alpha / math.sqrt(r) if config.use_rslora else alpha / r) * extra
        weight = module.weight
        up2d, down2d = up.flatten(1), down.flatten(1)
        if (
            up.shape[2:] not in ((), (1, 1))
            or up2d.shape[1] != down2d.shape[0]
            or up2d.shape[0] != weight.shape[0]
            or down2d.shape[1] != weight[0].numel()
        ):
            raise LoraFitError(
                f"layer {component}.{name}: LoRA matrices {tuple(up.shape)} · {tuple(down.shape)} do not fit "
                f"its weight {tuple(weight.shape)}"
            )
        magnitude = next((peft_dict[name + suffix] for suffix in MAGNITUDE if name + suffix in peft_dict), None)
        if magnitude is not None:
            if magnitude.numel() != weight.shape[0]:
                raise LoraFitError(f"layer {component}.{name}: DoRA magnitude {tuple(magnitude.shape)} does not fit")
            magnitude = magnitude.reshape(-1)
        yield LayerDelta(component, name, module, up2d, down2d, scaling, magnitude)


def _per_layer(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
    """PEFT's rank / alpha pattern lookup, with the patterns diffusers writes (full module paths) found directly.

    PEFT tries every pattern as a regular expression against every layer; a LoRA with a few
    hundred layers of another rank made that hundreds of milliseconds per load.
    """
    for exact in (f"^{name}", name):
        if exact in patterns:
            return patterns[exact]
    return patterns.get(get_pattern_key(patterns.keys(), name), default) if patterns else default


def _on_device(deltas: list[LayerDelta], parsed: ParsedLora) -> tuple[list[LayerDelta], int]:
    """The matrices on their layers' device: as they are on a CPU, one transfer of the pinned buffer to a GPU."""
    tensors = [t for delta in deltas for t in _matrices(delta)]
    device = deltas[0].module.weight.device
    if all(t.device == device for t in tensors) and all(d.module.weight.device == device for d in deltas):
        return deltas, _bytes(tensors)
    if device.type == "cpu" or any(delta.module.weight.device != device for delta in deltas):
        moved = [_moved(d, partial(torch.Tensor.to, device=d.module.weight.device)) for d in deltas]
        return moved, _bytes(t for d in moved for t in _matrices(d))
    flat = parsed.flat
    if flat is None or not all(_inside(t, flat) for t in tensors):
        moved = [_moved(d, lambda t: t.to(device, non_blocking=True)) for d in deltas]
        return moved, _bytes(t for d in moved for t in _matrices(d))
    on_device = flat.to(device, non_blocking=True)

    def there(tensor: torch.Tensor) -> torch.Tensor:
        offset = tensor.data_ptr() - flat.data_ptr()
        size = tensor.numel() * tensor.element_size()
        return on_device[offset : offset + size].view(tensor.dtype).view(tensor.shape)

    return [_moved(d, there) for d in deltas], on_device.numel()


def _matrices(delta: LayerDelta) -> tuple[torch.Tensor, ...]:
    return (delta.up, delta.down) if delta.magnitude is None else (delta.up, delta.down, delta.magnitude)


def _moved(delta: LayerDelta, move: Callable[[torch.Tensor], torch.Tensor]) -> LayerDelta:
    magnitude = None if delta.magnitude is None else move(delta.magnitude)
    return replace(delta, up=move(delta.up), down=move(delta.down), magnitude=magnitude)


def _inside(tensor: torch.Tensor, flat: torch.Tensor) -> bool:
    start = tensor.data_ptr() - flat.data_ptr()
    return tensor.is_contiguous() and 0 <= start and start + tensor.numel() * tensor.element_size() <= flat.numel()


def _bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Each storage once: a file's matrices may share one."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def _grouped(deltas: list[LayerDelta]) -> Iterable[ShapeGroup]:
    """Text encoders' groups come first, as they run first."""
    groups: dict[tuple[str, int, int, int, bool], list[LayerDelta]] = {}
    for delta in deltas:
        key = (delta.component, delta.up.shape[0], delta.down.shape[1], delta.down.shape[0], delta.magnitude is not None)
        groups.setdefault(key, []).append(delta)
    last = len(LORA_COMPONENTS)
    order = sorted(groups, key=lambda key: last if key[0] in DENOISERS else LORA_COMPONENTS.index(key[0]))
    for key in order:
        members = groups[key]
        yield ShapeGroup(
            key[0],
            tuple(d.module for d in members),
            tuple(d.up for d in members),
            tuple(d.down for d in members),
            torch.tensor([d.scaling for d in members], dtype=torch.float32)
            .view(-1, 1, 1)
            .to(members[0].up.device, non_blocking=True),
            tuple(float(d.scaling) for d in members),
            tuple(d.magnitude for d in members if d.magnitude is not None) if key[4] else None,
        )
