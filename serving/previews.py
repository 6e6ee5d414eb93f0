"""Live previews: small JPEGs of the latents while a request denoises, cheap enough to make for every request.

A preview is a linear latent-to-RGB projection at the latents' own resolution, about an eighth of
the image's side, encoded as a JPEG: one small convolution from the latent channels to RGB. That
is what A1111's "Approx cheap" and ComfyUI's "latent2rgb" previews are: no VAE decode, a few
microseconds of arithmetic on the device and one small copy to the host.

For the released SD 1.5 and SDXL VAEs the projection is ComfyUI's published 4×3 matrix
(comfy/latent_formats.py: each latent pixel on its own). Any other VAE (a tiny test model, an
unusual checkpoint) gets one fitted once to that VAE by least squares, a "tiny decoder" of one
3×3 convolution: a few random latents are decoded and the images pooled down to the latents'
size, so the preview matches what that VAE would draw (on the tiny random test VAEs a 3×3
neighbourhood explains about half of the pooled image's variance, a single pixel under a tenth).

The worker makes a preview at the request's last step and, between, at most one per
`preview_interval_seconds`, and only at steps whose progress it streams anyway: a preview
adds no event of its own. The gateway keeps the latest one per running request and passes
it only to status streams that asked (gateway/previews.py).
"""

from __future__ import annotations

import io
import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import PIL.Image
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

# ComfyUI's latent_rgb_factors (rows: latent channels; columns: R, G, B) and biases, for latents as
# the U-Net sees them (scaled by the VAE's scaling_factor); the result is in [-1, 1].
SD15_FACTORS = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)
SD15_BIAS = (0.0, 0.0, 0.0)
SDXL_FACTORS = (
    (0.3651, 0.4232, 0.4341),
    (-0.2533, -0.0042, 0.1068),
    (0.1076, 0.1111, -0.0362),
    (-0.3165, -0.2492, -0.2188),
)
SDXL_BIAS = (0.1084, -0.0175, -0.0011)

# What the released VAEs look like: the published factors are theirs (fine-tuned VAEs of the same
# shape, such as sdxl-vae-fp16-fix, decode close enough to them).
RELEASED_VAE_BLOCKS = (128, 256, 512, 512)
RELEASED_SCALING = {"sd15": 0.18215, "sdxl": 0.13025}

# Fitting a projection: random latents of this side, decoded once per VAE; the kernel's side.
FIT_LATENT_SIDE = 16
FIT_BATCH = 4
FIT_KERNEL = 3
JPEG_QUALITY = 80


@dataclass(frozen=True)
class Projection:
    """Latent channels → RGB in [-1, 1]: a convolution with an odd square kernel (1×1: per pixel)."""

    weight: torch.Tensor  # (3, channels, k, k), float32, on the CPU
    bias: torch.Tensor  # (3,)

    @property
    def channels(self) -> int:
        return int(self.weight.shape[1])

    def to_rgb(self, latents: torch.Tensor) -> torch.Tensor:
        """(channels, h, w) latents → (h, w, 3) uint8 on the CPU; computed where the latents are."""
        weight = self.weight.to(latents.device)
        bias = self.bias.to(latents.device)
        rgb = F.conv2d(latents[None].float(), weight, bias, padding=self.weight.shape[-1] // 2)[0]
        return ((rgb + 1.0) * 127.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).cpu()


def published_projection(family: str) -> Projection:
    factors, bias = (SDXL_FACTORS, SDXL_BIAS) if family == "sdxl" else (SD15_FACTORS, SD15_BIAS)
    return Projection(torch.tensor(factors).T[:, :, None, None].contiguous(), torch.tensor(bias))


def is_released_vae(vae: torch.nn.Module, family: str) -> bool:
    config = getattr(vae, "config", None)
    if config is None:
        return False
    return (
        tuple(getattr(config, "block_out_channels", ())) == RELEASED_VAE_BLOCKS
        and getattr(config, "latent_channels", 0) == 4
        and abs(float(getattr(config, "scaling_factor", 0.0)) - RELEASED_SCALING.get(family, -1.0)) < 1e-6
    )


@torch.no_grad()
def fit_projection(vae: torch.nn.Module, seed: int = 0, kernel: int = FIT_KERNEL) -> Projection:
    """The least-squares linear map from each latent pixel's neighbourhood to the mean colour of the image
    pixels it decodes to."""
    config: Any = vae.config
    parameter = next(vae.parameters())
    generator = torch.Generator("cpu").manual_seed(seed)
    channels = int(config.latent_channels)
    latents = torch.randn(FIT_BATCH, channels, FIT_LATENT_SIDE, FIT_LATENT_SIDE, generator=generator)
    decoded = vae.decode(  # type: ignore[operator]
        latents.to(parameter.device, parameter.dtype) / float(config.scaling_factor)
    ).sample
    factor = decoded.shape[-1] // FIT_LATENT_SIDE
    pooled = F.avg_pool2d(decoded.float(), factor).cpu()
    # Columns of unfold are (channel, row, column) of the neighbourhood, as conv2d's weight is laid out.
    patches = F.unfold(latents, kernel, padding=kernel // 2).permute(0, 2, 1).reshape(-1, channels * kernel * kernel)
    inputs = torch.cat([patches, torch.ones(patches.shape[0], 1)], dim=1)
    targets = pooled.permute(0, 2, 3, 1).reshape(-1, 3)
    solution = torch.linalg.lstsq(inputs, targets).solution
    weight = solution[:-1].T.reshape(3, channels, kernel, kernel).contiguous()
    return Projection(weight, solution[-1].contiguous())


_fitted: weakref.WeakKeyDictionary[torch.nn.Module, Projection] = weakref.WeakKeyDictionary()


def projection_for(vae: torch.nn.Module, family: str) -> Projection:
    """Published factors for the released VAEs; otherwise a fit to this VAE, made once and kept with it."""
    if is_released_vae(vae, family):
        return published_projection(family)
    projection = _fitted.get(vae)
    if projection is None:
        started = time.perf_counter()
        projection = fit_projection(vae)
        if not bool(torch.isfinite(projection.weight).all() and torch.isfinite(projection.bias).all()):
            log.warning("fitting a latent preview projection gave non-finite values; using the published one")
            projection = published_projection(family)
        _fitted[vae] = projection
        log.info("fitted a latent preview projection", extra={"seconds": round(time.perf_counter() - started, 3)})
    return projection


def encode_jpeg(rgb: torch.Tensor, max_side: int) -> bytes:
    """(h, w, 3) uint8 → JPEG bytes, shrunk so that neither side exceeds `max_side`."""
    image = PIL.Image.fromarray(rgb.numpy(), mode="RGB")
    if max(image.size) > max_side:
        image.thumbnail((max_side, max_side), PIL.Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


class Previews:
    """One request's previews: `offer` sees every step's latents; `take` turns the latest into a JPEG when due.

    `offer` only keeps a reference (it runs at every step); `take` runs at the steps whose
    progress is streamed, right after `offer` within the same denoising callback, so the
    latents are still those of that step. The projection is looked up at the first preview.
    """

    def __init__(
        self,
        vae: torch.nn.Module,
        family: str,
        *,
        interval_seconds: float,
        max_side: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._vae = vae
        self._family = family
        self._interval = interval_seconds
        self._max_side = max_side
        self._clock = clock
        self._latents: torch.Tensor | None = None
        self._last = -float("inf")
        self._projection: Projection | None = None

    @property
    def enabled(self) -> bool:
        return self._interval > 0

    def offer(self, _step: int, _total: int, latents: torch.Tensor) -> None:
        if self.enabled:
            self._latents = latents

    def take(self, step: int, total: int) -> bytes:
        """A JPEG of the latents last offered, at the last step or once `interval_seconds` passed; else b""."""
        latents, self._latents = self._latents, None
        if latents is None:
            return b""
        now = self._clock()
        if step < total and now - self._last < self._interval:
            return b""
        self._last = now
        if self._projection is None:
            self._projection = projection_for(self._vae, self._family)
        # The first image of the batch; its channels must be the projection's.
        first = latents[0].detach()
        if first.shape[0] != self._projection.channels:
            return b""
        return encode_jpeg(self._projection.to_rgb(first), self._max_side)
