"""The serving core's public interface: load a base model, generate on it, the types and errors involved.

This is the torch/diffusers core that the Ray Serve replicas wrap. It knows nothing about Ray
or gRPC so it can be tested and reasoned about on its own. The parts live in their own modules:
request and result types (serving/request.py), errors (serving/errors.py), loading a model
(serving/loading.py), the hot pipeline with its resident LoRAs (serving/loaded.py,
serving/lora_tier.py) and generating (serving/generation.py); callers import them from here.
"""

from __future__ import annotations

from serving.errors import (
    AdapterLoadError,
    GenerationCancelled,
    ModelLoadError,
    OptionUnavailableError,
    PipelineReleased,
)
from serving.generation import generate, generate_result
from serving.loaded import LoadedPipeline, lora_file
from serving.loading import load_pipeline
from serving.request import GenerationParams, GenerationResult

__all__ = [
    "AdapterLoadError",
    "GenerationCancelled",
    "GenerationParams",
    "GenerationResult",
    "LoadedPipeline",
    "ModelLoadError",
    "OptionUnavailableError",
    "PipelineReleased",
    "generate",
    "generate_result",
    "load_pipeline",
    "lora_file",
]
