"""Retention through a running gateway: once a finished request is older than
retention_seconds, its files and logs are gone and GetResult says it expired instead of handing out
dead URLs.

The gateway shares the session's workers and their local file store (same data dir; PostgreSQL as
its store, so it takes no lock on the data dir) and keeps its own queue, which only this test fills:
its sweep, run as if an hour had passed, touches nothing of the other tests.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlsplit

import grpc
import pytest

from loraserve.client import AsyncClient, LoraServeError
from core.config import Settings
from loraserve.v1 import generation_pb2 as gen
from serving.tiny import TinyModel
from tests.conftest import free_port, gateway_for
from tests.integration.test_generation_api import request

pytestmark = pytest.mark.integration

RETENTION_SECONDS = 3600.0


async def test_a_finished_request_expires_with_its_files_and_says_so(
    stack: Any, stack_settings: Settings, postgres_dsn: str, tiny_sdxl: TinyModel
) -> None:
    settings = stack_settings.replace(
        grpc_port=free_port(),
        http_port=free_port(),
        store_url=postgres_dsn,
        public_url=stack_settings.files_base_url,
        retention_seconds=RETENTION_SECONDS,
    )
    async with gateway_for(settings) as gateway:
        assert gateway.retention is not None
        async with AsyncClient(f"127.0.0.1:{gateway.grpc_port}") as client:
            done = await client.subscribe(request(tiny_sdxl, seed=4242))
            (image,) = done.data.images
            path = stack_settings.files_dir / urlsplit(image.url).path.split("/files/", 1)[1]
            assert path.is_file()
            assert (await client.status(done.request_id, logs=True)).logs

            assert await gateway.retention.run_once() == [], "nothing is older than the retention yet"
            assert path.is_file()
            expired = await gateway.retention.run_once(now=time.time() + RETENTION_SECONDS + 1)
            assert expired == [done.request_id]

            assert not path.exists() and not path.parent.exists()
            with pytest.raises(LoraServeError) as refused:
                await client.result(done.request_id)
            assert refused.value.code == grpc.StatusCode.NOT_FOUND
            assert refused.value.reason == "RESULT_EXPIRED"
            assert "expired" in refused.value.message
            status = await client.status(done.request_id, logs=True)
            assert status.state == gen.REQUEST_STATE_COMPLETED and not status.logs
