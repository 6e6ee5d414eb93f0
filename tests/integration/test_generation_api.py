"""The whole path with the real parts: gRPC gateway → queue → Ray Serve replica → storage."""

from __future__ import annotations

import asyncio
import io
import urllib.request
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image

from loraserve.client import AsyncClient, Client, LoraServeError
from core.config import Settings
from loraserve.v1 import generation_pb2 as gen
from serving.tiny import TinyModel
from tests.conftest import read_image_bytes

pytestmark = pytest.mark.integration

IN_QUEUE = gen.REQUEST_STATE_IN_QUEUE
IN_PROGRESS = gen.REQUEST_STATE_IN_PROGRESS
COMPLETED = gen.REQUEST_STATE_COMPLETED
CANCELLED = gen.REQUEST_STATE_CANCELLED


async def fetch(url: str) -> bytes:
    """Off the event loop: the gateway serving the file runs on it."""

    def get() -> bytes:
        with urllib.request.urlopen(url, timeout=30) as response:
            return bytes(response.read())

    return await asyncio.to_thread(get)


def request(model: TinyModel, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model_name": str(model.pipeline_dir),
        "prompt": "a photo of a red house",
        "image_size": {"width": 64, "height": 64},
        "num_inference_steps": 3,
        "seed": 7,
    }
    body.update(overrides)
    return body


def pixels(settings: Settings, url: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(read_image_bytes(settings, url))), dtype=np.int16)


async def generate_pixels(target: str, settings: Settings, body: dict[str, Any]) -> np.ndarray:
    async with AsyncClient(target) as client:
        result = await client.subscribe(body)
    return pixels(settings, result.data.images[0].url)


async def test_submit_status_result(target: str, tiny_sdxl: TinyModel, stack_settings: Settings) -> None:
    def run() -> tuple[gen.RequestStatus, list[gen.RequestStatus], Any, gen.RequestStatus]:
        with Client(target) as client:
            request_id = client.submit(request(tiny_sdxl, num_images=2, image_format="jpeg"))
            first = client.status(request_id)
            statuses = list(client.stream_status(request_id, logs=True))
            return first, statuses, client.result(request_id), client.status(request_id, logs=True)

    first, streamed, result, final = await asyncio.to_thread(run)
    assert streamed[-1].state == COMPLETED and all(s.state != COMPLETED for s in streamed[:-1])
    assert first.state in (IN_QUEUE, IN_PROGRESS, COMPLETED)
    assert final.state == COMPLETED and not final.HasField("error")
    assert final.metrics.queue_wait_seconds >= 0 and final.metrics.inference_seconds > 0
    assert any("generating 2 image(s) 64x64" in entry.message for entry in final.logs)
    assert result.data.seed == 7 and len(result.data.images) == 2
    for image in result.data.images:
        assert (image.width, image.height, image.content_type) == (64, 64, "image/jpeg")
        assert image.file_name.endswith(".jpg")
        served = await fetch(image.url)
        assert served == read_image_bytes(stack_settings, image.url)
        assert len(served) == image.file_size
        assert Image.open(io.BytesIO(served)).size == (64, 64)


async def test_subscribe_stream_is_ordered_and_ends(target: str, tiny_sdxl: TinyModel) -> None:
    updates: list[gen.RequestStatus] = []
    async with AsyncClient(target) as client:
        result = await client.subscribe(
            request(tiny_sdxl, num_inference_steps=4), on_queue_update=updates.append, logs=True
        )
    states = [u.state for u in updates]
    assert states[0] == IN_QUEUE and states[-1] == COMPLETED
    assert states == sorted(states), f"states went backwards: {states}"
    steps = [u.progress.step for u in updates if u.state == IN_PROGRESS and u.HasField("progress")]
    assert steps == sorted(steps) and steps[-1] == 4 and len(set(steps)) >= 2
    assert all(u.progress.total == 4 for u in updates if u.HasField("progress"))
    assert {u.request_id for u in updates} == {result.request_id}
    messages = [entry.message for u in updates for entry in u.logs]
    assert len(messages) == len(set(messages)), "a log line was sent twice"
    assert any(m.startswith("done:") for m in messages)


async def test_same_seed_gives_identical_bytes(target: str, tiny_sdxl: TinyModel, stack_settings: Settings) -> None:
    async with AsyncClient(target) as client:
        a = await client.subscribe(request(tiny_sdxl, seed=1234))
        b = await client.subscribe(request(tiny_sdxl, seed=1234))
        c = await client.subscribe(request(tiny_sdxl, seed=1235))
        unseeded = await client.subscribe({k: v for k, v in request(tiny_sdxl).items() if k != "seed"})
        # The seed a request without one reports is the one its image was made with.
        reseeded = await client.subscribe(request(tiny_sdxl, seed=unseeded.data.seed))
    read = lambda result: read_image_bytes(stack_settings, result.data.images[0].url)  # noqa: E731
    assert a.data.images[0].url != b.data.images[0].url
    assert read(a) == read(b)
    assert read(a) != read(c)
    assert reseeded.data.seed == unseeded.data.seed
    assert read(reseeded) == read(unseeded)


async def test_loras_change_pixels_and_combine(target: str, tiny_sdxl: TinyModel, stack_settings: Settings) -> None:
    lora_a, lora_b = (str(p) for p in tiny_sdxl.lora_paths[:2])
    plain = await generate_pixels(target, stack_settings, request(tiny_sdxl))
    with_a = await generate_pixels(target, stack_settings, request(tiny_sdxl, loras=[{"path": lora_a}]))
    a_zero = await generate_pixels(target, stack_settings, request(tiny_sdxl, loras=[{"path": lora_a, "scale": 0}]))
    with_b = await generate_pixels(target, stack_settings, request(tiny_sdxl, loras=[{"path": lora_b, "scale": 1}]))
    both = await generate_pixels(
        target, stack_settings, request(tiny_sdxl, loras=[{"path": lora_a}, {"path": lora_b, "scale": 1.0}])
    )
    plain_again = await generate_pixels(target, stack_settings, request(tiny_sdxl))
    assert np.abs(with_a - plain).mean() > 1.0
    assert np.array_equal(a_zero, plain)
    assert np.abs(both - with_a).mean() > 1.0 and np.abs(both - with_b).mean() > 1.0
    assert np.array_equal(plain_again, plain), "a LoRA leaked into the next request"


async def test_sd15_family_through_the_service(target: str, tiny_sd15: TinyModel) -> None:
    logs: list[str] = []
    async with AsyncClient(target) as client:
        result = await client.subscribe(
            request(tiny_sd15, loras=[{"path": str(tiny_sd15.lora_paths[0])}]),
            on_queue_update=lambda s: logs.extend(e.message for e in s.logs),
            logs=True,
        )
        again: list[str] = []
        await client.subscribe(
            request(tiny_sd15), on_queue_update=lambda s: again.extend(e.message for e in s.logs), logs=True
        )
    assert result.data.images[0].width == 64
    assert any("(sd15)" in m for m in logs), logs
    assert any("already loaded" in m for m in again), "the replica reloaded a resident base model"


async def test_cancel_waiting_and_running(target: str, tiny_sdxl: TinyModel) -> None:
    long_job = request(tiny_sdxl, num_inference_steps=150, image_size={"width": 128, "height": 128})
    async with AsyncClient(target) as client:
        running_id = await client.submit(long_job)
        waiting_id = await client.submit(request(tiny_sdxl))
        async for status in client.stream_status(running_id):
            if status.HasField("progress") and status.progress.step >= 2:
                break
        waiting = await client.status(waiting_id)
        assert waiting.state == IN_QUEUE
        assert (await client.cancel(waiting_id)).state == CANCELLED

        seen_step = (await client.status(running_id)).progress.step
        cancelled = await client.cancel(running_id)
        assert cancelled.state == CANCELLED
        assert cancelled.progress.step < 150

        for request_id in (waiting_id, running_id):
            with pytest.raises(LoraServeError) as info:
                await client.result(request_id)
            assert info.value.code == grpc.StatusCode.CANCELLED
        # The replica stops at its next step, so the next request runs at once,
        # long before the 150-step job could have finished.
        follow_up = await client.subscribe(request(tiny_sdxl, num_inference_steps=1))
        assert follow_up.data.images
        final = await client.status(running_id)
        assert final.state == CANCELLED and seen_step < 150


async def test_twenty_concurrent_submits_see_falling_positions(target: str, tiny_sdxl: TinyModel) -> None:
    positions: dict[str, list[int]] = {}

    async def one(client: AsyncClient, index: int) -> gen.RequestStatus:
        request_id = await client.submit(request(tiny_sdxl, num_inference_steps=1, seed=index))
        seen = positions.setdefault(request_id, [])
        last = None
        async for status in client.stream_status(request_id):
            if status.state == IN_QUEUE:
                seen.append(status.queue_position)
            last = status
        assert last is not None
        return last

    async with AsyncClient(target) as client:
        finals = await asyncio.gather(*(one(client, i) for i in range(20)))
    assert [f.state for f in finals] == [COMPLETED] * 20
    assert all(not f.HasField("error") for f in finals)
    assert len(positions) == 20
    for request_id, seen in positions.items():
        assert all(p >= 0 for p in seen)
        assert all(a > b for a, b in zip(seen, seen[1:])), f"{request_id}: positions {seen} did not strictly fall"
    assert max(max(seen, default=0) for seen in positions.values()) >= 10, "the requests never queued up"


async def test_bad_input_is_invalid_argument_naming_fields(target: str, tiny_sdxl: TinyModel) -> None:
    body = request(
        tiny_sdxl,
        prompt=" ",
        image_size={"width": 65, "height": 64},
        num_images=9,
        num_inference_steps=0,
        scheduler="Heun",
        timesteps={"method": "array", "array": [999, 500]},
        sigmas={"method": "array", "array": [14.6, 1.0]},
        loras=[{"path": "x.safetensors", "scale": float("nan")}],
    )
    async with AsyncClient(target) as client:
        with pytest.raises(LoraServeError) as info:
            await client.submit(body)
    error = info.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    for field in (
        "input.prompt",
        "input.image_size.width",
        "input.num_images",
        "input.num_inference_steps",
        "input.scheduler",
        "input.sigmas",
        "input.loras[0].scale",
    ):
        assert field in error.field_violations, (field, error.field_violations)
    assert "multiple of 8" in error.field_violations["input.image_size.width"]


async def test_unreachable_model_fails_that_request_only(target: str, tiny_sdxl: TinyModel, tmp_path: Any) -> None:
    async with AsyncClient(target) as client:
        for missing in (str(tmp_path / "no-such-model"), "http://127.0.0.1:9/model.safetensors"):
            request_id = await client.submit(request(tiny_sdxl, model_name=missing))
            async for status in client.stream_status(request_id):
                final = status
            assert final.state == COMPLETED and final.error.type == "MODEL_LOAD_FAILED"
            assert missing in final.error.message
            with pytest.raises(LoraServeError) as info:
                await client.result(request_id)
            assert info.value.reason == "MODEL_LOAD_FAILED"
        ok = await client.subscribe(request(tiny_sdxl))
    assert ok.data.images


async def test_unknown_and_unfinished_requests(target: str, tiny_sdxl: TinyModel) -> None:
    async with AsyncClient(target) as client:
        with pytest.raises(LoraServeError) as unknown:
            await client.status("no-such-request")
        assert unknown.value.code == grpc.StatusCode.NOT_FOUND
        request_id = await client.submit(request(tiny_sdxl, num_inference_steps=20))
        with pytest.raises(LoraServeError) as unfinished:
            await client.result(request_id)
        assert unfinished.value.code == grpc.StatusCode.FAILED_PRECONDITION
        await client.cancel(request_id)


async def test_client_request_id_makes_submit_idempotent(target: str, tiny_sdxl: TinyModel) -> None:
    async with AsyncClient(target) as client:
        first = await client.submit(request(tiny_sdxl), client_request_id="retry-me-1")
        second = await client.submit(request(tiny_sdxl), client_request_id="retry-me-1")
        assert first == second
        async for _ in client.stream_status(first):
            pass


async def test_upload_returns_a_served_file(target: str) -> None:
    buffer = io.BytesIO()
    Image.effect_noise((400, 300), 60).convert("RGB").save(buffer, format="PNG")
    payload = buffer.getvalue()
    assert len(payload) > 64 * 1024
    async with AsyncClient(target) as client:
        stored = await client.upload(payload, file_name="../../evil name.png")
        with pytest.raises(LoraServeError) as refused:
            await client.upload(b"MZ" + bytes(range(256)) * 10, file_name="tool.exe")
    assert stored.file_size == len(payload) and stored.content_type == "image/png"
    assert "/uploads/" in stored.url and ".." not in stored.url
    assert await fetch(stored.url) == payload
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT and "chunk" in refused.value.field_violations


async def test_health_and_reflection(target: str) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    async with grpc.aio.insecure_channel(target) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="loraserve.v1.GenerationService")
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        responses = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = [s.name async for r in responses for s in r.list_services_response.service]
    assert {"loraserve.v1.GenerationService", "loraserve.v1.StorageService", "grpc.health.v1.Health"} <= set(names)
