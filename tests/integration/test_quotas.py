"""Quotas, overload answers, fair order and priorities through a real gateway in front of the session's workers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio

from gateway.auth import new_key
from gateway.server import Gateway
from loraserve.client import AsyncClient, LoraServeError
from core.config import Settings
from loraserve.v1 import generation_pb2 as gen
from serving.tiny import TinyModel
from tests.conftest import gateway_for, own_gateway_settings
from tests.integration.test_generation_api import request

pytestmark = pytest.mark.integration


@pytest_asyncio.fixture
async def limited(stack: object, stack_settings: Settings, tmp_path: Path) -> AsyncIterator[Gateway]:
    settings = own_gateway_settings(
        stack_settings,
        tmp_path,
        max_in_flight=1,
        max_open_streams=2,
        tenant_limits=json.dumps({"capped": {"max_waiting": 3}, "paced": {"submits_per_second": 0.2}}),
    )
    async with gateway_for(settings) as gateway:
        yield gateway


async def client_for(gateway: Gateway, tenant: str) -> AsyncClient:
    key, secret = new_key(tenant)
    await gateway.store.add_key(key)
    return AsyncClient(f"127.0.0.1:{gateway.grpc_port}", key=f"{key.id}:{secret}")


async def hold_the_worker(client: AsyncClient, tiny_sdxl: TinyModel) -> str:
    """A long job that keeps the gateway's one dispatch slot busy, so what follows waits."""
    blocker = await client.submit(request(tiny_sdxl, num_inference_steps=150))
    async for status in client.stream_status(blocker):
        if status.state == gen.REQUEST_STATE_IN_PROGRESS:
            return blocker
    raise AssertionError("the blocker never started")


async def outcomes(client: AsyncClient, bodies: list[dict[str, Any]]) -> list[str | LoraServeError]:
    async def one(body: dict[str, Any]) -> str | LoraServeError:
        try:
            return await client.submit(body)
        except LoraServeError as exc:
            return exc

    return list(await asyncio.gather(*(one(body) for body in bodies)))


async def test_a_burst_past_the_waiting_quota_is_refused_with_retry_info_and_nothing_accepted_is_lost(
    limited: Gateway, tiny_sdxl: TinyModel
) -> None:
    holder = await client_for(limited, "holder")
    capped = await client_for(limited, "capped")
    async with holder, capped:
        blocker = await hold_the_worker(holder, tiny_sdxl)
        results = await outcomes(capped, [request(tiny_sdxl, seed=i) for i in range(6)])
        accepted = [r for r in results if isinstance(r, str)]
        refused = [r for r in results if isinstance(r, LoraServeError)]
        assert len(accepted) == 3 and len(refused) == 3
        for error in refused:
            assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and error.reason == "QUOTA_EXCEEDED"
            assert error.retry_after_seconds and error.retry_after_seconds > 0
            assert error.quota_violations == {"tenant:capped": "max_waiting"}
        await holder.cancel(blocker)
        for request_id in accepted:
            async for status in capped.stream_status(request_id):
                final = status
            assert final.state == gen.REQUEST_STATE_COMPLETED and not final.HasField("error")


async def test_submits_per_second_and_open_streams(limited: Gateway, tiny_sdxl: TinyModel) -> None:
    paced = await client_for(limited, "paced")
    other = await client_for(limited, "other")
    async with paced, other:
        results = await outcomes(paced, [request(tiny_sdxl), request(tiny_sdxl)])
        (first,) = [r for r in results if isinstance(r, str)]
        (second,) = [r for r in results if isinstance(r, LoraServeError)]
        assert second.quota_violations == {"tenant:paced": "submits_per_second"}
        assert second.retry_after_seconds is not None and 0 < second.retry_after_seconds <= 5.0
        # Another tenant is not slowed by this one's pace.
        assert isinstance(await other.submit(request(tiny_sdxl)), str)
        # Two streams are this gateway's limit; a third is refused, and a closed one frees its place.
        streams = [paced.stream_status(first).__aiter__() for _ in range(3)]
        for stream in streams[:2]:
            assert (await stream.__anext__()).request_id == first
        with pytest.raises(LoraServeError) as full:
            await streams[2].__anext__()
        assert full.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert full.value.quota_violations == {"gateway": "max_open_streams"}
        assert limited.metrics.registry.get_sample_value("loraserve_status_streams_open") == 2
        await streams[0].aclose()  # type: ignore[attr-defined]
        async with asyncio.timeout(30):
            while limited.generation._quotas.open_streams > 1:
                await asyncio.sleep(0.05)
        again = paced.stream_status(first).__aiter__()
        assert (await again.__anext__()).request_id == first
        for stream in (again, streams[1]):
            await stream.aclose()  # type: ignore[attr-defined]


async def test_a_tenants_single_request_goes_after_one_job_of_anothers_burst(
    limited: Gateway, tiny_sdxl: TinyModel
) -> None:
    burst = await client_for(limited, "burst")
    single = await client_for(limited, "single")
    async with burst, single:
        blocker = await hold_the_worker(burst, tiny_sdxl)
        queued = [await burst.submit(request(tiny_sdxl, seed=i)) for i in range(5)]
        mine = await single.submit(request(tiny_sdxl))
        low = await single.submit(request(tiny_sdxl, seed=9), priority="low")
        assert (await single.status(mine)).queue_position == 1
        assert (await single.status(low)).queue_position == 6, "low goes after every normal request"
        with pytest.raises(LoraServeError) as bad:
            await single.submit(request(tiny_sdxl), priority="urgent")
        assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT and "priority" in bad.value.field_violations
        for request_id in queued:
            await burst.cancel(request_id)
        await burst.cancel(blocker)
        await single.cancel(low)
