"""`enable_safety_checker`: diffusers' StableDiffusionSafetyChecker, configured by the operator.

The checker is one model per worker, shared by every base pipeline, so it is loaded once
(`load_safety_checker`) and handed to each generation. It is read from a folder (or a
Hugging Face repo id) holding a `StableDiffusionSafetyChecker` saved with `save_pretrained`
(config.json + model.safetensors) and the `CLIPImageProcessor` that feeds it
(preprocessor_config.json), e.g. `CompVis/stable-diffusion-safety-checker`; a Stable Diffusion
pipeline folder with `safety_checker/` and `feature_extractor/` subfolders works too. Only
safetensors weights are read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from transformers import CLIPImageProcessor

from serving.errors import ModelLoadError, OptionUnavailableError


class SafetyCheckerLoadError(ModelLoadError):
    """The configured safety checker could not be loaded; the message names the path."""


@dataclass
class SafetyChecker:
    model: StableDiffusionSafetyChecker
    feature_extractor: CLIPImageProcessor
    source: str

    @torch.no_grad()
    def check(self, images: list[PIL.Image.Image]) -> list[bool]:
        """One NSFW flag per image."""
        if not images:
            return []
        device = self.model.device
        clip_input = self.feature_extractor(images, return_tensors="pt").pixel_values.to(device, self.model.dtype)
        # the model blacks out flagged arrays in place; we only keep its flags and censor ourselves
        arrays = [np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0 for image in images]
        _, flags = self.model(images=arrays, clip_input=clip_input)
        return [bool(flag) for flag in flags]

    def censor(self, images: list[PIL.Image.Image]) -> tuple[list[PIL.Image.Image], list[bool]]:
        """Flags, and the images with every flagged one replaced by a black image of the same size."""
        flags = self.check(images)
        censored = [
            PIL.Image.new(image.mode, image.size) if flagged else image for image, flagged in zip(images, flags)
        ]
        return censored, flags


def require(checker: SafetyChecker | None) -> SafetyChecker:
    """The checker a request with `enable_safety_checker` needs, refused before any denoising when the operator
    configured none: an unchecked image must never go out as if it had been checked."""
    if checker is None:
        raise OptionUnavailableError(
            "enable_safety_checker",
            "enable_safety_checker: this server has no safety checker model configured, so images cannot be "
            "checked; set enable_safety_checker to false or ask the operator to configure one",
        )
    return checker


def load_safety_checker(
    source: str | Path, *, device: str = "cpu", torch_dtype: torch.dtype = torch.float32
) -> SafetyChecker:
    """Load the checker and its image processor; raises SafetyCheckerLoadError naming `source`."""
    source = str(source)
    model_dir, processor_dir = source, source
    local = Path(source).expanduser()
    if local.is_dir() and (local / "safety_checker").is_dir():
        model_dir, processor_dir = str(local / "safety_checker"), str(local / "feature_extractor")
    try:
        model = StableDiffusionSafetyChecker.from_pretrained(model_dir, use_safetensors=True, dtype=torch_dtype)
        feature_extractor = CLIPImageProcessor.from_pretrained(processor_dir)
        model.to(device)
        model.eval()
    except Exception as exc:
        raise SafetyCheckerLoadError(
            f"could not load the safety checker {source!r}: {type(exc).__name__}: {exc}"
        ) from exc
    return SafetyChecker(model=model, feature_extractor=feature_extractor, source=source)
