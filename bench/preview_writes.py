"""`python -m bench.preview_writes [--calls 300] [--bytes 3072]`: what keeping live previews in the request
store costs the gateway that runs a request, on both engines (gateway/previews.py).

The same running request's `set_progress` with and without a preview of `--bytes` random bytes (a JPEG
does not compress), in interleaved rounds; and the read a stream that asked for previews adds to each
of its wake-ups, `preview()`, when there is a newer preview and when there is none. PostgreSQL is a
throwaway server (Debian's `postgresql` package, tests/postgres_server.py) on loopback; it is skipped
when none is installed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from bench.stats import median, percentile
from gateway.store import RequestStore
from gateway.store_postgres import PostgresStore
from gateway.store_sqlite import SqliteStore
from loraserve.v1 import types_pb2

ROUNDS = 10

Arm = Callable[[], Awaitable[object]]


async def measure(store: RequestStore, calls: int, size: int) -> dict[str, list[float]]:
    record, _ = await store.add(types_pb2.GenerateInput(model_name="org/model", prompt="p"), seed=1, model_key="k")
    run = await store.claim(record.id)
    assert run is not None
    jpeg = os.urandom(size)
    steps = iter(range(10**9))

    async def progress() -> None:
        await store.set_progress(run.id, run.lease_token, next(steps) % 1000, 1000)

    async def with_preview() -> None:
        await store.set_progress(run.id, run.lease_token, next(steps) % 1000, 1000, jpeg)

    async def read_none() -> None:
        # A stream that has sent the latest preview: the query finds nothing newer.
        assert await store.preview(run.id, after_version=2**31 - 1) is None

    async def read_new() -> None:
        assert await store.preview(run.id) is not None

    arms: dict[str, Arm] = {
        "set_progress": progress,
        f"set_progress + {size} B preview": with_preview,
        "preview(): nothing newer": read_none,
        "preview(): a newer one": read_new,
    }
    seconds: dict[str, list[float]] = {name: [] for name in arms}
    per_round = max(1, calls // ROUNDS)
    for _ in range(ROUNDS):
        for name, arm in arms.items():
            for _ in range(per_round):
                started = time.perf_counter()
                await arm()
                seconds[name].append(time.perf_counter() - started)
    return seconds


def report(engine: str, seconds: dict[str, list[float]]) -> None:
    print(f"{engine}: {len(next(iter(seconds.values())))} calls per arm in {ROUNDS} interleaved rounds")
    for name, values in seconds.items():
        print(f"  {name:34} p50 {median(values) * 1000:7.3f} ms   p90 {percentile(values, 90) * 1000:7.3f} ms")


async def run(calls: int, size: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        sqlite = SqliteStore(Path(tmp) / "data" / "requests.sqlite3")
        try:
            report("SQLite", await measure(sqlite, calls, size))
        finally:
            await sqlite.close()
    from tests.postgres_server import PostgresServer, find_bin_dir

    bin_dir = find_bin_dir()
    if bin_dir is None:
        print("PostgreSQL skipped: no server installed (Debian's `postgresql` package)")
        return
    with PostgresServer(bin_dir) as server:
        postgres = await PostgresStore.open(server.fresh_database())
        try:
            report("PostgreSQL (loopback)", await measure(postgres, calls, size))
        finally:
            await postgres.close()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.preview_writes", description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=300, help="calls per arm (default 300)")
    parser.add_argument("--bytes", type=int, default=3072, help="the preview's size (default 3072)")
    args = parser.parse_args()
    asyncio.run(run(args.calls, args.bytes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
