"""What the gateway and a worker replica export is valid Prometheus text and counts real work."""

from __future__ import annotations

import asyncio
import json
import subprocess
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from gateway.server import Gateway
from loraserve.client import AsyncClient, LoraServeError
from core.config import Settings
from serving.tiny import TinyModel
from tests.chart.charttest import render
from tests.chart.monitoring import MONITORING_ON, TARGET_LABELS, alert_rules, dashboard, dashboard_queries, selectors
from tests.conftest import gateway_for, own_gateway_settings, require_tool
from tests.integration.test_generation_api import request
from tests.integration.test_quotas import client_for

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


SERIES_SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"), "gauge": ("",)}


def exported(texts: list[str]) -> tuple[set[str], dict[str, set[str]]]:
    """The series names the endpoints declare (a labelled family before its first sample too), and
    the label names of those that have samples."""
    names: set[str] = set()
    labels: dict[str, set[str]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            names.update(family.name + suffix for suffix in SERIES_SUFFIXES[family.type])
            for sample in family.samples:
                labels.setdefault(sample.name, set()).update(sample.labels)
    return names, labels


def promtool_check(text: str) -> None:
    result = subprocess.run(
        [require_tool("promtool"), "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


async def test_gateway_and_worker_metrics(target: str, stack_settings: Settings, tiny_sdxl: TinyModel) -> None:
    gateway_url = f"http://127.0.0.1:{stack_settings.http_port}/metrics"
    worker_url = f"http://127.0.0.1:{stack_settings.worker_metrics_port}/metrics"
    # The stack is shared: what counts is what this test's own two requests add.
    before = samples(await scrape(gateway_url))
    worker_before = samples(await scrape(worker_url))
    async with AsyncClient(target) as client:
        await client.subscribe(request(tiny_sdxl))
        await client.subscribe(request(tiny_sdxl, seed=8))
    gateway_text = await scrape(gateway_url)
    worker_text = await scrape(worker_url)
    after = samples(gateway_text)
    added = lambda name, *labels: after.get((name, labels), 0) - before.get((name, labels), 0)  # noqa: E731
    assert added("loraserve_requests_finished_total", ("error_type", ""), ("outcome", "completed")) == 2
    assert added("loraserve_inference_seconds_count") == 2
    assert added("loraserve_queue_wait_seconds_count") == 2
    assert after[("loraserve_queue_depth", ())] == 0
    worker = samples(worker_text)
    worker_added = lambda name, *labels: worker.get((name, labels), 0) - worker_before.get((name, labels), 0)  # noqa: E731
    assert worker_added("loraserve_worker_requests_total", ("outcome", "completed")) == 2
    # The first request loads the model unless an earlier test did; the second finds it loaded.
    loads = worker_added("loraserve_pipeline_load_seconds_count")
    hits = worker_added("loraserve_cache_hits_total", ("tier", "pipeline"))
    assert loads in (0, 1) and hits >= 1 and loads + hits == 2, (loads, hits)
    assert worker[("loraserve_pipeline_load_seconds_count", ())] >= 1
    promtool_check(gateway_text)
    promtool_check(worker_text)


@pytest_asyncio.fixture
async def metered(stack: object, stack_settings: Settings, tmp_path: Path) -> AsyncIterator[Gateway]:
    """A gateway of its own in front of the session's workers, whose tenant "metered" may submit once."""
    settings = own_gateway_settings(
        stack_settings, tmp_path, tenant_limits=json.dumps({"metered": {"submits_per_second": 0.001}})
    )
    async with gateway_for(settings) as gateway:
        yield gateway


async def test_a_tenants_requests_and_refusals_are_counted_under_its_name(
    metered: Gateway, tiny_sdxl: TinyModel
) -> None:
    url = f"http://127.0.0.1:{metered.settings.http_port}/metrics"
    before = samples(await scrape(url))
    async with await client_for(metered, "metered") as client:
        await client.subscribe(request(tiny_sdxl, seed=11))
        with pytest.raises(LoraServeError) as refused:
            await client.submit(request(tiny_sdxl, seed=12))
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    text = await scrape(url)
    after = samples(text)
    added = lambda name, *labels: after.get((name, labels), 0) - before.get((name, labels), 0)  # noqa: E731
    assert added("loraserve_tenant_requests_submitted_total", ("tenant", "metered")) == 1
    assert added("loraserve_tenant_requests_finished_total", ("outcome", "completed"), ("tenant", "metered")) == 1
    refusals = {labels: n for (name, labels), n in after.items() if name == "loraserve_requests_refused_total"}
    assert refusals == {(("limit", "submits_per_second"), ("scope", "tenant"), ("tenant", "metered")): 1}
    promtool_check(text)


async def test_every_metric_the_charts_dashboard_and_alerts_query_is_exported(
    target: str, stack_settings: Settings, tiny_sdxl: TinyModel
) -> None:
    # Requests of its own, so that the outcome and cache-tier labels have samples to be read from (the
    # session's first request misses the pipeline tier, a second one hits it).
    async with AsyncClient(target) as client:
        await client.subscribe(request(tiny_sdxl, seed=9))
        await client.subscribe(request(tiny_sdxl, seed=10))
    texts = [
        await scrape(f"http://127.0.0.1:{stack_settings.http_port}/metrics"),
        await scrape(f"http://127.0.0.1:{stack_settings.worker_metrics_port}/metrics"),
    ]
    names, labels = exported(texts)
    rendered = render(values=MONITORING_ON)
    queries = dashboard_queries(dashboard(rendered)) + [rule["expr"] for rule in alert_rules(rendered)]
    checked = set()
    for query in queries:
        for name, matched in selectors(query):
            assert name in names, f"{name} is not exported: {query}"
            if name in labels:
                unknown = matched - TARGET_LABELS - labels[name]
                assert not unknown, f"{name} has no label {sorted(unknown)}: {query}"
                checked.add(name)
    # The labelled series the queries filter on were among those checked.
    assert {
        "loraserve_requests_finished_total",
        "loraserve_tenant_requests_submitted_total",
        "loraserve_tenant_requests_finished_total",
        "loraserve_worker_requests_total",
        "loraserve_cache_hits_total",
        "loraserve_cache_misses_total",
    } <= checked
