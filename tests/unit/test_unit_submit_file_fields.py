"""The file fields of a submit through a whole gateway (gRPC and fal's HTTP) in front of the test's own worker:
a non-ASCII URL is queued in the ASCII form HTTP sends (as is the webhook URL), one with no such form and
a data URI over `max_data_uri_bytes` are refused naming their field (INVALID_ARGUMENT / 422), never
queued to fail later on a worker."""

from __future__ import annotations

import base64
from pathlib import Path

import aiohttp
import grpc
import pytest

from loraserve.client import AsyncClient, LoraServeError
from tests.conftest import gateway_for
from tests.unit.test_unit_stream_slots import BODY, settings, worker  # noqa: F401 - the fixture
from tests.unit.worker_testkit import WorkerServer

IDN = "https://bücher.example/style.safetensors?x=é"
IDN_ASCII = "https://xn--bcher-kva.example/style.safetensors?x=%C3%A9"
NO_ASCII_FORM = "https://é..x/style.safetensors"


async def test_file_fields_are_made_ascii_or_refused_at_submit(tmp_path: Path, worker: WorkerServer) -> None:  # noqa: F811
    async with gateway_for(settings(tmp_path, worker, max_data_uri_bytes=1000)) as gateway:
        async with AsyncClient(f"127.0.0.1:{gateway.grpc_port}") as client:
            queued = await client.submit({**BODY, "loras": [{"path": IDN}]}, webhook_url="https://hooks.example/h?x=é")
            record = await gateway.store.get(queued)
            assert record is not None and record.input.loras[0].path == IDN_ASCII
            assert record.webhook_url == "https://hooks.example/h?x=%C3%A9"
            with pytest.raises(LoraServeError) as refused:
                await client.submit({**BODY, "loras": [{"path": NO_ASCII_FORM}]})
            assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert "internationalised domain name" in refused.value.field_violations["input.loras[0].path"]

        big = "data:application/octet-stream;base64," + base64.b64encode(b"\0" * 1001).decode()
        async with aiohttp.ClientSession(f"http://127.0.0.1:{gateway.settings.http_port}") as http:
            for path, why in ((big, "max_data_uri_bytes"), (NO_ASCII_FORM, "internationalised domain name")):
                async with http.post("/fal-ai/lora", json={**BODY, "loras": [{"path": path}]}) as response:
                    assert response.status == 422, await response.text()
                    (detail,) = (await response.json())["detail"]
                    assert detail["loc"] == ["body", "loras", 0, "path"] and why in detail["msg"]
            async with http.post("/fal-ai/lora", params={"fal_webhook": "https://é..x/h"}, json=BODY) as response:
                assert response.status == 422
                (detail,) = (await response.json())["detail"]
                assert detail["loc"] == ["query", "fal_webhook"] and "internationalised" in detail["msg"]

