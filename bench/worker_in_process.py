"""A replica's Worker driven in-process, without Ray Serve: bench.compile's arms and the compile tests'."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from serving.app import EvictablePipeline, Worker


def in_process(worker: Worker, on_load: Callable[[EvictablePipeline], object] = lambda _: None) -> Worker:
    """Outside a replica there is no Serve multiplexer: the worker's own loader stands in for it.

    `on_load` sees each pipeline once, when it is loaded (a test hooks its U-Net there).
    """
    held: dict[str, EvictablePipeline] = {}

    async def pipelines(key: str) -> EvictablePipeline:
        if key not in held:
            held[key] = EvictablePipeline(await asyncio.to_thread(worker._load, key))
            on_load(held[key])
        return held[key]

    worker._pipelines = pipelines
    return worker
