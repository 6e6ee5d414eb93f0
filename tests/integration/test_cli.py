"""`loraserve generate` against the running service: progress, images on disk, clear errors."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serving.tiny import TinyModel

pytestmark = pytest.mark.integration


async def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "loraserve.cli", "generate", *args]
    return await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, timeout=300)


async def test_generate_writes_images_with_a_lora(target: str, tiny_sdxl: TinyModel, tmp_path: Path) -> None:
    common = ("--model", str(tiny_sdxl.pipeline_dir), "--seed", "5", "--size", "64x64", "--steps", "3",
              "--num-images", "2", "--target", target)  # fmt: skip
    out = tmp_path / "images"
    result = await run_cli(
        "a photo of a red house", *common, "--lora", f"{tiny_sdxl.lora_paths[0]}:0.8", "--out", str(out)
    )
    assert result.returncode == 0, result.stderr
    files = sorted(out.iterdir())
    assert len(files) == 2 and all(Image.open(f).size == (64, 64) for f in files)
    assert "seed 5" in result.stdout
    assert "generating 2 image(s) 64x64" in result.stderr  # log lines from the worker, above the bar
    assert "3/3" in result.stderr  # the progress bar reached the last step
    # The same request without the LoRA: the LoRA is what changed the pixels.
    plain_out = tmp_path / "plain"
    plain = await run_cli("a photo of a red house", *common, "--out", str(plain_out))
    assert plain.returncode == 0, plain.stderr
    plain_files = sorted(plain_out.iterdir())
    assert len(plain_files) == 2
    for with_lora, without in zip(files, plain_files, strict=True):
        difference = np.abs(np.asarray(Image.open(with_lora), np.float64) - np.asarray(Image.open(without), np.float64))
        assert difference.mean() > 1.0, (with_lora.name, difference.mean())


async def test_generate_reports_bad_fields(target: str, tiny_sdxl: TinyModel, tmp_path: Path) -> None:
    result = await run_cli(
        "x", "--model", str(tiny_sdxl.pipeline_dir), "--size", "65x64", "--steps", "0", "--target", target
    )
    assert result.returncode == 1
    assert "input.image_size.width" in result.stderr and "input.num_inference_steps" in result.stderr
