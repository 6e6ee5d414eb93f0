"""A request's LoRAs merged into the weights it runs with, and PEFT's wrappers out of the forward pass.

Resident adapters live in PEFT's LoRA layers, which wrap each adapted Linear / Conv of the U-Net
and text encoders; loading, eviction and the per-adapter scales all go through them. Running
through them is the costly part: on SDXL at 1024² with a rank-32 LoRA on an H100, PEFT's unfused
forward doubled the time of a request (+98% for diffusers' own `set_adapters`), and even with
every adapter disabled the wrappers cost +39% (bench/gpu.py). So for the length of one request
each wrapper is swapped out of its parent for
- its base layer, where none of the request's LoRAs touches it, or
- a copy of the base layer whose weight is `W + Σ scale·ΔW` (PEFT's own `get_delta_weight`, the
  math of `fuse_lora`), computed into a new tensor: the resident weights are never modified, so
  no rounding drift accumulates and nothing has to be unfused,
and put back afterwards. Layers PEFT computes differently (DoRA and other variants, LoRA bias)
keep the wrapper, which runs them unfused with the scales already set on it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from peft.tuners.lora.layer import LoraLayer

MERGEABLE_BASE_TYPES = (torch.nn.Linear, torch.nn.Conv2d)


@dataclass(frozen=True)
class LoraSlot:
    """Where one PEFT LoRA layer sits in its model, so it can be swapped out and back in."""

    parent: torch.nn.Module
    attr: str
    layer: LoraLayer


def lora_slots(model: torch.nn.Module) -> list[LoraSlot]:
    """Every LoRA wrapper in `model`, in module order, without walking into the wrappers.

    Each resident adapter adds modules inside every wrapper it touches; a walk that went into
    them (`named_modules`) would grow with the number of resident adapters.
    """
    slots: list[LoraSlot] = []
    for attr, child in model._modules.items():
        if isinstance(child, LoraLayer):
            slots.append(LoraSlot(model, attr, child))
        elif child is not None:
            slots.extend(lora_slots(child))
    return slots


def swap_in_merged(slots: Iterable[LoraSlot], scales: Mapping[str, float]) -> None:
    """Each slot gets its base layer, a merged copy of it, or (for unmergeable layers) its wrapper.

    The wrappers' PEFT state must already say which adapters are active at which scale
    (`set_scale`), since `get_delta_weight` reads the scaling from it.
    """
    for slot in slots:
        layer = slot.layer
        names = [name for name, scale in scales.items() if scale != 0.0 and name in layer.lora_A]
        if not names:
            replacement: torch.nn.Module = layer.get_base_layer()
        elif _mergeable(layer, names):
            replacement = _merged_copy(layer, names)
        else:
            continue
        slot.parent._modules[slot.attr] = replacement


def restore_wrappers(slots: Iterable[LoraSlot]) -> None:
    for slot in slots:
        slot.parent._modules[slot.attr] = slot.layer


def _mergeable(layer: LoraLayer, names: list[str]) -> bool:
    variants = getattr(layer, "lora_variant", {})
    return isinstance(layer.get_base_layer(), MERGEABLE_BASE_TYPES) and not any(
        layer.use_dora.get(name, False) or layer.lora_bias.get(name, False) or name in variants for name in names
    )


def _merged_copy(layer: LoraLayer, names: list[str]) -> torch.nn.Module:
    base = layer.get_base_layer()
    weight = base.weight
    with torch.no_grad():
        merged = weight.detach()
        for name in names:
            merged = _plus_delta(layer, name, merged)
    view = copy.copy(base)
    # A fresh parameter dict: copy.copy shares the base layer's, which must stay untouched.
    view._parameters = {**base._parameters, "weight": torch.nn.Parameter(merged, requires_grad=False)}
    return view


def _plus_delta(layer: LoraLayer, name: str, weight: torch.Tensor) -> torch.Tensor:
    """A new tensor `weight + scale·B·A`; one fused kernel for a plain Linear (the common case).

    A switch merges every adapted layer (560 in an SDXL attention LoRA), so kernel launches add
    up; other layer types go through PEFT's `get_delta_weight`.
    """
    lora_a, lora_b = layer.lora_A[name].weight, layer.lora_B[name].weight
    if (
        isinstance(layer.get_base_layer(), torch.nn.Linear)
        and not getattr(layer, "fan_in_fan_out", False)
        # CPUs lack fast half-precision matmuls; PEFT's path computes those in float32.
        and (weight.device.type == "cuda" or weight.dtype == torch.float32)
    ):
        return torch.addmm(
            weight, lora_b.to(weight.dtype), lora_a.to(weight.dtype), alpha=float(layer.scaling[name])
        )
    return weight + layer.get_delta_weight(name).to(weight.dtype)
