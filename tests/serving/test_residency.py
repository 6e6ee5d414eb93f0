"""The FLUX memory plan of a replica's bases (serving/residency.py), on the CPU with the tiny models: the
device-memory figure is the test's, so which pipelines stay loaded follows from the pipelines' own bytes."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from bench.worker_in_process import in_process
from core.config import Settings
from core.model_key import BaseModelRef
from loraserve.inputs import to_input
from loraserve.v1 import worker_pb2
from serving import flux_memory, lora_tier
from serving.app import Worker
from serving.pipelines import LoadedPipeline, load_pipeline
from serving.residency import Residency, claim, weight_bytes
from serving.tiny import TinyModel

BUDGET = 2**20

Load = Callable[[str, TinyModel], LoadedPipeline]


def plan(loaded: LoadedPipeline) -> int:
    return claim(loaded.family, weight_bytes(loaded.pipe), loaded.max_lora_bytes)


@pytest.fixture
def evicted() -> list[str]:
    return []


def loader(residency: Residency, evicted: list[str]) -> Load:
    """As the worker loads a base: room made before the weights move, then admitted with its LoRA budget."""

    def load(key: str, model: TinyModel) -> LoadedPipeline:
        loaded = load_pipeline(
            str(model.pipeline_dir),
            max_lora_bytes=BUDGET,
            make_room=lambda family, weights: evicted.extend(residency.make_room(family, weights)),
        )
        evicted.extend(residency.admit(key, loaded))
        return loaded

    return load


def test_a_base_stays_beside_flux_only_while_the_device_holds_both_plans(
    tiny_flux: TinyModel, tiny_sd15: TinyModel, tiny_sdxl: TinyModel
) -> None:
    flux, sd15, sdxl = (
        load_pipeline(str(model.pipeline_dir), max_lora_bytes=BUDGET) for model in (tiny_flux, tiny_sd15, tiny_sdxl)
    )
    assert plan(flux) == weight_bytes(flux.pipe) + BUDGET + flux_memory.ACTIVATION_RESERVE
    # Room for FLUX's plan and any one SD base, not for both.
    residency = Residency(plan(flux) + plan(sd15) + plan(sdxl) - 1)
    assert residency.admit("flux", flux) == []
    assert residency.admit("sd15", sd15) == []
    assert residency.keys == ["flux", "sd15"]
    residency.touch("flux")
    # The least recently used base goes; FLUX, used since, stays.
    assert residency.admit("sdxl", sdxl) == ["sd15"]
    assert residency.keys == ["flux", "sdxl"]
    assert sd15.released and not flux.released and not sdxl.released


def test_a_base_the_device_cannot_hold_beside_flux_evicts_it_before_its_weights_move(
    tiny_flux: TinyModel, tiny_sd15: TinyModel
) -> None:
    flux = load_pipeline(str(tiny_flux.pipeline_dir), max_lora_bytes=BUDGET)
    residency = Residency(plan(flux) + 1)
    evicted: list[str] = []
    load = loader(residency, evicted)
    flux = load("flux", tiny_flux)
    moved: list[list[str]] = []
    sd15 = load_pipeline(
        str(tiny_sd15.pipeline_dir),
        max_lora_bytes=BUDGET,
        make_room=lambda family, weights: moved.append(residency.make_room(family, weights)),
    )
    assert moved == [["flux"]] and flux.released
    assert residency.admit("sd15", sd15) == []
    # And back: FLUX's plan does not fit beside the SD base either.
    flux = load("flux", tiny_flux)
    assert (residency.keys, evicted, sd15.released) == (["flux"], ["sd15"], True)


def test_sd_bases_alone_are_left_to_the_pipeline_count(tiny_sd15: TinyModel, tiny_sdxl: TinyModel) -> None:
    residency = Residency(1)
    evicted: list[str] = []
    load = loader(residency, evicted)
    load("sd15", tiny_sd15)
    load("sdxl", tiny_sdxl)
    assert (residency.keys, evicted) == (["sd15", "sdxl"], [])


def test_without_a_device_figure_there_is_no_plan(tiny_flux: TinyModel, tiny_sd15: TinyModel) -> None:
    residency = Residency(0)
    evicted: list[str] = []
    load = loader(residency, evicted)
    load("flux", tiny_flux)
    load("sd15", tiny_sd15)
    assert (residency.keys, evicted) == (["flux", "sd15"], [])


async def test_the_worker_evicts_a_base_for_flux_and_loads_it_again_when_asked(
    tmp_path_factory: pytest.TempPathFactory, tiny_flux: TinyModel, tiny_sd15: TinyModel
) -> None:
    """Serve's multiplexer (here the in-process stand-in) still holds the evicted base: it is loaded again into it."""
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("residency"),
        device="cpu",
        flux_model=str(tiny_flux.pipeline_dir),
        allowed_local_roots=str(tmp_path_factory.getbasetemp()),
        # Less than FLUX's activation reserve alone: no base stays beside it.
        device_memory_bytes=flux_memory.GIB,
    )
    worker = in_process(Worker(settings))
    sd15_key = BaseModelRef.normalised(str(tiny_sd15.pipeline_dir), "", "").key
    small = {"prompt": "a cat", "image_size": {"width": 64, "height": 48}, "num_inference_steps": 2}
    sd15 = worker_pb2.GenerateRequest(
        request_id="sd15", input=to_input({**small, "model_name": str(tiny_sd15.pipeline_dir)}), seed=1
    )
    flux = worker_pb2.GenerateRequest(
        request_id="flux", flux_input=to_input({**small, "enable_safety_checker": False}, "fal-ai/flux-lora"), seed=1
    )
    hot: list[LoadedPipeline] = []
    for request, key in ((sd15, sd15_key), (flux, worker._flux_ref.key), (sd15, sd15_key)):
        events = [event async for event in worker.Generate(request)]
        assert events[-1].WhichOneof("event") == "result", events[-1]
        assert worker._residency.keys == [key]
        hot.append(worker._hot[key])
    assert worker._pipeline_loads == 3
    assert [loaded.released for loaded in hot] == [True, True, False]


def test_the_default_flux_budget_is_not_split_among_the_pipelines_a_replica_may_hold(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Other bases' weights are not free when it is read, and stay only if the plan holds them."""
    free = 48 * flux_memory.GIB
    monkeypatch.setattr(lora_tier.torch.cuda, "mem_get_info", lambda _device: (free, flux_memory.H100_BYTES))
    assert lora_tier.default_budget(torch.device("cuda"), pipelines=2, family="flux") == 24 * flux_memory.GIB
