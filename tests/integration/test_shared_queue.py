"""Several gateways on one PostgreSQL queue, in front of the session's real Serve workers; and
fal's `start_timeout` through the API."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from gateway.server import Gateway
from gateway.store import State
from loraserve.client import AsyncClient, LoraServeError
from core.config import Settings
from loraserve.v1 import generation_pb2 as gen
from serving.tiny import TinyModel
from tests.conftest import gateway_for, own_gateway_settings
from tests.integration.test_generation_api import request

pytestmark = pytest.mark.integration


@pytest_asyncio.fixture
async def gateways(
    stack: object, stack_settings: Settings, postgres_dsn: str, tmp_path: Path
) -> AsyncIterator[tuple[Gateway, Gateway]]:
    settings = [own_gateway_settings(stack_settings, tmp_path, store_url=postgres_dsn) for _ in range(2)]
    async with gateway_for(settings[0]) as a, gateway_for(settings[1]) as b:
        yield a, b


def target(gateway: Gateway) -> str:
    return f"127.0.0.1:{gateway.grpc_port}"


async def final_status(client: AsyncClient, request_id: str) -> gen.RequestStatus:
    async for status in client.stream_status(request_id):
        last = status
    return last


async def test_two_gateways_share_one_queue(gateways: tuple[Gateway, Gateway], tiny_sdxl: TinyModel) -> None:
    a, b = gateways
    async with AsyncClient(target(a)) as on_a, AsyncClient(target(b)) as on_b:
        # Two long requests take each gateway's one place in flight (one worker, one request at a time),
        # so the six submitted next all wait while their places are compared.
        long = request(tiny_sdxl, num_inference_steps=150, image_size={"width": 256, "height": 256})
        blockers = [await on_a.submit(long) for _ in range(2)]
        async with asyncio.timeout(60):
            while (a.dispatcher.in_flight, b.dispatcher.in_flight) != (1, 1):
                await asyncio.sleep(0.05)
        ids = [await (on_a if i % 2 else on_b).submit(request(tiny_sdxl, seed=i)) for i in range(6)]
        # Whichever gateway is asked, a waiting request has the same place.
        places = []
        for request_id in ids:
            status_a, status_b = await on_a.status(request_id), await on_b.status(request_id)
            assert status_a.state == status_b.state == gen.REQUEST_STATE_IN_QUEUE
            assert status_a.queue_position == status_b.queue_position
            places.append(status_a.queue_position)
        assert places == list(range(6))
        for blocker in blockers:
            await on_b.cancel(blocker)
        # Each gateway's stream follows requests the other submitted (and perhaps ran) to their end.
        finals = await asyncio.gather(*(final_status(on_b if i % 2 else on_a, rid) for i, rid in enumerate(ids)))
        assert all(s.state == gen.REQUEST_STATE_COMPLETED and not s.HasField("error") for s in finals), finals
        for request_id in ids:
            assert (await on_a.result(request_id)).data.images
            assert (await on_b.result(request_id)).data.images
        # Nothing ran twice: one claim each.
        assert {(await a.store.get(rid)).attempts for rid in ids} == {1}  # type: ignore[union-attr]


async def test_cancel_on_one_gateway_stops_a_run_on_the_other(
    gateways: tuple[Gateway, Gateway], tiny_sdxl: TinyModel
) -> None:
    a, b = gateways
    async with AsyncClient(target(a)) as on_a, AsyncClient(target(b)) as on_b:
        request_id = await on_a.submit(request(tiny_sdxl, num_inference_steps=150))
        async for status in on_a.stream_status(request_id):
            if status.HasField("progress"):
                break
        record = await a.store.get(request_id)
        assert record is not None and record.state == State.IN_PROGRESS
        owner, other = (a, on_b) if record.owner == a.store.owner else (b, on_a)
        assert owner.dispatcher.in_flight == 1
        cancelled = await other.cancel(request_id)
        assert cancelled.state == gen.REQUEST_STATE_CANCELLED
        # The owner hears of it (NOTIFY, or at the latest its next lease renewal) and ends the worker call.
        async with asyncio.timeout(60):
            while owner.dispatcher.in_flight:
                await asyncio.sleep(0.05)
        final = await a.store.get(request_id)
        assert final is not None and final.state == State.CANCELLED and final.output is None


async def test_a_request_not_started_within_its_start_timeout_fails_unrun(
    stack: object, target: str, tiny_sdxl: TinyModel
) -> None:
    async with AsyncClient(target) as client:
        blocker = await client.submit(request(tiny_sdxl, num_inference_steps=150))
        async for status in client.stream_status(blocker):
            if status.state == gen.REQUEST_STATE_IN_PROGRESS:
                break
        late = await client.submit(request(tiny_sdxl), start_timeout=1.5)
        final = await final_status(client, late)
        await client.cancel(blocker)
        assert final.state == gen.REQUEST_STATE_COMPLETED
        assert final.error.type == "START_TIMEOUT"
        with pytest.raises(LoraServeError) as failed:
            await client.result(late)
        assert failed.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


@pytest.mark.parametrize("seconds", [-1.0, 0.5, float("nan")])
async def test_a_bad_start_timeout_is_refused_by_name(
    stack: object, target: str, tiny_sdxl: TinyModel, seconds: float
) -> None:
    async with AsyncClient(target) as client:
        with pytest.raises(LoraServeError) as refused:
            await client.submit(request(tiny_sdxl), start_timeout=seconds)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "start_timeout" in refused.value.field_violations


async def test_previews_reach_a_stream_on_the_gateway_that_does_not_run_the_request(
    gateways: tuple[Gateway, Gateway], tiny_sdxl: TinyModel
) -> None:
    a, b = gateways
    async with AsyncClient(target(a)) as on_a, AsyncClient(target(b)) as on_b:
        request_id = await on_a.submit(request(tiny_sdxl, num_inference_steps=60, seed=21))
        async for status in on_a.stream_status(request_id):
            if status.state == gen.REQUEST_STATE_IN_PROGRESS:
                break
        record = await a.store.get(request_id)
        assert record is not None and record.owner in (a.store.owner, b.store.owner)
        # Streams on the gateway that does not run it: previews reach them only through the store.
        elsewhere = on_b if record.owner == a.store.owner else on_a

        async def collect(previews: bool) -> list[gen.RequestStatus]:
            return [status async for status in elsewhere.stream_status(request_id, previews=previews)]

        with_previews, without = await asyncio.gather(collect(True), collect(False))

    assert with_previews[-1].state == without[-1].state == gen.REQUEST_STATE_COMPLETED
    assert not with_previews[-1].HasField("error")
    assert not any(status.progress.preview_jpeg for status in without)
    previews = [status.progress for status in with_previews if status.progress.preview_jpeg]
    assert previews, "a stream on the other gateway that asked for previews got none"
    assert len({p.preview_jpeg for p in previews}) == len(previews), "a preview was sent twice"
    assert [p.step for p in previews] == sorted(p.step for p in previews)
    assert (previews[-1].step, previews[-1].total) == (60, 60), "the last preview is of the final latents"
    assert previews[-1].preview_jpeg[:2] == b"\xff\xd8", "a JPEG"
