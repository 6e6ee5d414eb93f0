"""What the gateway and a worker replica export is valid Prometheus text and counts real work."""

from __future__ import annotations

import asyncio
import subprocess
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from loraserve.client import AsyncClient
from loraserve.config import Settings
from serving.tiny import TinyModel
from tests.conftest import require_tool
from tests.integration.test_generation_api import request

pytestmark = pytest.mark.integration


async def scrape(url: str) -> str:
    def get() -> str:
        with urllib.request.urlopen(url, timeout=30) as response:
            return str(response.read().decode())

    return await asyncio.to_thread(get)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def promtool_check(text: str) -> None:
    result = subprocess.run(
        [require_tool("promtool"), "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


async def test_gateway_and_worker_metrics(target: str, stack_settings: Settings, tiny_sdxl: TinyModel) -> None:
    gateway_url = f"http://127.0.0.1:{stack_settings.http_port}/metrics"
    worker_url = f"http://127.0.0.1:{stack_settings.worker_metrics_port}/metrics"
    before = samples(await scrape(gateway_url))
    async with AsyncClient(target) as client:
        await client.subscribe(request(tiny_sdxl))
        await client.subscribe(request(tiny_sdxl, seed=8))
    gateway_text = await scrape(gateway_url)
    worker_text = await scrape(worker_url)
    after = samples(gateway_text)
    completed = ("loraserve_requests_finished_total", (("error_type", ""), ("outcome", "completed")))
    assert after[completed] == before.get(completed, 0) + 2
    assert after[("loraserve_inference_seconds_count", ())] >= 1
    assert after[("loraserve_queue_wait_seconds_count", ())] >= 1
    assert ("loraserve_queue_depth", ()) in after
    worker = samples(worker_text)
    assert worker[("loraserve_pipeline_load_seconds_count", ())] >= 1
    assert worker[("loraserve_worker_requests_total", (("outcome", "completed"),))] >= 1
    assert worker[("loraserve_cache_hits_total", (("tier", "pipeline"),))] >= 1
    promtool_check(gateway_text)
    promtool_check(worker_text)
