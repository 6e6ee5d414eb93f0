"""FLUX.1 transformer weights in Black Forest Labs' original layout, the one single-file checkpoints ship.

BFL's `flux1-dev.safetensors` and most shared fine-tunes name the transformer's weights as BFL's
reference code does (`double_blocks.0.img_attn.qkv.weight`, in "all-in-one" files under
`model.diffusion_model.`), with each attention's q, k and v fused in one matrix (`qkv`) and a
single block's q, k, v and MLP input in another (`linear1`). `to_diffusers` maps them onto
`FluxTransformer2DModel`'s names as diffusers' `convert_flux_transformer_checkpoint_to_diffusers`
does, but splits `linear1` at the checkpoint's own width, where diffusers' converter assumes
FLUX.1's 3072 (so the tests' tiny transformer takes the same path as FLUX.1's); `to_bfl` is its
inverse, for the tests' fixtures. A file already in diffusers' names (a diffusers folder's transformer
weights handed over as one file) needs no mapping: `is_diffusers_layout` tells it apart, and
`bfl_names` shows diffusers' family inference, which only knows BFL's names, what it looks for.
"""

from __future__ import annotations

import re
from collections.abc import Collection

import torch

# Where all-in-one files (transformer + VAE + text encoders) keep the transformer.
ALL_IN_ONE_PREFIX = "model.diffusion_model."
PLAIN, FUSED, SWAPPED = "plain", "fused", "swapped"
# (diffusers layer(s), BFL layer, how): weight and bias alike. FUSED: the diffusers layers' outputs
# stacked in this order, each of the model's width but the last, which takes the rest (linear1's MLP).
# SWAPPED: AdaLayerNormContinuous's projection, (shift, scale) in BFL's code, (scale, shift) in diffusers'.
TOP_LEVEL: tuple[tuple[tuple[str, ...], str, str], ...] = (
    (("time_text_embed.timestep_embedder.linear_1",), "time_in.in_layer", PLAIN),
    (("time_text_embed.timestep_embedder.linear_2",), "time_in.out_layer", PLAIN),
    (("time_text_embed.text_embedder.linear_1",), "vector_in.in_layer", PLAIN),
    (("time_text_embed.text_embedder.linear_2",), "vector_in.out_layer", PLAIN),
    (("context_embedder",), "txt_in", PLAIN),
    (("x_embedder",), "img_in", PLAIN),
    (("proj_out",), "final_layer.linear", PLAIN),
    (("norm_out.linear",), "final_layer.adaLN_modulation.1", SWAPPED),
)
# FLUX.1 [dev]'s guidance embedding; [schnell] has none.
GUIDANCE: tuple[tuple[tuple[str, ...], str, str], ...] = (
    (("time_text_embed.guidance_embedder.linear_1",), "guidance_in.in_layer", PLAIN),
    (("time_text_embed.guidance_embedder.linear_2",), "guidance_in.out_layer", PLAIN),
)
DOUBLE_BLOCK: tuple[tuple[tuple[str, ...], str, str], ...] = (
    (("norm1.linear",), "img_mod.lin", PLAIN),
    (("norm1_context.linear",), "txt_mod.lin", PLAIN),
    (("attn.to_q", "attn.to_k", "attn.to_v"), "img_attn.qkv", FUSED),
    (("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), "txt_attn.qkv", FUSED),
    (("attn.to_out.0",), "img_attn.proj", PLAIN),
    (("attn.to_add_out",), "txt_attn.proj", PLAIN),
    (("ff.net.0.proj",), "img_mlp.0", PLAIN),
    (("ff.net.2",), "img_mlp.2", PLAIN),
    (("ff_context.net.0.proj",), "txt_mlp.0", PLAIN),
    (("ff_context.net.2",), "txt_mlp.2", PLAIN),
)
SINGLE_BLOCK: tuple[tuple[tuple[str, ...], str, str], ...] = (
    (("norm.linear",), "modulation.lin", PLAIN),
    (("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), "linear1", FUSED),
    (("proj_out",), "linear2", PLAIN),
)
# The RMSNorms of q and k: diffusers' `.weight` is BFL's `.scale`.
DOUBLE_BLOCK_NORMS = {
    "attn.norm_q": "img_attn.norm.query_norm",
    "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm",
    "attn.norm_added_k": "txt_attn.norm.key_norm",
}
SINGLE_BLOCK_NORMS = {"attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"}
# Tensors: diffusers names → BFL name, how.
Pairs = list[tuple[tuple[str, ...], str, str]]
# Names only diffusers' `FluxTransformer2DModel` has all of: SD3's transformer has no single blocks,
# Chroma's and FLUX.2's single blocks no modulation of their own, HunyuanVideo's image input is a convolution.
DIFFUSERS_SIGNATURE = frozenset({
    "x_embedder.weight",
    "transformer_blocks.0.norm1_context.linear.weight",
    "single_transformer_blocks.0.norm.linear.weight",
})
DIFFUSERS_GUIDANCE = "time_text_embed.guidance_embedder.linear_1.weight"


class LayoutError(ValueError):
    """The weights are not a FLUX.1 transformer in the layout this module reads."""


def transformer_keys(keys: set[str]) -> dict[str, str]:
    """BFL name → the key it has in the file: under `model.diffusion_model.` where the file uses it."""
    if any(key.startswith(ALL_IN_ONE_PREFIX) for key in keys):
        return {key.removeprefix(ALL_IN_ONE_PREFIX): key for key in keys if key.startswith(ALL_IN_ONE_PREFIX)}
    return {key: key for key in keys}


def is_diffusers_layout(names: Collection[str]) -> bool:
    """The tensors are named as `FluxTransformer2DModel`'s state dict (unprefixed)."""
    return DIFFUSERS_SIGNATURE.issubset(names)


def bfl_names(names: Collection[str]) -> dict[str, str]:
    """BFL name → diffusers name, of a diffusers-layout transformer's tensors the two layouts share unchanged
    (all but the fused and swapped ones): what diffusers' family inference reads, guidance and image input
    included."""
    guidance = {"guidance_in.in_layer.weight"} if DIFFUSERS_GUIDANCE in names else set()
    pairs = tensor_pairs(guidance, _block_counts(names, "transformer_blocks.", "single_transformer_blocks."))
    return {bfl: diffusers[0] for diffusers, bfl, how in pairs if how == PLAIN and diffusers[0] in names}


def to_diffusers(bfl: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A BFL-layout FLUX.1 transformer's tensors under `FluxTransformer2DModel`'s names.

    Raises LayoutError naming the first tensor the layout needs and the file lacks, or the ones it has
    beyond the layout; shapes are checked by the model they load into.
    """
    width = _width(bfl)
    remaining = dict(bfl)
    converted: dict[str, torch.Tensor] = {}
    for diffusers_names, bfl_name, how in tensor_pairs(bfl, _block_counts(bfl, "double_blocks.", "single_blocks.")):
        if bfl_name not in remaining:
            raise LayoutError(f"no {bfl_name!r} tensor")
        tensor = remaining.pop(bfl_name)
        if how == SWAPPED:
            shift, scale = tensor.chunk(2, dim=0)
            converted[diffusers_names[0]] = torch.cat([scale, shift])
        elif how == FUSED:
            rest = tensor.shape[0] - width * (len(diffusers_names) - 1)
            if rest <= 0:
                raise LayoutError(f"{bfl_name!r} has {tensor.shape[0]} rows, too few for the model's width {width}")
            parts = tensor.split([width] * (len(diffusers_names) - 1) + [rest], dim=0)
            converted.update({name: part for name, part in zip(diffusers_names, parts, strict=True)})
        else:
            converted[diffusers_names[0]] = tensor
    if remaining:
        raise LayoutError(f"tensors outside FLUX.1's transformer layout: {', '.join(sorted(remaining)[:5])}")
    return converted


def to_bfl(diffusers: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """`to_diffusers`' inverse: a `FluxTransformer2DModel` state dict in BFL's layout, each name after `prefix`."""
    counts = _block_counts(diffusers, "transformer_blocks.", "single_transformer_blocks.")
    has_guidance = any(key.startswith("time_text_embed.guidance_embedder.") for key in diffusers)
    bfl_guidance = {"guidance_in.in_layer.weight"} if has_guidance else set()
    bfl: dict[str, torch.Tensor] = {}
    for diffusers_names, bfl_name, how in tensor_pairs(bfl_guidance, counts):
        tensors = [diffusers[name] for name in diffusers_names]
        if how == SWAPPED:
            scale, shift = tensors[0].chunk(2, dim=0)
            bfl[prefix + bfl_name] = torch.cat([shift, scale])
        else:
            bfl[prefix + bfl_name] = torch.cat(tensors).contiguous()
    return bfl


def _width(bfl: dict[str, torch.Tensor]) -> int:
    if "img_in.weight" not in bfl:
        raise LayoutError("no 'img_in.weight' tensor")
    return int(bfl["img_in.weight"].shape[0])


def _block_counts(names: Collection[str], double: str, single: str) -> tuple[int, int]:
    """How many double and single blocks the names number, blocks named `{double}{i}.` and `{single}{i}.`."""

    def count(prefix: str) -> int:
        pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
        return max((int(match.group(1)) for key in names if (match := pattern.match(key))), default=-1) + 1

    return count(double), count(single)


def tensor_pairs(bfl_names: dict[str, torch.Tensor] | set[str], counts: tuple[int, int]) -> Pairs:
    """Every tensor of a transformer with `counts` double and single blocks: (diffusers names, BFL name, how)."""
    layers = list(TOP_LEVEL)
    if "guidance_in.in_layer.weight" in bfl_names:
        layers += GUIDANCE
    double_blocks, single_blocks = counts
    for index in range(double_blocks):
        layers += _block(f"transformer_blocks.{index}.", f"double_blocks.{index}.", DOUBLE_BLOCK)
    for index in range(single_blocks):
        layers += _block(f"single_transformer_blocks.{index}.", f"single_blocks.{index}.", SINGLE_BLOCK)
    pairs = [
        (tuple(f"{name}.{kind}" for name in names), f"{bfl_name}.{kind}", how)
        for names, bfl_name, how in layers
        for kind in ("weight", "bias")
    ]
    for index in range(double_blocks):
        pairs += _norms(f"transformer_blocks.{index}.", f"double_blocks.{index}.", DOUBLE_BLOCK_NORMS)
    for index in range(single_blocks):
        pairs += _norms(f"single_transformer_blocks.{index}.", f"single_blocks.{index}.", SINGLE_BLOCK_NORMS)
    return pairs


def _block(
    diffusers_prefix: str, bfl_prefix: str, layers: tuple[tuple[tuple[str, ...], str, str], ...]
) -> list[tuple[tuple[str, ...], str, str]]:
    return [(tuple(diffusers_prefix + name for name in names), bfl_prefix + bfl, how) for names, bfl, how in layers]


def _norms(diffusers_prefix: str, bfl_prefix: str, norms: dict[str, str]) -> Pairs:
    return [((f"{diffusers_prefix}{name}.weight",), f"{bfl_prefix}{bfl}.scale", PLAIN) for name, bfl in norms.items()]
