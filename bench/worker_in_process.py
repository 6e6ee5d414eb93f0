"""A replica's Worker driven in-process, without Ray Serve: bench.compile's arms and the compile tests'."""

from __future__ import annotations

import asyncio

from serving.app import EvictablePipeline, Worker


def in_process(worker: Worker) -> Worker:
    """Outside a replica there is no Serve multiplexer: the worker's own loader stands in for it."""
    held: dict[str, EvictablePipeline] = {}

    async def pipelines(key: str) -> EvictablePipeline:
        if key not in held:
            held[key] = EvictablePipeline(await asyncio.to_thread(worker._load, key))
        return held[key]

    worker._pipelines = pipelines
    return worker
