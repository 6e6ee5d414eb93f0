"""The in-process references: plain diffusers, the naive per-request LoRA server, reload per switch.

Each call is timed inside itself with `time.perf_counter` and returns seconds. The calls
match what a worker replica runs for the same request (same prompt, size, steps, guidance,
seed, float32 on CPU, PIL output) without anything of the service around it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline

from bench.plan import GUIDANCE_SCALE, PROMPT, SEED


def quiet() -> None:
    """No per-load progress bars or "no LoRA keys for the text encoder" notices on the progress stream."""
    import diffusers.utils.logging
    import transformers.utils.logging

    for library in (diffusers.utils.logging, transformers.utils.logging):
        library.set_verbosity_error()
        library.disable_progress_bar()


def use_threads(threads: int) -> None:
    """A replica with `replica_num_cpus=n` runs torch on n threads (Ray sets OMP_NUM_THREADS); match it."""
    torch.set_num_threads(threads)


def load(path: Path) -> Any:
    pipe = DiffusionPipeline.from_pretrained(str(path), use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def plain_call(pipe: Any, size: int, steps: int, output_type: str = "pil") -> Any:
    """What a user of diffusers writes for the benchmark's request: the pipeline call and nothing else."""
    output = pipe(
        prompt=PROMPT,
        negative_prompt=None,
        width=size,
        height=size,
        num_inference_steps=steps,
        guidance_scale=GUIDANCE_SCALE,
        num_images_per_prompt=1,
        generator=torch.Generator("cpu").manual_seed(SEED),
        output_type=output_type,
    )
    if len(output.images) != 1:
        raise RuntimeError(f"expected one image, got {len(output.images)}")
    return output.images


def generate(pipe: Any, size: int, steps: int) -> float:
    """Plain diffusers: the pipeline call and nothing else."""
    started = time.perf_counter()
    plain_call(pipe, size, steps)
    return time.perf_counter() - started


def pixels(pipe: Any, size: int, steps: int, lora: Path | None = None) -> Any:
    """The request's image as an int16 array (untimed), for checking that two arms did the same work;
    with `lora`, applied as the naive server does (load, fuse; unfused and unloaded after)."""
    import numpy as np

    if lora is None:
        return np.asarray(plain_call(pipe, size, steps)[0].convert("RGB"), dtype=np.int16)
    pipe.load_lora_weights(str(lora))
    pipe.fuse_lora()
    try:
        return np.asarray(plain_call(pipe, size, steps)[0].convert("RGB"), dtype=np.int16)
    finally:
        pipe.unfuse_lora()
        pipe.unload_lora_weights()


def naive_lora(pipe: Any, lora: Path, size: int, steps: int) -> float:
    """What a naive server does per request: load → fuse → generate → unfuse → unload."""
    started = time.perf_counter()
    pipe.load_lora_weights(str(lora))
    pipe.fuse_lora()
    plain_call(pipe, size, steps)
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    return time.perf_counter() - started


def reload_and_generate(path: Path, size: int, steps: int) -> float:
    """Switching base models without a cache: `from_pretrained` for every switch, then generate."""
    started = time.perf_counter()
    pipe = load(path)
    plain_call(pipe, size, steps)
    elapsed = time.perf_counter() - started
    del pipe
    return elapsed
