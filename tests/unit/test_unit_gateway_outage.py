"""The whole gateway (gRPC API, health, store, dispatcher) in front of a worker ingress that is down
when requests come and starts later: nothing fails, the GenerationService reports NOT_SERVING
while dispatching is paused and SERVING again after. The worker is the test's own gRPC
WorkerService on loopback, so no Ray is needed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.server import SERVICE_NAMES, Gateway
from loraserve.client import AsyncClient
from core.config import Settings
from loraserve.v1 import generation_pb2 as gen
from tests.conftest import gateway_for, own_gateway_settings
from tests.unit.worker_testkit import FakeWorker, WorkerServer, wait_until

GENERATION_SERVICE = SERVICE_NAMES[0]


@pytest.fixture
async def worker() -> AsyncIterator[WorkerServer]:
    server = WorkerServer(FakeWorker())
    yield server
    await server.stop()


@pytest.fixture
async def gateway(tmp_path: Path, worker: WorkerServer) -> AsyncIterator[Gateway]:
    settings = Settings(
        serve_grpc_port=worker.port,
        retry_backoff_seconds=0.005,
        retry_backoff_max_seconds=0.05,
        worker_unreachable_threshold=1,
        max_attempts=2,
    )
    async with gateway_for(own_gateway_settings(settings, tmp_path)) as running:
        yield running


async def health(channel: grpc.aio.Channel, service: str) -> int:
    response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service))
    return int(response.status)


async def test_requests_wait_out_a_worker_outage(gateway: Gateway, worker: WorkerServer) -> None:
    target = f"127.0.0.1:{gateway.grpc_port}"
    async with AsyncClient(target) as client, grpc.aio.insecure_channel(target) as channel:
        ids = [await client.submit({"model_name": "org/model", "prompt": f"house {i}"}) for i in range(3)]

        async def paused() -> bool:
            return await health(channel, GENERATION_SERVICE) == health_pb2.HealthCheckResponse.NOT_SERVING

        await wait_until(paused, "the GenerationService reports NOT_SERVING")
        assert await health(channel, "") == health_pb2.HealthCheckResponse.SERVING
        assert gateway.metrics.registry.get_sample_value("loraserve_dispatch_paused") == 1
        for request_id in ids:
            assert (await client.status(request_id)).state == gen.REQUEST_STATE_IN_QUEUE

        await worker.start()

        async def all_completed() -> bool:
            return all([(await client.status(r)).state == gen.REQUEST_STATE_COMPLETED for r in ids])

        await wait_until(all_completed, "every request completed")
        for request_id in ids:
            assert not (await client.status(request_id)).HasField("error")
        assert sorted(worker.worker.calls) == sorted(ids), "each ran once"

        async def serving() -> bool:
            return await health(channel, GENERATION_SERVICE) == health_pb2.HealthCheckResponse.SERVING

        await wait_until(serving, "the GenerationService reports SERVING again")
