"""The worker's metrics adapter: the weights cache's disk tier reaches the Prometheus series."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
from safetensors.numpy import save

from serving.metrics import WorkerMetrics
from storage.fetch import FetchPolicy
from storage.weights import WeightsCache


def _weights_data_uri(values: int) -> str:
    data = save({"w": np.arange(values, dtype=np.float32)})
    return f"data:application/octet-stream;base64,{base64.b64encode(data).decode()}"


def test_disk_tier_observer_feeds_the_cache_series(tmp_path: Path) -> None:
    metrics = WorkerMetrics()
    first, second = _weights_data_uri(100), _weights_data_uri(200)
    cache = WeightsCache(
        tmp_path, FetchPolicy(), max_blob_bytes=1, min_blob_age_seconds=0, observer=metrics.tier_observer("disk")
    )
    first_blob = cache.resolve(first, "f")
    first_bytes = first_blob.stat().st_size
    cache.resolve(first, "f")
    second_blob = cache.resolve(second, "f")  # over budget: the first blob goes

    def sample(name: str) -> float | None:
        return metrics.registry.get_sample_value(name, {"tier": "disk"})

    assert sample("loraserve_cache_hits_total") == 1
    assert sample("loraserve_cache_misses_total") == 2
    assert sample("loraserve_cache_evictions_total") == 1
    assert sample("loraserve_cache_evicted_bytes_total") == first_bytes
    assert sample("loraserve_cache_bytes") == second_blob.stat().st_size
    assert not first_blob.exists()
    assert metrics.registry.get_sample_value("loraserve_cache_hits_total", {"tier": "gpu"}) is None
