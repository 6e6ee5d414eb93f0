"""`python -m bench.gateway_load [--streams N] [--calls N]`: what keys and open streams cost a gateway.

Two real gateways on loopback, in this process's event loop, with real stores in a temporary
folder and no workers (their dispatch pauses at once: every request stays waiting, which is
what is measured). One requires API keys and is called with one; the other takes no key. In
interleaved rounds it times Submit on each (auth on ÷ off, goal ≤ 1.1), then GetStatus on the
keyless one with N status streams open on waiting requests ÷ with none (the streams stay
asleep: only their own request's changes, or the queue moving, wake them). The clients run in
a second process, so the gateway's event loop is not shared with the caller's.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import stats

PROMPT_INPUT = {"model_name": "/nonexistent/model", "prompt": "a red house", "image_size": {"width": 64, "height": 64}}
ROUNDS = 6


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _serve(data: Path, ready: Any, stop: Any, key_out: Any) -> None:
    from gateway.auth import new_key
    from gateway.server import Gateway
    from loraserve.config import Settings

    base = Settings(serve_grpc_port=free_port(), device="cpu", log_level="WARNING", max_open_streams=0)
    open_gateway = Gateway(base.replace(data_dir=data / "open", grpc_port=free_port(), http_port=free_port()))
    keyed = Gateway(
        base.replace(data_dir=data / "keyed", grpc_host="0.0.0.0", grpc_port=free_port(), http_port=free_port())
    )
    await open_gateway.start()
    await keyed.start()
    key, secret = new_key("bench")
    await keyed.store.add_key(key)
    key_out.put((open_gateway.grpc_port, keyed.grpc_port, f"{key.id}:{secret}"))
    ready.set()
    await asyncio.to_thread(stop.wait)
    await keyed.stop(grace_seconds=0)
    await open_gateway.stop(grace_seconds=0)


def _gateways(data: str, ready: Any, stop: Any, key_out: Any) -> None:
    asyncio.run(_serve(Path(data), ready, stop, key_out))


async def measure(open_port: int, keyed_port: int, key: str, streams: int, calls: int) -> list[stats.Row]:
    from loraserve.client import AsyncClient

    submit_on: list[float] = []
    submit_off: list[float] = []
    status_with: list[float] = []
    status_without: list[float] = []
    async with AsyncClient(f"127.0.0.1:{open_port}") as plain, AsyncClient(
        f"127.0.0.1:{keyed_port}", key=key
    ) as keyed:
        probe = await plain.submit(PROMPT_INPUT)
        waiting = [await plain.submit(PROMPT_INPUT) for _ in range(streams)]

        async def timed(call: Any, into: list[float]) -> None:
            started = time.perf_counter()
            await call
            into.append(time.perf_counter() - started)

        async def open_all() -> list[asyncio.Task[None]]:
            """One stream per waiting request; returns once each has sent its first status."""
            first = asyncio.Semaphore(0)

            async def follow(request_id: str) -> None:
                async for _ in plain.stream_status(request_id):
                    first.release()

            tasks = [asyncio.create_task(follow(rid)) for rid in waiting]
            for _ in waiting:
                await first.acquire()
            return tasks

        async def close_all(tasks: list[asyncio.Task[None]]) -> None:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        async def statuses(into: list[float]) -> None:
            for _ in range(calls):
                await timed(plain.status(probe), into)

        for index in range(ROUNDS):
            for _ in range(calls):
                await timed(keyed.submit(PROMPT_INPUT), submit_on)
                await timed(plain.submit(PROMPT_INPUT), submit_off)
            if index % 2:
                await statuses(status_without)
            tasks = await open_all()
            await statuses(status_with)
            await close_all(tasks)
            if not index % 2:
                await statuses(status_without)
    ms = stats.ms
    return [
        stats.row(
            "Submit p99, auth on ÷ off",
            ("with a key", stats.percentile(ms(submit_on), 99)),
            ("no key", stats.percentile(ms(submit_off), 99)),
            "<=",
            1.1,
            f"p50 {stats.median(ms(submit_on)):.2f} / {stats.median(ms(submit_off)):.2f} ms",
            {"on": len(submit_on), "off": len(submit_off)},
        ),
        stats.row(
            f"GetStatus p99, {streams} streams open ÷ none",
            (f"{streams} streams", stats.percentile(ms(status_with), 99)),
            ("no stream", stats.percentile(ms(status_without), 99)),
            detail=f"p50 {stats.median(ms(status_with)):.2f} / {stats.median(ms(status_without)):.2f} ms",
            samples={"with": len(status_with), "without": len(status_without)},
        ),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gateway_load", description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--calls", type=int, default=200, help="timed calls per arm per round")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as data:
        context = multiprocessing.get_context("spawn")
        ready, stop, ports = context.Event(), context.Event(), context.Queue()
        server = context.Process(target=_gateways, args=(data, ready, stop, ports), daemon=True)
        server.start()
        try:
            if not ready.wait(120):
                raise RuntimeError("the gateways did not start within 120 s")
            open_port, keyed_port, key = ports.get()
            rows = asyncio.run(measure(open_port, keyed_port, key, args.streams, args.calls))
        finally:
            stop.set()
            server.join(60)
    print(stats.format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
