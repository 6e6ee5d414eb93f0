"""Denoising images larger than one tile: MultiDiffusion-style overlapping latent tiles.

At every step the U-Net runs on each tile window of the latent, and the predictions are
averaged where windows overlap, weighted by linear ramps across the overlap so no seam shows.
Rather than a second, hand-written denoising loop, the U-Net itself is wrapped: the pipeline's
own loop (schedulers, classifier-free guidance, guidance rescale, custom timesteps, eta,
step callbacks, cancellation) runs unchanged and sees one full-size prediction per step. The
wrappers live only in the per-request pipeline view; the resident U-Net and VAE are untouched.
The VAE decodes tiled too (diffusers' `tiled_decode`), so the decoder never holds the full image.
SDXL's size conditioning (original/target size, crop) stays that of the whole image for every
tile, as the pipeline computes it once per request.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Window starts covering [0, length): every `stride`, plus one flush with the end."""
    if length <= tile:
        return [0]
    stride = max(1, min(stride, tile))
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] + tile < length:
        starts.append(length - tile)
    return starts


def _ramp(size: int, overlap: int, ramp_start: bool, ramp_end: bool) -> torch.Tensor:
    """1 in the middle, rising linearly over `overlap` cells at edges shared with another tile."""
    weights = torch.ones(size)
    if overlap <= 0:
        return weights
    ramp = torch.arange(1, overlap + 1, dtype=torch.float32) / (overlap + 1)
    n = min(overlap, size)
    if ramp_start:
        weights[:n] = torch.minimum(weights[:n], ramp[:n])
    if ramp_end:
        weights[size - n :] = torch.minimum(weights[size - n :], ramp[:n].flip(0))
    return weights


class TiledUNet:
    """Callable like the U-Net it wraps; attribute reads (config, dtype, …) go to the real one."""

    def __init__(self, unet: Any, *, tile: tuple[int, int], stride: tuple[int, int]) -> None:
        """`tile` and `stride` are (height, width) in latent cells."""
        self._unet = unet
        self._tile = tile
        self._stride = stride

    def __getattr__(self, name: str) -> Any:
        return getattr(self._unet, name)

    def __call__(self, sample: torch.Tensor, timestep: Any, *args: Any, **kwargs: Any) -> Any:
        return_dict = kwargs.pop("return_dict", True)
        height, width = sample.shape[-2:]
        tile_h, tile_w = min(self._tile[0], height), min(self._tile[1], width)
        rows = tile_starts(height, tile_h, self._stride[0])
        cols = tile_starts(width, tile_w, self._stride[1])
        total: torch.Tensor | None = None
        weight_sum = torch.zeros(height, width, device=sample.device, dtype=torch.float32)
        for top in rows:
            row_weights = _ramp(tile_h, tile_h - self._stride[0], top > 0, top + tile_h < height)
            for left in cols:
                col_weights = _ramp(tile_w, tile_w - self._stride[1], left > 0, left + tile_w < width)
                window = sample[..., top : top + tile_h, left : left + tile_w]
                prediction = self._unet(window, timestep, *args, return_dict=False, **kwargs)[0]
                weights = (row_weights[:, None] * col_weights[None, :]).to(sample.device)
                if total is None:
                    total = torch.zeros(
                        (*prediction.shape[:-2], height, width), device=sample.device, dtype=torch.float32
                    )
                total[..., top : top + tile_h, left : left + tile_w] += prediction.float() * weights
                weight_sum[top : top + tile_h, left : left + tile_w] += weights
        assert total is not None
        result = (total / weight_sum).to(sample.dtype)
        return UNet2DConditionOutput(sample=result) if return_dict else (result,)


class TiledDecodeVAE:
    """The pipeline's VAE with `decode` routed to diffusers' tiled decoder (no state changed)."""

    def __init__(self, vae: Any) -> None:
        self._vae = vae

    def __getattr__(self, name: str) -> Any:
        return getattr(self._vae, name)

    def decode(self, z: torch.Tensor, return_dict: bool = True, **kwargs: Any) -> Any:
        vae = self._vae
        min_size = getattr(vae, "tile_latent_min_size", None)
        if not hasattr(vae, "tiled_decode") or min_size is None or max(z.shape[-2:]) <= min_size:
            return vae.decode(z, return_dict=return_dict, **kwargs)
        return vae.tiled_decode(z, return_dict=return_dict)


def needs_tiling(width: int, height: int, tile_width: int, tile_height: int) -> bool:
    return width > tile_width or height > tile_height


def tiled_components(
    unet: Any,
    vae: Any,
    *,
    vae_scale_factor: int,
    tile_width: int,
    tile_height: int,
    stride_width: int,
    stride_height: int,
) -> dict[str, Any]:
    """Replacement unet / vae for a per-request pipeline view; sizes are in pixels.

    A stride wider than its tile is clamped to the tile (no gaps; the gateway refuses it anyway).
    """
    scale = vae_scale_factor  # pixels per latent cell: 8 for SD 1.x / SDXL VAEs
    tile = (max(1, tile_height // scale), max(1, tile_width // scale))
    stride = (max(1, min(stride_height, tile_height) // scale), max(1, min(stride_width, tile_width) // scale))
    return {"unet": TiledUNet(unet, tile=tile, stride=stride), "vae": TiledDecodeVAE(vae)}
