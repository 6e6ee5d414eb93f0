"""Ray Serve's gRPC ingress (the workers' port) serves the gateway only: without the gateway's secret
a call is refused, and with it the input is validated again."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from gateway.worker_client import WorkerClient
from loraserve.client import AsyncClient
from core.config import Settings
from loraserve.errors import ErrorType
from loraserve.inputs import to_input
from core.model_key import BaseModelRef
from loraserve.v1 import worker_pb2, worker_pb2_grpc
from serving.tiny import TinyModel
from tests.integration.test_generation_api import request

pytestmark = pytest.mark.integration

REFUSED = "calls to the workers must come from the loraserve gateway (worker secret missing or wrong)"


def model_key(body: dict[str, Any]) -> str:
    return BaseModelRef.normalised(body["model_name"]).key


async def generate_directly(settings: Settings, body: dict[str, Any], secret: str) -> list[worker_pb2.GenerateResponse]:
    """Straight to the workers' port, as a peer inside the cluster network could call it."""
    client = WorkerClient(
        f"127.0.0.1:{settings.serve_grpc_port}", settings.serve_app_name, shared_secret=secret, keepalive_seconds=0
    )
    try:
        call = client.generate(
            worker_pb2.GenerateRequest(request_id="direct-call", input=to_input(body), seed=1), model_key(body)
        )
        return [event async for event in call]
    finally:
        await client.close()


@pytest.mark.parametrize("secret", ["", "not-the-secret"], ids=["no-secret", "wrong-secret"])
async def test_a_call_without_the_gateways_secret_is_refused(
    stack: Any, stack_settings: Settings, tiny_sdxl: TinyModel, secret: str
) -> None:
    assert stack.settings.worker_shared_secret, "the session's workers run with a secret"
    body = request(tiny_sdxl)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await generate_directly(stack_settings, body, secret)
    assert (refused.value.code(), refused.value.details()) == (grpc.StatusCode.PERMISSION_DENIED, REFUSED)


async def test_a_prefetch_without_the_secret_is_refused(
    stack: Any, stack_settings: Settings, tiny_sdxl: TinyModel
) -> None:
    body = request(tiny_sdxl)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{stack_settings.serve_grpc_port}")
    try:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Prefetch(
                worker_pb2.PrefetchRequest(request_id="direct-prefetch", input=to_input(body)),
                metadata=(("application", stack_settings.serve_app_name), ("multiplexed_model_id", model_key(body))),
                timeout=60,
            )
        assert (refused.value.code(), refused.value.details()) == (grpc.StatusCode.PERMISSION_DENIED, REFUSED)
    finally:
        await channel.close()


async def test_with_the_secret_an_invalid_input_is_refused_by_the_gateways_validation(
    stack: Any, stack_settings: Settings, tiny_sdxl: TinyModel
) -> None:
    body = request(tiny_sdxl, num_images=10000)
    events = await generate_directly(stack_settings, body, stack.settings.worker_shared_secret)
    (failure,) = [event.failure for event in events if event.HasField("failure")]
    assert failure.type == ErrorType.INVALID_INPUT
    assert "input.num_images" in failure.message
    assert not any(event.HasField("result") for event in events)


async def test_the_gateway_path_still_generates(target: str, tiny_sdxl: TinyModel) -> None:
    async with AsyncClient(target) as client:
        result = await client.subscribe(request(tiny_sdxl, seed=61))
    assert len(result.data.images) == 1
