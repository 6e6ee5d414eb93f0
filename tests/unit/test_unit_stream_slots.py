"""Status stream slots through a whole gateway (gRPC and fal's HTTP) in front of the test's own worker, which
holds every request running: one tenant cannot take every slot (StreamStatus, Subscribe and SSE are
refused for it at `tenant_max_open_streams`, as other per-tenant quotas are, while another tenant's
streams open), and a /run whose caller hangs up gives its slot back at once while its request goes on."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from gateway.auth import header_value, new_key
from gateway.server import Gateway
from loraserve.client import AsyncClient, LoraServeError
from core.config import Settings
from loraserve.v1 import generation_pb2 as gen
from tests.conftest import gateway_for, own_gateway_settings
from tests.unit.worker_testkit import FakeWorker, WorkerServer, wait_until

BODY = {"model_name": "org/model", "prompt": "a red house"}


@pytest.fixture
async def worker() -> AsyncIterator[WorkerServer]:
    server = WorkerServer(FakeWorker())
    server.worker.default = "hold"
    await server.start()
    yield server
    await server.stop()


def settings(tmp_path: Path, worker: WorkerServer, **overrides: Any) -> Settings:
    return own_gateway_settings(Settings(serve_grpc_port=worker.port, max_in_flight=4), tmp_path, **overrides)


async def key_of(gateway: Gateway, tenant: str) -> str:
    key, secret = new_key(tenant)
    await gateway.store.add_key(key)
    return f"{key.id}:{secret}"


def streams_open(gateway: Gateway) -> float:
    return gateway.metrics.registry.get_sample_value("loraserve_status_streams_open") or 0.0


async def test_a_tenant_at_its_stream_limit_is_refused_while_another_tenants_streams_open(
    tmp_path: Path, worker: WorkerServer
) -> None:
    async with gateway_for(settings(tmp_path, worker, tenant_max_open_streams=1, max_open_streams=10)) as gateway:
        key_a, key_b = await key_of(gateway, "a"), await key_of(gateway, "b")
        target = f"127.0.0.1:{gateway.grpc_port}"
        async with AsyncClient(target, key=key_a) as a, AsyncClient(target, key=key_b) as b:
            held = await a.submit(BODY)
            first = a.stream_status(held).__aiter__()
            assert (await first.__anext__()).request_id == held
            with pytest.raises(LoraServeError) as refused:
                await a.stream_status(held).__aiter__().__anext__()
            with pytest.raises(LoraServeError) as subscribe_refused:
                await a.subscribe(BODY)
            for error in (refused.value, subscribe_refused.value):
                assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and error.reason == "QUOTA_EXCEEDED"
                assert error.quota_violations == {"tenant:a": "max_open_streams"}
                assert error.retry_after_seconds and error.retry_after_seconds > 0
            async with aiohttp.ClientSession(f"http://127.0.0.1:{gateway.settings.http_port}") as http:
                path = f"/fal-ai/lora/requests/{held}/status/stream"
                async with http.get(path, headers={"Authorization": header_value(*key_a.split(":"))}) as sse:
                    assert sse.status == 429 and "max_open_streams" in await sse.text()
                    assert float(sse.headers["Retry-After"]) > 0
            theirs = await b.submit(BODY)
            other = b.stream_status(theirs).__aiter__()
            assert (await other.__anext__()).request_id == theirs
            for stream in (first, other):
                await stream.aclose()  # type: ignore[attr-defined]


async def test_a_run_whose_caller_hangs_up_gives_its_slot_back_and_its_request_goes_on(
    tmp_path: Path, worker: WorkerServer
) -> None:
    async with gateway_for(settings(tmp_path, worker, max_open_streams=1)) as gateway:
        target = f"127.0.0.1:{gateway.grpc_port}"
        http = aiohttp.ClientSession(f"http://127.0.0.1:{gateway.settings.http_port}")
        run = asyncio.ensure_future(http.post("/run/fal-ai/lora", json=BODY))
        await wait_until(lambda: worker.worker.holding and streams_open(gateway) == 1, "the run waits for its request")
        (request_id,) = worker.worker.holding
        run.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await run
        await http.close()
        await wait_until(lambda: streams_open(gateway) == 0, "the run's slot is given back")
        async with AsyncClient(target) as client:
            stream = client.stream_status(request_id).__aiter__()
            assert (await stream.__anext__()).state == gen.REQUEST_STATE_IN_PROGRESS, "the request goes on"
            await stream.aclose()  # type: ignore[attr-defined]
