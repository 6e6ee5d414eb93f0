"""`loraserve generate` against the running service: progress, images on disk, clear errors."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from serving.tiny import TinyModel

pytestmark = pytest.mark.integration


async def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "loraserve.cli", "generate", *args]
    return await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, timeout=300)


async def test_generate_writes_images_with_a_lora(target: str, tiny_sdxl: TinyModel, tmp_path: Path) -> None:
    out = tmp_path / "images"
    result = await run_cli(
        "a photo of a red house",
        "--model", str(tiny_sdxl.pipeline_dir),
        "--lora", f"{tiny_sdxl.lora_paths[0]}:0.8",
        "--seed", "5",
        "--size", "64x64",
        "--steps", "3",
        "--num-images", "2",
        "--out", str(out),
        "--target", target,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    files = sorted(out.iterdir())
    assert len(files) == 2 and all(Image.open(f).size == (64, 64) for f in files)
    assert "seed 5" in result.stdout
    assert "generating 2 image(s) 64x64" in result.stderr  # log lines from the worker, above the bar
    assert "3/3" in result.stderr  # the progress bar reached the last step


async def test_generate_reports_bad_fields(target: str, tiny_sdxl: TinyModel, tmp_path: Path) -> None:
    result = await run_cli(
        "x", "--model", str(tiny_sdxl.pipeline_dir), "--size", "65x64", "--steps", "0", "--target", target
    )
    assert result.returncode == 1
    assert "input.image_size.width" in result.stderr and "input.num_inference_steps" in result.stderr
