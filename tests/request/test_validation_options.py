"""loraserve.request.validation for the sampling, prompting, tiling, output and debugging options.

These options are implemented now, so validation accepts them; what it refuses, by field, is
what the named scheduler would reject or silently ignore, and schedules that cannot be valid.
"""

from __future__ import annotations

import math
import subprocess
import sys
from typing import Any

import pytest

from loraserve.request import schema
from loraserve.request.schedulers import SCHEDULER_SPECS
from loraserve.v1 import types_pb2
from tests.request.validation_testkit import violations


@pytest.mark.parametrize(
    "overrides",
    [
        {"prompt_weighting": True, "prompt": "a (red:1.3) house++, " * 40},
        {"clip_skip": 2},
        *({"scheduler": name} for name in schema.SCHEDULERS),
        {"scheduler": "Euler", "timesteps": {"method": "array", "array": [999, 500, 1]}},
        {"scheduler": "LCM", "timesteps": {"method": "array", "array": [999, 759, 499, 259]}},
        {"scheduler": "Euler (trailing timesteps)", "sigmas": {"method": "array", "array": [14.6, 1.0, 0.0]}},
        {"timesteps": {"method": "array", "array": [999, 500]}},  # model's own scheduler: the worker checks
        {"scheduler": "DDIM", "eta": 1.0},
        {"scheduler": "TCD", "eta": 0.3},
        {"eta": 0.5},
        {"prediction_type": "v_prediction", "rescale_betas_snr_zero": True, "scheduler": "DDIM"},
        {"prediction_type": "epsilon", "rescale_betas_snr_zero": True, "scheduler": "Euler"},
        {"rescale_betas_snr_zero": True},
        {"enable_safety_checker": True},
        {"tile_width": 1024, "tile_height": 512, "tile_stride_width": 512, "tile_stride_height": 256},
        {"tile_width": 128},  # unset stride: half the tile
        {"debug_latents": True, "debug_per_pass_latents": True},
    ],
    ids=lambda overrides: ",".join(f"{k}={v}" for k, v in overrides.items())[:60],
)
def test_valid_option_values_pass(overrides: dict[str, Any]) -> None:
    assert violations(**overrides) == {}


@pytest.mark.parametrize("name", [n for n, spec in SCHEDULER_SPECS.items() if not spec.accepts_timesteps])
def test_timesteps_refused_for_schedulers_that_cannot_take_them(name: str) -> None:
    found = violations(scheduler=name, timesteps={"method": "array", "array": [999, 500]})
    assert list(found) == ["input.timesteps"]
    assert name in found["input.timesteps"][0] and "custom timestep" in found["input.timesteps"][0]


@pytest.mark.parametrize("name", [n for n, spec in SCHEDULER_SPECS.items() if not spec.accepts_sigmas])
def test_sigmas_refused_for_schedulers_that_cannot_take_them(name: str) -> None:
    found = violations(scheduler=name, sigmas={"method": "array", "array": [14.6, 0.0]})
    assert list(found) == ["input.sigmas"]
    assert "Euler" in found["input.sigmas"][0]


def test_karras_and_non_ancestral_capabilities() -> None:
    assert not SCHEDULER_SPECS["DPM++ 2M Karras"].accepts_timesteps  # diffusers refuses timesteps with Karras
    assert SCHEDULER_SPECS["DPM++ 2M"].accepts_timesteps
    assert [n for n, s in SCHEDULER_SPECS.items() if s.accepts_eta] == ["DDIM", "TCD"]
    assert [n for n, s in SCHEDULER_SPECS.items() if s.accepts_sigmas] == ["Euler", "Euler (trailing timesteps)"]


@pytest.mark.parametrize("name", [n for n, spec in SCHEDULER_SPECS.items() if not spec.accepts_eta])
def test_eta_refused_where_it_would_be_ignored(name: str) -> None:
    found = violations(scheduler=name, eta=0.5)
    assert list(found) == ["input.eta"]
    assert "DDIM, TCD" in found["input.eta"][0]
    assert violations(scheduler=name, eta=0) == {}


@pytest.mark.parametrize("name", ["DDIM", "LCM", "LCM (trailing timesteps)", "TCD"])
def test_zero_snr_with_explicit_epsilon_refused_where_it_divides_by_zero(name: str) -> None:
    found = violations(scheduler=name, prediction_type="epsilon", rescale_betas_snr_zero=True)
    assert list(found) == ["input.rescale_betas_snr_zero"]
    assert "v_prediction" in found["input.rescale_betas_snr_zero"][0]


@pytest.mark.parametrize(
    ("overrides", "field", "why"),
    [
        ({"timesteps": {"method": "array", "array": [999, 1000]}}, "input.timesteps.array", "between 0 and 999"),
        ({"timesteps": {"method": "array", "array": [-1]}}, "input.timesteps.array", "between 0 and 999"),
        ({"timesteps": {"method": "array", "array": [500, 700]}}, "input.timesteps.array", "strictly decreasing"),
        ({"timesteps": {"method": "array", "array": [500, 500]}}, "input.timesteps.array", "strictly decreasing"),
        ({"timesteps": {"method": "array", "array": list(range(151, 0, -1))}}, "input.timesteps.array", "at most 150"),
        ({"sigmas": {"method": "array", "array": [14.6]}}, "input.sigmas.array", "final sigma"),
        ({"sigmas": {"method": "array", "array": [1.0, -0.5]}}, "input.sigmas.array", ">= 0"),
        ({"sigmas": {"method": "array", "array": [1.0, math.nan]}}, "input.sigmas.array", "finite"),
        ({"sigmas": {"method": "array", "array": [1.0, 2.0, 0.0]}}, "input.sigmas.array", "must not increase"),
        ({"tile_width": 512, "tile_stride_width": 1024}, "input.tile_stride_width", "must not exceed tile_width (512)"),
        ({"tile_height": 256, "tile_stride_height": 512}, "input.tile_stride_height", "tile_height (256)"),
    ],
    ids=[
        "timestep-1000",
        "timestep-negative",
        "timesteps-increasing",
        "timesteps-repeated",
        "timesteps-151",
        "sigmas-one-value",
        "sigma-negative",
        "sigma-nan",
        "sigmas-increasing",
        "stride-wider-than-tile",
        "stride-taller-than-tile",
    ],
)
def test_bad_schedule_and_tile_values_name_the_field(overrides: dict[str, Any], field: str, why: str) -> None:
    found = violations(**overrides)
    assert field in found, found
    assert any(why in description for description in found[field]), found[field]


def test_tile_accessors_resolve_fal_defaults() -> None:
    plain = types_pb2.GenerateInput()
    assert (schema.tile_width(plain), schema.tile_height(plain)) == (4096, 4096)
    assert (schema.tile_stride_width(plain), schema.tile_stride_height(plain)) == (2048, 2048)
    small = types_pb2.GenerateInput(tile_width=512, tile_height=1024, tile_stride_height=128)
    assert (schema.tile_stride_width(small), schema.tile_stride_height(small)) == (256, 128)
    assert schema.custom_timesteps(plain) is None and schema.custom_sigmas(plain) is None


def test_the_request_model_loads_no_server_part_and_no_torch() -> None:
    """The scheduler capability table is plain data, so validating (in the gateway, the worker or the client)
    loads neither torch/diffusers nor anything of the server; tests/test_layers.py checks the imports as written."""
    code = (
        "import sys, loraserve.request.validation, loraserve.request.fal_json\n"
        "heavy = {'torch', 'diffusers', 'ray', 'grpc', 'aiohttp', 'core', 'gateway', 'serving', 'storage'}\n"
        "print(','.join(sorted(heavy & {name.split('.')[0] for name in sys.modules})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
