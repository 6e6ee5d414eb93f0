"""A worker replica's Prometheus metrics (names under `loraserve_`), on its own HTTP port.

One replica per node is the production shape (one GPU each), so one fixed port per
node is enough; a second replica on the same node finds the port taken and logs it.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

LOAD_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.pipeline_load_seconds = Histogram(
            "loraserve_pipeline_load_seconds", "Time to load a base pipeline.", buckets=LOAD_BUCKETS, registry=self.registry
        )
        self.adapter_load_seconds = Histogram(
            "loraserve_adapter_load_seconds",
            "Time to make an adapter resident in a pipeline.",
            buckets=LOAD_BUCKETS,
            registry=self.registry,
        )
        self.cache_hits = Counter(
            "loraserve_cache_hits", "Cache lookups served from a tier.", ["tier"], registry=self.registry
        )
        self.cache_misses = Counter(
            "loraserve_cache_misses", "Cache lookups a tier could not serve.", ["tier"], registry=self.registry
        )
        self.cache_evictions = Counter(
            "loraserve_cache_evictions", "Entries evicted from a tier.", ["tier"], registry=self.registry
        )
        self.cache_evicted_bytes = Counter(
            "loraserve_cache_evicted_bytes", "Bytes freed by evictions from a tier.", ["tier"], registry=self.registry
        )
        self.cache_bytes = Gauge("loraserve_cache_bytes", "Bytes held by a tier.", ["tier"], registry=self.registry)
        self.generation_seconds = Histogram(
            "loraserve_worker_generation_seconds",
            "Denoising and decoding time of one request on this replica.",
            buckets=LOAD_BUCKETS,
            registry=self.registry,
        )
        self.compile_recompiles = Counter(
            "loraserve_compile_recompiles",
            "torch.compile compiles after a pipeline's warm-up (each logged with dynamo's guard failure).",
            registry=self.registry,
        )
        self.requests = Counter(
            "loraserve_worker_requests", "Requests this replica ended, by outcome.", ["outcome"], registry=self.registry
        )

    def tier_observer(self, tier: str) -> TierObserver:
        return TierObserver(self, tier)

    def serve(self, port: int) -> bool:
        """Starts the /metrics endpoint; False when the port is already taken on this node."""
        try:
            start_http_server(port, addr="0.0.0.0", registry=self.registry)
        except OSError as exc:
            log.warning("worker metrics port taken; this replica is not scraped", extra={"port": port, "error": str(exc)})
            return False
        return True


class TierObserver:
    """Feeds one tier's series from a cache that must not know Prometheus (it satisfies storage's `CacheObserver`)."""

    def __init__(self, metrics: WorkerMetrics, tier: str) -> None:
        self._hits = metrics.cache_hits.labels(tier=tier)
        self._misses = metrics.cache_misses.labels(tier=tier)
        self._evictions = metrics.cache_evictions.labels(tier=tier)
        self._evicted_bytes = metrics.cache_evicted_bytes.labels(tier=tier)
        self._bytes = metrics.cache_bytes.labels(tier=tier)

    def on_hit(self) -> None:
        self._hits.inc()

    def on_miss(self) -> None:
        self._misses.inc()

    def on_evict(self, size_bytes: int) -> None:
        self._evictions.inc()
        self._evicted_bytes.inc(size_bytes)

    def on_bytes(self, total_bytes: int) -> None:
        self._bytes.set(total_bytes)
