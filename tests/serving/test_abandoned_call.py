"""A worker call whose caller is gone is stopped by its request's next call, and a request run twice leaves
one set of files.

When the Serve proxy a call came through is SIGKILLed, Ray only logs that it cannot report the generator's
items to their caller and the replica's call runs on (Serve cancels it when a live proxy's client hangs up,
not when the proxy dies); the gateway then calls the request again. The real Worker runs in-process on the
tiny SDXL model, each call's generator consumed by a task of its own as Serve's replica does. Outside a
replica there is no Serve multiplexer, so the worker's own loader stands in for it. The first denoising
step is held (a forward pre-hook on the real UNet) until the retry has arrived, so which step the abandoned
call stops at does not depend on timing.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import pytest

from core.config import Settings
from loraserve.errors import ErrorType
from loraserve.inputs import to_input
from loraserve.v1 import worker_pb2
from bench.worker_in_process import in_process
from serving.app import Worker
from serving.latents import OutputFile
from serving.pipelines import GenerationResult
from serving.tiny import TinyModel
from storage.object_store import output_prefix

STEPS = 4
REQUEST_ID = "3f1c8a52-6d0e-4c1e-9a57-0b8f7d2e4c11"
# Deadlines for what the test waits on; a healthy run takes a fraction of them.
WAIT_SECONDS = 120


class FirstStepGate:
    """Holds the first UNet forward pass (the first denoising step) until the test opens the gate."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.opened = threading.Event()

    def __call__(self, _module: Any, _args: Any) -> None:
        if self.entered.is_set():
            return
        self.entered.set()
        if not self.opened.wait(WAIT_SECONDS):
            raise TimeoutError("the test never opened the gate")


class Call:
    """One call of Worker.Generate, consumed to its end by its own task (as Serve's replica does)."""

    def __init__(self, worker: Worker, request: worker_pb2.GenerateRequest) -> None:
        self.events: list[worker_pb2.GenerateResponse] = []
        self.started = asyncio.Event()
        self.task = asyncio.ensure_future(self._consume(worker, request))

    async def _consume(self, worker: Worker, request: worker_pb2.GenerateRequest) -> None:
        async for event in worker.Generate(request):
            self.events.append(event)
            self.started.set()

    def steps(self) -> list[int]:
        return [e.progress.step for e in self.events if e.WhichOneof("event") == "progress"]

    def last(self) -> worker_pb2.GenerateResponse:
        return self.events[-1]


@pytest.fixture
def settings(tmp_path: Path, tiny_sdxl: TinyModel) -> Settings:
    return Settings(data_dir=tmp_path / "data", device="cpu", allowed_local_roots=str(tiny_sdxl.pipeline_dir))


@pytest.fixture
def gate() -> Iterator[FirstStepGate]:
    gate = FirstStepGate()
    yield gate
    gate.opened.set()


@pytest.fixture
def worker(settings: Settings, gate: FirstStepGate) -> Worker:
    return in_process(
        Worker(settings), on_load=lambda pipeline: pipeline.loaded.pipe.unet.register_forward_pre_hook(gate)
    )


def stored(settings: Settings, request_id: str = REQUEST_ID) -> list[str]:
    """The request's stored objects (the local store keeps each one's content type in a hidden file)."""
    folder = settings.files_dir / output_prefix("", request_id)
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.exists() else []


@pytest.mark.timeout(300)
async def test_a_new_call_stops_the_abandoned_one_at_its_next_step_and_one_set_of_files_is_left(
    worker: Worker, gate: FirstStepGate, settings: Settings, tiny_sdxl: TinyModel, caplog: pytest.LogCaptureFixture
) -> None:
    inp = to_input(
        {
            "model_name": str(tiny_sdxl.pipeline_dir),
            "prompt": "a photo of a red house",
            "image_size": {"width": 64, "height": 64},
            "num_inference_steps": STEPS,
            "seed": 7,
        }
    )
    request = worker_pb2.GenerateRequest(request_id=REQUEST_ID, input=inp, seed=7)

    abandoned = Call(worker, request)
    entered = asyncio.ensure_future(asyncio.to_thread(gate.entered.wait, WAIT_SECONDS))
    await asyncio.wait({entered, abandoned.task}, return_when=asyncio.FIRST_COMPLETED)
    assert gate.entered.is_set(), abandoned.events[-1:] or "the first call never started denoising"
    # Its caller is gone without cancelling it; the gateway calls the request again.
    retry = Call(worker, request)
    await asyncio.wait_for(retry.started.wait(), WAIT_SECONDS)
    gate.opened.set()
    await asyncio.wait_for(asyncio.gather(abandoned.task, retry.task), WAIT_SECONDS)

    assert abandoned.last().WhichOneof("event") == "failure", abandoned.last()
    assert abandoned.last().failure.type == ErrorType.CANCELLED
    assert "caller is gone" in abandoned.last().failure.message
    assert abandoned.steps() == [1], "stopped at the end of the step it was in"
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "caller is gone" in r.getMessage()]
    assert len(warned) == 1, "the operator sees that a call was abandoned"
    assert retry.last().WhichOneof("event") == "result", retry.last()
    assert retry.steps()[-1] == STEPS
    (image,) = retry.last().result.output.images
    assert stored(settings) == [image.file_name], "the abandoned call wrote nothing"

    # A call that ran to its end, then another (a retry after a lost result): the same keys.
    again = Call(worker, request)
    await asyncio.wait_for(again.task, WAIT_SECONDS)
    (repeat,) = again.last().result.output.images
    assert repeat.file_name == image.file_name and repeat.url.split("?")[0] == image.url.split("?")[0]
    assert stored(settings) == [image.file_name], "one set of output files"


def test_every_write_of_a_request_uses_the_same_keys(settings: Settings) -> None:
    """Images and debug files alike; another request gets other names."""
    worker = Worker(settings)
    rng = np.random.default_rng(0)
    result = GenerationResult(
        images=[PIL.Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)) for _ in range(2)],
        debug_latents=OutputFile(data=b"latents", content_type="application/octet-stream", file_name="l.safetensors"),
    )

    first = worker._store_outputs(REQUEST_ID, result, "png")
    second = worker._store_outputs(REQUEST_ID, result, "png")
    other = worker._store_outputs("another-request", result, "png")

    names = [i.file_name for i in first.images]
    assert len(set(names)) == 2 and [i.file_name for i in second.images] == names
    assert first.debug_latents.url.split("?")[0] == second.debug_latents.url.split("?")[0]
    assert len(stored(settings)) == 3, "two images and the latents, once"
    assert not set(stored(settings, "another-request")) & set(stored(settings))
    assert [i.file_name for i in other.images] != names
