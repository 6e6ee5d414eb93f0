"""`debug_latents` / `debug_per_pass_latents` files: the raw latents as safetensors.

The hosted fal endpoint returns a .tar of PNG renderings of the latents; loraserve returns the
tensors themselves (kept as safetensors), which keeps every value and loads with
`safetensors.torch.load(data)["latents"]`:

- debug_latents: `latents` of shape (num_images, 4, height/8, width/8), the final denoised
  latents before the VAE (divide by `scaling_factor` from the metadata to decode them).
- debug_per_pass_latents: `latents` of shape (steps, num_images, 4, height/8, width/8), the
  latents after every denoising step, in order; the last entry equals debug_latents.

Tensors keep the dtype the model ran in. String metadata records seed, size, scheduler and
the VAE scaling factor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import safetensors.torch
import torch

CONTENT_TYPE = "application/octet-stream"
FINAL_FILE_NAME = "debug_latents.safetensors"
PER_PASS_FILE_NAME = "debug_per_pass_latents.safetensors"


@dataclass(frozen=True)
class OutputFile:
    """A file produced by a request besides its images, ready for LocalObjectStore.put."""

    data: bytes
    content_type: str
    file_name: str


def metadata_for(pipe: Any, params: Any) -> dict[str, str]:
    return {
        "seed": str(params.seed),
        "width": str(params.width),
        "height": str(params.height),
        "scheduler": type(pipe.scheduler).__name__,
        "scaling_factor": str(getattr(pipe.vae.config, "scaling_factor", "")),
    }


def final_latents_file(latents: torch.Tensor, metadata: dict[str, str]) -> OutputFile:
    return _file(latents, metadata, FINAL_FILE_NAME)


def per_pass_latents_file(steps: list[torch.Tensor], metadata: dict[str, str]) -> OutputFile:
    return _file(torch.stack(steps), {**metadata, "steps": str(len(steps))}, PER_PASS_FILE_NAME)


def _file(latents: torch.Tensor, metadata: dict[str, str], file_name: str) -> OutputFile:
    data = safetensors.torch.save({"latents": latents.contiguous()}, metadata=metadata)
    return OutputFile(data=data, content_type=CONTENT_TYPE, file_name=file_name)
