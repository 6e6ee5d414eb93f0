"""A request's LoRA set merged into the modules' own weights, beside an exact copy of each base weight.

For each adapted layer the request runs with `W' = W + Σ scale · scaling · up @ down` (PEFT's
alpha / r; DoRA layers are rescaled per output feature as PEFT merges them): what diffusers'
`fuse_lora` computes, but beside an exact copy of each base weight, so no rounding drift
accumulates and nothing has to be unfused. Several LoRAs are applied one after the other, as
`fuse_lora` does.

`apply` copies each base weight aside (the partner) and writes the merged weight straight into the
module's own weight tensor, one `addmm` per layer (`_apply_layers`) in the weights' dtype (on a
CPU where it multiplies that fast). On a switch the partners of the set it replaces, which hold
the base weights, become the new set's (`spares`): a layer both sets adapt is written once, from
its partner, with nothing put back first and nothing allocated; only the layers the new set leaves
are copied back. Writing into the same
storage (never a new parameter) keeps the forward pass the plain model's, and a compiled,
CUDA-graphed U-Net (serving/compiled.py) reads the tensors it was built on. A per-layer launch
costs a GPU microseconds; putting the base weights back, merging a shape group's layers at once
into new tensors and swapping them in (as DoRA's layers still are, below) moved every weight five
more times: tens of ms for FLUX.1's 22 GiB of adapted weights.

DoRA layers, whose norms read the base weights, are merged into new tensors (`merge`: on a GPU one
`baddbmm` per shape group of serving/lora_tensors.py, on a CPU layer by layer, `_merge_layers`)
and swapped in (`install`). Either way the state left is the same: each module's partner holds the
weight it replaced (the only copy of it: dropping an installed set would lose the base weights);
`restore` swaps back, after which the partner holds the merged weights, ready for a repeat. A
merge or a swap is all or nothing: one that fails half-way puts back what it did before raising.
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
    alphas = [scaling * scale for scaling in group.host_scalings]
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


def apply(
    active: Sequence[tuple[LoraTensors, float]],
    *,
    which: Callable[[ShapeGroup], bool] = lambda _group: True,
    spares: dict[torch.nn.Module, torch.Tensor] | None = None,
    spares_hold_weights: bool = False,
) -> list[tuple[torch.nn.Module, torch.nn.Parameter]]:
    """The LoRAs merged into the modules' own weights; returns (module, base weight) pairs, as `install` does.

    `spares`: buffers to keep base weights in, by module (a dropped set's), taken from the dict;
    `spares_hold_weights`: they already hold the modules' weights (the set was restored by copy).
    All or nothing: a merge that fails half-way puts the base weights back before raising.
    """
    spares = spares if spares is not None else {}
    groups = [(group, scale) for lora, scale in active for group in lora.groups if which(group)]
    if not all(group.magnitudes is None for group, _ in groups):
        # DoRA norms read the base weights: merged into new tensors.
        spares.clear()
        return install(merge(active, which=which))
    bases: dict[Mergeable, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for group, scale in groups:
                _apply_layers(group, scale, bases, spares, spares_hold_weights)
    except BaseException:
        with torch.no_grad():
            for module, base in bases.items():
                module.weight.detach().copy_(base)
            if spares_hold_weights:
                # Modules of the replaced set not reached yet may still hold its merged weights.
                for holder, spare in spares.items():
                    weight = holder._parameters["weight"]
                    assert weight is not None
                    weight.detach().copy_(spare)
        raise
    return [(module, torch.nn.Parameter(base, requires_grad=False)) for module, base in bases.items()]


def _apply_layers(
    group: ShapeGroup,
    scale: float,
    bases: dict[Mergeable, torch.Tensor],
    spares: dict[torch.nn.Module, torch.Tensor],
    spares_hold_weights: bool,
) -> None:
    """`_merge_layers`' arithmetic, written into each module's weight; its base weight copied aside first.

    One `addmm` per layer reading the base copy and writing the weight: on a GPU a layer's launch
    costs microseconds, where merging a group at once (`_merge_group`) moves every weight four more
    times (stacked, merged, swapped in), which for FLUX.1's 22 GiB of adapted weights is tens of ms.
    """
    dtype = group.modules[0].weight.dtype
    fast = group.modules[0].weight.device.type != "cpu" or _fast_cpu_matmul(dtype)
    alphas = [scaling * scale for scaling in group.host_scalings]
    for module, up, down, alpha in zip(group.modules, group.ups, group.downs, alphas, strict=True):
        live = module.weight.detach()
        rows = live.shape[0]
        up, down = up.to(dtype), down.to(dtype)
        # Where the dtype has no fast CPU matmul only the low-rank product is float32, as in `_merge_layers`.
        delta = torch.mm(up.float(), down.float()).mul_(alpha).to(dtype) if not fast else torch.empty(0)
        if module in bases:
            source = live.reshape(rows, -1)
        else:
            # With `spares_hold_weights` the spare holds the base weight and the module may not (the
            # replaced set's merged weight, left for this write): the base is read from the spare.
            spare = spares.get(module)
            held = spare if spares_hold_weights else None
            base = spare
            if base is None or base.shape != live.shape or base.dtype != dtype or not base.is_contiguous():
                base = torch.empty(live.shape, dtype=dtype, device=live.device)
            if base is not held:
                base.copy_(live if held is None else held)
            bases[module] = base
            spares.pop(module, None)
            source = base.view(rows, -1)
        if live.is_contiguous():
            out = live.view(rows, -1)
            if fast:
                torch.addmm(source, up, down, alpha=alpha, out=out)
            else:
                torch.add(source, delta, out=out)
        else:
            live.copy_((torch.addmm(source, up, down, alpha=alpha) if fast else source + delta).view(live.shape))


def install(parameters: Sequence[tuple[torch.nn.Module, torch.nn.Parameter]]) -> list[tuple[torch.nn.Module, torch.nn.Parameter]]:
    """Swaps the merged weights into the modules' own weight tensors; returns what `restore` swaps back."""
    _swap_contents(parameters)
    return list(parameters)


def restore(installed: Sequence[tuple[torch.nn.Module, torch.nn.Parameter]], *, keep_merged: bool = True) -> None:
    """The modules' weights back, and the merged copies holding the merged weights again.

    Without `keep_merged` the base weights are copied back (one copy, not a swap's three): the
    partners then hold the same values as the modules, ready to be `apply`'s spares.
    """
    if keep_merged:
        _swap_contents(installed)
        return
    with torch.no_grad():
        for module, partner in installed:
            live = module._parameters["weight"]
            assert live is not None
            live.detach().copy_(partner.detach())


def _swap_contents(pairs: Sequence[tuple[torch.nn.Module, torch.nn.Parameter]]) -> None:
    """Exchanges the values of each module's weight and its partner, through a bounded scratch buffer.

    `_foreach_copy_` does a chunk's layers in a few launches rather than three per layer (an SDXL
    LoRA touches 560); the scratch stays under SWAP_CHUNK_BYTES so a swap never needs another
    merged set's worth of memory. A chunk that fails (its scratch not allocated) is left as it was
    and the chunks before it are swapped back, so the modules never run half-merged.
    """
    chunks: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[]]
    size = 0
    for module, partner in pairs:
        live = module._parameters["weight"]
        assert live is not None and live.shape == partner.shape and live.dtype == partner.dtype
        chunk = chunks[-1]
        if chunk and (size >= SWAP_CHUNK_BYTES or (live.dtype, live.device) != (chunk[0][0].dtype, chunk[0][0].device)):
            chunks.append(chunk := [])
            size = 0
        chunk.append((live.detach(), partner.detach()))
        size += live.numel() * live.element_size()
    with torch.no_grad():
        done = 0
        try:
            for chunk in chunks:
                if chunk:
                    _swap_chunk(chunk)
                done += 1
        except BaseException:
            for chunk in reversed(chunks[:done]):
                if chunk:
                    _swap_chunk(chunk)
            raise


def _swap_chunk(chunk: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
    lives = [live for live, _ in chunk]
    partners = [partner for _, partner in chunk]
    scratch = torch.empty(sum(t.numel() for t in lives), dtype=lives[0].dtype, device=lives[0].device)
    saved = [flat.view(t.shape) for flat, t in zip(scratch.split([t.numel() for t in lives]), lives)]
    torch._foreach_copy_(saved, lives)
    torch._foreach_copy_(lives, partners)
    torch._foreach_copy_(partners, saved)
