"""The generated stubs match the .proto files, and the schema is clean under `buf lint`."""

from __future__ import annotations

import subprocess
from pathlib import Path

from loraserve import protogen
from tests.conftest import require_tool


def test_generated_stubs_match_protos(tmp_path: Path) -> None:
    fresh = protogen.generate(tmp_path)
    assert fresh, "protoc wrote nothing"
    for path in fresh:
        imported = protogen.ROOT / path.relative_to(tmp_path)
        assert imported.exists(), f"{imported} is missing: run `python -m loraserve.protogen`"
        assert imported.read_bytes() == path.read_bytes(), f"{imported} is stale: run `python -m loraserve.protogen`"


def test_buf_lint_is_clean() -> None:
    buf = require_tool("buf")
    result = subprocess.run([buf, "lint"], cwd=protogen.PROTO_DIR, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_schema_has_every_fal_input_field() -> None:
    from loraserve.v1 import types_pb2

    schema = (protogen.ROOT.parent / "shared" / "spec" / "SCHEMA.md")
    names = set(types_pb2.GenerateInput.DESCRIPTOR.fields_by_name)
    expected = {
        "model_name", "unet_name", "variant", "prompt", "negative_prompt", "prompt_weighting", "loras",
        "embeddings", "controlnets", "controlnet_guess_mode", "ip_adapter", "image_encoder_path",
        "image_encoder_subfolder", "image_encoder_weight_name", "ic_light_model_url",
        "ic_light_model_background_image_url", "ic_light_image_url", "seed", "image_size",
        "num_inference_steps", "guidance_scale", "clip_skip", "scheduler", "timesteps", "sigmas",
        "prediction_type", "rescale_betas_snr_zero", "image_format", "num_images", "enable_safety_checker",
        "tile_width", "tile_height", "tile_stride_width", "tile_stride_height", "eta", "debug_latents",
        "debug_per_pass_latents",
    }
    assert expected <= names, expected - names
    if schema.exists():
        for name in expected:
            assert f"| {name}" in schema.read_text() or name.startswith("tile_"), name
