"""`python -m bench.gateway_load [--streams N] [--calls N]`: what keys and open streams cost a gateway.

Two real gateways on loopback, in this process's event loop, with real stores in a temporary
folder and no workers (their dispatch pauses at once: every request stays waiting, which is
what is measured). One requires API keys and is called with one; the other takes no key. In
interleaved rounds it times Submit on each (auth on ÷ off, goal ≤ 1.1), then GetStatus on the
keyless one with N status streams open on waiting requests ÷ with none (the streams stay
asleep: only their own request's changes, or the queue moving, wake them). A third gateway
caps waiting requests per tenant: bursts of twice that cap, sent at once, measure how long a
RESOURCE_EXHAUSTED answer takes (target: within 50 ms). The clients run in a second process,
so the gateway's event loop is not shared with the caller's.
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
from bench.targets import TARGETS

PROMPT_INPUT = {"model_name": "/nonexistent/model", "prompt": "a red house", "image_size": {"width": 64, "height": 64}}
ROUNDS = 6
# The limited gateway's per-tenant cap on waiting requests; each burst sends twice as many.
QUOTA_LIMIT = 10
QUOTA_BURSTS = 30
QUOTA_BUDGET_MS = 50.0


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _serve(data: Path, ready: Any, stop: Any, key_out: Any) -> None:
    from gateway.auth import new_key
    from gateway.server import Gateway
    from core.config import Settings

    base = Settings(serve_grpc_port=free_port(), device="cpu", log_level="WARNING", max_open_streams=0)
    open_gateway = Gateway(base.replace(data_dir=data / "open", grpc_port=free_port(), http_port=free_port()))
    keyed = Gateway(
        base.replace(data_dir=data / "keyed", grpc_host="0.0.0.0", grpc_port=free_port(), http_port=free_port())
    )
    limited = Gateway(
        base.replace(
            data_dir=data / "limited", grpc_port=free_port(), http_port=free_port(), tenant_max_waiting=QUOTA_LIMIT
        )
    )
    await open_gateway.start()
    await keyed.start()
    await limited.start()
    key, secret = new_key("bench")
    await keyed.store.add_key(key)
    key_out.put((open_gateway.grpc_port, keyed.grpc_port, limited.grpc_port, f"{key.id}:{secret}"))
    ready.set()
    await asyncio.to_thread(stop.wait)
    await limited.stop(grace_seconds=0)
    await keyed.stop(grace_seconds=0)
    await open_gateway.stop(grace_seconds=0)


def _gateways(data: str, ready: Any, stop: Any, key_out: Any) -> None:
    asyncio.run(_serve(Path(data), ready, stop, key_out))


async def quota_answers(client: Any, rounds: int) -> tuple[list[float], int]:
    """Seconds each RESOURCE_EXHAUSTED took under bursts of twice the cap, and how many were answered
    otherwise than accepted or RESOURCE_EXHAUSTED (never expected). Each burst's accepted requests
    are cancelled afterwards, so every burst starts from an empty queue."""
    import grpc

    from loraserve.client import LoraServeError

    refused: list[float] = []
    other = 0

    async def one() -> str | None:
        nonlocal other
        started = time.perf_counter()
        try:
            return str(await client.submit(PROMPT_INPUT))
        except LoraServeError as exc:
            if exc.code is grpc.StatusCode.RESOURCE_EXHAUSTED and exc.retry_after_seconds is not None:
                refused.append(time.perf_counter() - started)
            else:
                other += 1
            return None

    for _ in range(rounds):
        accepted = [rid for rid in await asyncio.gather(*(one() for _ in range(2 * QUOTA_LIMIT))) if rid]
        for request_id in accepted:
            await client.cancel(request_id)
    return refused, other


async def keyless_refused(port: int) -> str:
    """"" when the gateway answers a Submit without a key UNAUTHENTICATED; otherwise what it did instead.

    Without this the auth-on arm could time a gateway that checks nothing and still look cheap.
    """
    import grpc

    from loraserve.client import AsyncClient, LoraServeError

    async with AsyncClient(f"127.0.0.1:{port}") as keyless:
        try:
            request_id = await keyless.submit(PROMPT_INPUT)
        except LoraServeError as exc:
            if exc.code is grpc.StatusCode.UNAUTHENTICATED:
                return ""
            return f"a Submit without a key was answered {exc.code.name}, not UNAUTHENTICATED"
    return f"a Submit without a key was accepted ({request_id}): the auth-on gateway checks no key"


async def measure(
    open_port: int, keyed_port: int, limited_port: int, key: str, streams: int, calls: int
) -> list[stats.Row]:
    from loraserve.client import AsyncClient

    auth_checked = await keyless_refused(keyed_port)

    submit_on: list[float] = []
    submit_off: list[float] = []
    status_with: list[float] = []
    status_without: list[float] = []
    async with AsyncClient(f"127.0.0.1:{open_port}") as plain, AsyncClient(
        f"127.0.0.1:{keyed_port}", key=key
    ) as keyed, AsyncClient(f"127.0.0.1:{limited_port}") as limited:
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
        refused, other = await quota_answers(limited, QUOTA_BURSTS)
    if other:
        raise RuntimeError(f"{other} submits of a burst were answered neither accepted nor RESOURCE_EXHAUSTED")
    ms = stats.ms
    return [
        stats.row(
            "Submit p99, auth on ÷ off",
            ("with a key", stats.percentile(ms(submit_on), 99)),
            ("no key", stats.percentile(ms(submit_off), 99)),
            *TARGETS["gateway auth on ÷ off"],
            f"p50 {stats.median(ms(submit_on)):.2f} / {stats.median(ms(submit_off)):.2f} ms; a keyless Submit "
            + ("refused UNAUTHENTICATED" if not auth_checked else "not refused"),
            {"on": len(submit_on), "off": len(submit_off)},
            auth_checked,
        ),
        stats.row(
            f"GetStatus p99, {streams} streams open ÷ none",
            (f"{streams} streams", stats.percentile(ms(status_with), 99)),
            ("no stream", stats.percentile(ms(status_without), 99)),
            detail=f"p50 {stats.median(ms(status_with)):.2f} / {stats.median(ms(status_without)):.2f} ms",
            samples={"with": len(status_with), "without": len(status_without)},
        ),
        stats.row(
            f"RESOURCE_EXHAUSTED p99, bursts of 2x a cap of {QUOTA_LIMIT} ÷ the 50 ms budget",
            ("refused", stats.percentile(ms(refused), 99)),
            ("budget", QUOTA_BUDGET_MS),
            *TARGETS["gateway RESOURCE_EXHAUSTED ÷ budget"],
            f"p50 {stats.median(ms(refused)):.2f} ms, max {max(ms(refused)):.2f} ms",
            {"refused": len(refused)},
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
            open_port, keyed_port, limited_port, key = ports.get()
            rows = asyncio.run(measure(open_port, keyed_port, limited_port, key, args.streams, args.calls))
        finally:
            stop.set()
            server.join(60)
    print(stats.format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
