"""The generated stubs match the .proto files, and the schema is clean under `buf lint`."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

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


def _schema_input_fields(schema: str) -> set[str]:
    """The field names of the schema's Input table; a row may name several (`tile_width, tile_height`)."""
    table = schema.split("## Input", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")]
    assert rows[0] == "field", rows[0]
    return {name.strip() for row in rows[1:] if set(row) - {"-", " "} for name in row.split(",")}


def test_schema_has_every_fal_input_field() -> None:
    """GenerateInput carries every field of fal's schema (a copy in tests/fal_spec), under the same name."""
    from loraserve.v1 import types_pb2

    schema = (Path(__file__).parent / "fal_spec" / "SCHEMA.md").read_text()
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
    assert _schema_input_fields(schema) == expected
    assert expected <= names, expected - names


# The API as released before the FLUX family was added: later changes must keep every message of it
# readable by callers built against it (buf's FILE rules: no field renumbered, retyped, moved into a
# oneof or removed).
BREAKING_BASELINE = "8e80e124cdf0df4f1281db45e1981fd76090f692"


def test_buf_breaking_against_baseline() -> None:
    buf = require_tool("buf")
    git_dir = protogen.PROTO_DIR.parent / ".git"
    if not git_dir.exists():
        pytest.skip("not a git checkout: no baseline to compare against")
    against = f"{git_dir}#ref={BREAKING_BASELINE},subdir=proto"
    result = subprocess.run(
        [buf, "breaking", "--against", against], cwd=protogen.PROTO_DIR, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
