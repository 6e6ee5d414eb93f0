"""A request's LoRA set merged into copies of the weights it touches, swapped into the modules for the request.

For each adapted layer the request runs with `W' = W + Σ scale · scaling · up @ down` (PEFT's
alpha / r; DoRA layers are rescaled per output feature as PEFT merges them): what diffusers'
`fuse_lora` computes, but into new tensors, so the resident weights are never modified, no
rounding drift accumulates and nothing has to be unfused. On a GPU, layers of one shape group
(serving/lora_tensors.py) are merged by one `baddbmm` over their stacked weights, so a switch
costs a few launches per group and LoRA, not per layer: an SDXL attention LoRA's 560 layers are
4 groups. A CPU has no launches to save and merges layer by layer, in the weights' dtype where it
multiplies that fast (`_merge_layers`). Several LoRAs are applied one after the other, as
`fuse_lora` does.

The merged copies are installed by swapping their contents with the modules' own `weight`
tensors (copies into the same storage, never a new parameter) and restored by swapping back: no
module is wrapped and no parameter replaced, so the forward pass is the plain model's and a
compiled, CUDA-graphed U-Net (serving/compiled.py) keeps reading the tensors it was built on. While
installed, each merged copy holds the weight it replaced; after `restore` it holds the merged one
again, ready for a repeat.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from serving.lora_tensors import LoraTensors, Mergeable, ShapeGroup

# DoRA layers merged at once where half-precision weights are upcast on a CPU.
CPU_UPCAST_CHUNK = 8
# The request's LoRAs as (name, combined scale), in order; equal keys give equal merged weights.
MergeKey = tuple[tuple[str, float], ...]
# The scratch buffer a swap of merged and resident weights goes through, per chunk of layers.
SWAP_CHUNK_BYTES = 64 * 1024**2


@dataclass
class MergedWeights:
    """The weights one LoRA set gives, kept so that a request repeating the set merges nothing."""

    key: MergeKey
    parameters: list[tuple[torch.nn.Module, torch.nn.Parameter]]

    @property
    def nbytes(self) -> int:
        # Groups' views share storages; count each storage once.
        storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for _, p in self.parameters}
        return sum(storages.values())


def merge(
    active: Sequence[tuple[LoraTensors, float]],
    *,
    which: Callable[[ShapeGroup], bool] = lambda _group: True,
) -> list[tuple[torch.nn.Module, torch.nn.Parameter]]:
    """Merged weight parameters for the layers of the groups `which` selects; the modules are untouched."""
    current: dict[Mergeable, torch.Tensor] = {}
    with torch.no_grad():
        for lora, scale in active:
            for group in lora.groups:
                if which(group):
                    _merge_group(group, scale, current)
    return [(module, torch.nn.Parameter(weight, requires_grad=False)) for module, weight in current.items()]


def _merge_group(group: ShapeGroup, scale: float, current: dict[Mergeable, torch.Tensor]) -> None:
    weights = [current.get(module, module.weight) for module in group.modules]
    dtype, device = weights[0].dtype, weights[0].device
    if device.type == "cpu" and group.magnitudes is None:
        _merge_layers(group, scale, weights, current)
        return
    # CPUs have no fast (or no) half-precision matmul; PEFT computes those deltas in float32 too,
    # here a few layers at a time so that the float32 copies stay small.
    upcast = device.type == "cpu" and dtype in (torch.float16, torch.bfloat16)
    step = CPU_UPCAST_CHUNK if upcast else len(weights)
    compute = torch.float32 if upcast else dtype
    for start in range(0, len(weights), step):
        chunk = slice(start, start + step)
        stacked = torch.stack([w.detach().reshape(w.shape[0], -1) for w in weights[chunk]]).to(compute)
        up = torch.stack(group.ups[chunk]).to(compute)
        up *= group.scalings[chunk].to(compute)
        down = torch.stack(group.downs[chunk]).to(compute)
        if group.magnitudes is None:
            stacked.baddbmm_(up, down, alpha=scale)
        else:
            _merge_dora(group, chunk, stacked, torch.bmm(up, down).mul_(scale))
        merged = stacked.to(dtype)
        for module, weight, one in zip(group.modules[chunk], weights[chunk], merged.unbind(0)):
            current[module] = one.view(weight.shape)


def _merge_layers(
    group: ShapeGroup, scale: float, weights: Sequence[torch.Tensor], current: dict[Mergeable, torch.Tensor]
) -> None:
    """A CPU's merge, one layer at a time: `addmm` in the weight's dtype where the CPU multiplies it fast.

    Stacking a group's weights (as a GPU merge does, for few launches) costs a CPU a copy of every
    weight, and upcasting half-precision weights to float32 two more: on SDXL's U-Net in bfloat16
    that was 1.9 s of a 2-core switch, against 0.3 s for one `addmm` per layer in bfloat16 (oneDNN,
    float32 accumulation). Where the dtype has no fast CPU matmul (float16 on most CPUs), only the
    low-rank product is computed in float32, as PEFT does, and added in the weight's dtype. The
    factors are first cast to the weight's dtype, as PEFT casts its adapter layers to the base layer's.
    A layer already merged by an earlier LoRA of the set is our own copy, updated in place.
    """
    dtype = weights[0].dtype
    fast = _fast_cpu_matmul(dtype)
    alphas = (group.scalings.view(-1) * scale).tolist()
    for module, weight, up, down, alpha in zip(group.modules, weights, group.ups, group.downs, alphas, strict=True):
        flat = weight.detach().reshape(weight.shape[0], -1)
        owned = module in current
        up, down = up.to(dtype), down.to(dtype)
        if fast:
            merged = flat.addmm_(up, down, alpha=alpha) if owned else torch.addmm(flat, up, down, alpha=alpha)
        else:
            delta = torch.mm(up.float(), down.float()).mul_(alpha).to(dtype)
            merged = flat.add_(delta) if owned else flat + delta
        current[module] = merged.view(weight.shape)


def _fast_cpu_matmul(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies `dtype` matrices at full speed (bfloat16 needs AVX-512 BF16 or AMX)."""
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if dtype == torch.float16:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    return True


def _merge_dora(group: ShapeGroup, chunk: slice, stacked: torch.Tensor, delta: torch.Tensor) -> None:
    """PEFT's DoRA merge: `m / ‖W₀ + ΔW‖ · (W + ΔW)` per output feature.

    The norm is of the resident weight plus this LoRA's delta (PEFT's `_unmerged_base_weight`),
    the factor multiplies the weight with every LoRA merged so far, as `fuse_lora` does in turn.
    """
    assert group.magnitudes is not None
    base = torch.stack([m.weight.detach().reshape(m.weight.shape[0], -1) for m in group.modules[chunk]])
    norm = torch.linalg.norm(base.to(stacked.dtype) + delta, dim=2)
    magnitude = torch.stack(group.magnitudes[chunk]).to(stacked.dtype)
    stacked.add_(delta).mul_((magnitude / norm).unsqueeze(-1))


def install(parameters: Sequence[tuple[torch.nn.Module, torch.nn.Parameter]]) -> list[tuple[torch.nn.Module, torch.nn.Parameter]]:
    """Swaps the merged weights into the modules' own weight tensors; returns what `restore` swaps back."""
    _swap_contents(parameters)
    return list(parameters)


def restore(installed: Sequence[tuple[torch.nn.Module, torch.nn.Parameter]]) -> None:
    """The modules' weights back, and the merged copies holding the merged weights again."""
    _swap_contents(installed)


def _swap_contents(pairs: Sequence[tuple[torch.nn.Module, torch.nn.Parameter]]) -> None:
    """Exchanges the values of each module's weight and its partner, through a bounded scratch buffer.

    `_foreach_copy_` does a chunk's layers in a few launches rather than three per layer (an SDXL
    LoRA touches 560); the scratch stays under SWAP_CHUNK_BYTES so a swap never needs another
    merged set's worth of memory.
    """
    with torch.no_grad():
        chunk: list[tuple[torch.Tensor, torch.Tensor]] = []
        size = 0
        for module, partner in pairs:
            live = module._parameters["weight"]
            assert live is not None and live.shape == partner.shape and live.dtype == partner.dtype
            if chunk and (live.dtype, live.device) != (chunk[0][0].dtype, chunk[0][0].device):
                _swap_chunk(chunk)
                chunk, size = [], 0
            chunk.append((live.detach(), partner.detach()))
            size += live.numel() * live.element_size()
            if size >= SWAP_CHUNK_BYTES:
                _swap_chunk(chunk)
                chunk, size = [], 0
        if chunk:
            _swap_chunk(chunk)


def _swap_chunk(chunk: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
    lives = [live for live, _ in chunk]
    partners = [partner for _, partner in chunk]
    scratch = torch.empty(sum(t.numel() for t in lives), dtype=lives[0].dtype, device=lives[0].device)
    saved = [flat.view(t.shape) for flat, t in zip(scratch.split([t.numel() for t in lives]), lives)]
    torch._foreach_copy_(saved, lives)
    torch._foreach_copy_(lives, partners)
    torch._foreach_copy_(partners, saved)
