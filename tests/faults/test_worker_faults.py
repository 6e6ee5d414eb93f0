"""Faults under the session's own service: a replica SIGKILLed, the Serve proxy SIGKILLed, callers hanging
up mid-stream. Each test ends with every request finished, so the next one finds the service whole."""

from __future__ import annotations

import gc
import inspect
import os
import signal

import grpc
import pytest

from gateway.generation_service import GenerationService
from loraserve.client import AsyncClient
from core.config import Settings
from loraserve.inputs import to_input
from loraserve.v1 import generation_pb2 as gen
from loraserve.v1 import generation_pb2_grpc, types_pb2
from serving.tiny import TinyModel
from storage.object_store import output_prefix
from tests.faults.faultkit import (
    COMPLETED,
    IN_PROGRESS,
    all_finished,
    body,
    eventually,
    pid_alive,
    running,
    StepWatch,
    serve_actor_pids,
)

pytestmark = pytest.mark.integration


async def assert_completed_with_images(
    client: AsyncClient, request_ids: list[str], settings: Settings
) -> None:
    finals = await all_finished(client, request_ids)
    failed = {rid: (s.state, s.error.message) for rid, s in finals.items() if s.state != COMPLETED or s.HasField("error")}
    assert not failed, failed
    for request_id in request_ids:
        result = await client.result(request_id)
        assert len(result.data.images) == 1, request_id
        image = result.data.images[0]
        assert (settings.files_dir / output_prefix("", request_id) / image.file_name).stat().st_size == image.file_size


async def cut_off(client: AsyncClient, request_ids: list[str]) -> set[str]:
    """Requests whose worker call broke: the gateway logged a warning on them (a retry, or a call that
    never reached a worker)."""
    found = set()
    for request_id in request_ids:
        entries = (await client.status(request_id, logs=True)).logs
        if any(e.source == "gateway" and e.level == types_pb2.LOG_LEVEL_WARN for e in entries):
            found.add(request_id)
    return found


@pytest.mark.timeout(600)
async def test_replica_sigkilled_three_times_loses_no_job(
    stack: object, target: str, stack_settings: Settings, tiny_sdxl: TinyModel
) -> None:
    killed: list[int] = []
    async with AsyncClient(target) as client:
        ids = [await client.submit(body(tiny_sdxl, seed=1000 + i, steps=6)) for i in range(24)]
        steps = StepWatch(client, ids)
        try:
            for kill in range(1, 4):

                async def new_replica() -> int | None:
                    pids = (await serve_actor_pids("SERVE_REPLICA")).values()
                    return next((p for p in pids if p not in killed and pid_alive(p)), None)

                pid = await eventually(new_replica, f"a new replica before kill {kill}")
                # The only replica: a step reported from now on is this one denoising.
                await steps.next_step(f"the new replica denoising a request before kill {kill}")
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        finally:
            await steps.close()
        await assert_completed_with_images(client, ids, stack_settings)
        assert await cut_off(client, ids), "no worker call was cut off by the kills"
    assert len(set(killed)) == 3


@pytest.mark.timeout(600)
async def test_serve_proxy_sigkilled_under_load(
    stack: object, target: str, stack_settings: Settings, tiny_sdxl: TinyModel
) -> None:
    async with AsyncClient(target) as client:
        ids = [await client.submit(body(tiny_sdxl, seed=2000 + i)) for i in range(12)]
        await eventually(lambda: running(client, ids), "a request handed to the workers")
        proxies = await serve_actor_pids("SERVE_PROXY_ACTOR")
        assert proxies, "no Serve proxy actor found"
        for pid in proxies.values():
            os.kill(pid, signal.SIGKILL)
        await assert_completed_with_images(client, ids, stack_settings)
        assert await cut_off(client, ids), "no worker call was cut off by the kill"
    # Every call goes through the proxy: the requests finishing means Serve started a new one.
    assert set((await serve_actor_pids("SERVE_PROXY_ACTOR")).values()).isdisjoint(proxies.values())


def open_status_streams() -> int:
    """Status streams alive in this process: each StreamStatus / Subscribe runs one `updates` generator,
    which holds its feed waiter. Nothing in the gateway counts open streams, so the generators are counted."""
    gc.collect()
    code = GenerationService.updates.__code__
    return sum(1 for o in gc.get_objects() if inspect.isasyncgen(o) and o.ag_code is code)


@pytest.mark.timeout(600)
async def test_callers_hanging_up_mid_stream_free_their_streams_and_lose_no_work(
    stack: object, target: str, stack_settings: Settings, tiny_sdxl: TinyModel
) -> None:
    before = open_status_streams()
    async with AsyncClient(target) as client:
        # Long enough (~15 s here) that the streams are seen freed while it still runs: freed by the
        # hang-up, not by the request ending.
        watched = await client.submit(body(tiny_sdxl, seed=3000, steps=150))
        channels = [grpc.aio.insecure_channel(target) for _ in range(4)]
        for channel in channels[:3]:
            stream = generation_pb2_grpc.GenerationServiceStub(channel).StreamStatus(
                gen.StreamStatusRequest(request_id=watched, logs=True)
            )
            assert (await stream.read()).status.request_id == watched
        subscription = generation_pb2_grpc.GenerationServiceStub(channels[3]).Subscribe(
            gen.SubscribeRequest(input=to_input(body(tiny_sdxl, seed=3001)), logs=True)
        )
        subscribed = (await subscription.read()).status.request_id
        await eventually(lambda: running(client, [watched], min_step=1), "the watched request being denoised")
        assert open_status_streams() >= before + 4
        for channel in channels:
            await channel.close()  # the callers hang up

        async def streams_freed() -> bool | None:
            return True if open_status_streams() <= before else None

        await eventually(streams_freed, "the hung-up callers' status streams closed and freed", timeout=60)
        assert (await client.status(watched)).state == IN_PROGRESS, "the streams were freed only when the request ended"
        await assert_completed_with_images(client, [watched, subscribed], stack_settings)
