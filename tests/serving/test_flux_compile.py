"""FLUX's `acceleration`: "regular" runs the compiled transformer blocks and VAE decoder, "none" the same modules eagerly.

One tiny FLUX pipeline compiled as the worker compiles it (`compile=default`, `compile_regional`
left to the family: the transformer's double and single blocks, warmed at one size) beside an eager one; requests go
through serving/flux_generation.py as the worker sends them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from loraserve.v1 import flux_pb2
from serving import compiled, flux_generation
from serving.pipelines import LoadedPipeline, load_pipeline
from serving.tiny import TinyModel
from serving.tiny_flux import make_tiny_flux_lora

SIZE = 32
# test_compile.py's bound for compiled vs eager images, in 0-255 levels.
MEAN_TOLERANCE = 0.5
MAX_TOLERANCE = 4


@pytest.fixture(scope="module")
def pipelines(tiny_flux: TinyModel) -> Iterator[tuple[LoadedPipeline, LoadedPipeline]]:
    """(eager, compiled) pipelines of the tiny FLUX model."""
    eager = load_pipeline(str(tiny_flux.pipeline_dir))
    fast = load_pipeline(str(tiny_flux.pipeline_dir), compile_mode="default", compile_sizes=[(SIZE, SIZE)])
    yield eager, fast
    fast.release()


def params(acceleration: str, loras: list[tuple[str, float]]) -> flux_generation.FluxParams:
    inp = flux_pb2.FluxInput(
        prompt="a cat", num_inference_steps=2, enable_safety_checker=False, acceleration=acceleration
    )
    inp.image_size.custom.width = inp.image_size.custom.height = SIZE
    request = flux_generation.flux_params(inp, seed=1)
    request.loras = loras
    return request


def pixels(loaded: LoadedPipeline, request: flux_generation.FluxParams) -> np.ndarray:
    return np.asarray(flux_generation.generate_flux(loaded, request).images[0]).astype(np.int16)


@pytest.mark.timeout(600)
def test_regular_runs_compiled_with_eager_pixels_and_a_lora_switch_never_recompiles(
    pipelines: tuple[LoadedPipeline, LoadedPipeline], tiny_flux: TinyModel, tmp_path: Path
) -> None:
    eager, fast = pipelines
    assert fast.compiled is not None
    assert fast.compiled.regional, "compile_regional auto compiled FLUX's transformer whole"
    transformer, decoder = fast.compiled.gates
    one = str(tiny_flux.lora_paths[0])
    other = str(make_tiny_flux_lora(tmp_path / "other.safetensors", seed=9))
    recompiles = compiled.EVENTS.recompiles
    for what, loras in [("plain", []), ("one LoRA", [(one, 1.0)]), ("a switch", [(other, 0.8)]), ("plain again", [])]:
        calls = transformer.compiled_calls, decoder.compiled_calls
        ours, theirs = pixels(fast, params("regular", loras)), pixels(eager, params("none", loras))
        difference = np.abs(ours - theirs)
        assert difference.mean() <= MEAN_TOLERANCE and difference.max() <= MAX_TOLERANCE, (
            f"{what}: compiled differs from eager by mean {difference.mean():.3f}, max {difference.max()}"
        )
        assert (transformer.compiled_calls, decoder.compiled_calls) == (calls[0] + 2, calls[1] + 1), what
    assert compiled.EVENTS.recompiles == recompiles, "a LoRA switch or repeat compiled again"
    assert transformer.eager_calls == 0


def test_none_runs_the_compiled_pipeline_eagerly_and_regular_without_compile_runs_eagerly(
    pipelines: tuple[LoadedPipeline, LoadedPipeline], tiny_flux: TinyModel, caplog: pytest.LogCaptureFixture
) -> None:
    eager, fast = pipelines
    assert fast.compiled is not None
    lora = [(str(tiny_flux.lora_paths[0]), 1.0)]
    calls = [gate.compiled_calls for gate in fast.compiled.gates]
    ours = pixels(fast, params("none", lora))
    assert [gate.compiled_calls for gate in fast.compiled.gates] == calls, "acceleration none ran compiled code"
    assert np.abs(ours - pixels(eager, params("none", lora))).max() <= MAX_TOLERANCE
    with caplog.at_level("INFO", logger=flux_generation.__name__):
        assert np.array_equal(pixels(eager, params("regular", lora)), pixels(eager, params("none", lora)))
    assert "runs eagerly: the compile setting is off" in caplog.text
