"""Gateway stop, restart and worker failure, with the real Serve workers of the session."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
import ray

from gateway.store import State
from gateway.store_sqlite import SqliteStore
from loraserve.client import AsyncClient, LoraServeError
from core.config import Settings
from loraserve.inputs import to_input
from core.model_key import BaseModelRef
from loraserve.v1 import generation_pb2 as gen
from serving.tiny import TinyModel
from tests.conftest import own_gateway_settings, start_gateway
from tests.integration.test_generation_api import request

pytestmark = pytest.mark.integration


async def wait_until_running(client: AsyncClient, request_id: str) -> None:
    async for status in client.stream_status(request_id):
        if status.HasField("progress"):
            return


async def test_graceful_shutdown_finishes_running_and_refuses_new(
    stack: object, stack_settings: Settings, tiny_sdxl: TinyModel, tmp_path: Path
) -> None:
    settings = own_gateway_settings(stack_settings, tmp_path)
    gateway = await start_gateway(settings)
    async with AsyncClient(f"127.0.0.1:{settings.grpc_port}") as client:
        running = await client.submit(request(tiny_sdxl, num_inference_steps=30))
        await wait_until_running(client, running)
        stopping = asyncio.ensure_future(gateway.stop(grace_seconds=120))
        with pytest.raises(LoraServeError) as refused:
            await client.submit(request(tiny_sdxl))
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE
        await stopping
    store = SqliteStore(settings.store_path)
    record = await store.get(running)
    assert record is not None and record.state == State.COMPLETED and record.error is None
    await store.close()


async def test_restart_runs_what_was_waiting_or_running(
    stack: object, stack_settings: Settings, tiny_sdxl: TinyModel, tmp_path: Path
) -> None:
    settings = own_gateway_settings(stack_settings, tmp_path)
    inp = to_input(request(tiny_sdxl))
    key = BaseModelRef.normalised(inp.model_name).key
    store = SqliteStore(settings.store_path)
    interrupted, _ = await store.add(inp, seed=1, model_key=key)
    waiting, _ = await store.add(inp, seed=2, model_key=key)
    assert await store.claim(interrupted.id)
    await store.close()  # the gateway "died" with one request running and one waiting

    gateway = await start_gateway(settings)
    try:
        async with AsyncClient(f"127.0.0.1:{settings.grpc_port}") as client:
            for request_id in (interrupted.id, waiting.id):
                async for status in client.stream_status(request_id):
                    final = status
                assert final.state == gen.REQUEST_STATE_COMPLETED and not final.HasField("error")
                assert (await client.result(request_id)).data.images
    finally:
        await gateway.stop()


async def test_a_replica_dying_mid_request_is_retried(
    stack: object, target: str, tiny_sdxl: TinyModel
) -> None:
    async with AsyncClient(target) as client:
        request_id = await client.submit(request(tiny_sdxl, num_inference_steps=100))
        await wait_until_running(client, request_id)
        replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if "SERVE_REPLICA" in a["name"]]
        assert replicas, "no Serve replica actor found"
        for actor in replicas:
            ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=False)
        async for status in client.stream_status(request_id, logs=True):
            final = status
        full = await client.status(request_id, logs=True)
    assert final.state == gen.REQUEST_STATE_COMPLETED and not final.HasField("error"), final
    assert any("retrying" in entry.message for entry in full.logs)
