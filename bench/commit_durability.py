"""`python -m bench.commit_durability`: what making an acknowledged Submit survive power loss costs.

The same INSERT on the store's own schema, three ways, interleaved in one run: the store's
`add` (commit with `synchronous=NORMAL`, then a group fsync of the log on a worker thread:
gateway/wal_sync.py), committed with `synchronous=FULL` (the fsync inside the commit, which
holds the gateway's event loop), and committed NORMAL with no fsync (not durable). Then 16
Submits at a time: concurrent `add`s share fsyncs, FULL commits cannot.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

from gateway.store_sqlite import SqliteStore
from loraserve.v1 import types_pb2

ROUNDS = 20
PER_ROUND = 40
CONCURRENT = 16
BURST = 400


async def measure() -> tuple[dict[str, list[float]], dict[str, float]]:
    with tempfile.TemporaryDirectory() as tmp:
        store = SqliteStore(Path(tmp) / "requests.sqlite3")
        inp = types_pb2.GenerateInput(model_name="org/model", prompt="a red house")
        raw = inp.SerializeToString()
        counter = iter(range(10**9))

        def insert(synchronous: str) -> None:
            store._db.execute(f"PRAGMA synchronous={synchronous}")
            with store._tx() as db:
                db.execute(
                    "INSERT INTO requests (id, state, input, seed, model_key, created_at)"
                    " VALUES (?, 'IN_QUEUE', ?, 1, 'k', ?)",
                    (f"raw-{next(counter)}", raw, time.time()),
                )
            store._db.execute("PRAGMA synchronous=NORMAL")

        async def add() -> None:
            await store.add(inp, seed=1, model_key="k")

        async def full() -> None:
            insert("FULL")

        async def normal() -> None:
            insert("NORMAL")

        arms = {"add: NORMAL + group fsync": add, "INSERT, synchronous=FULL": full, "INSERT, NORMAL (not durable)": normal}
        latencies: dict[str, list[float]] = {name: [] for name in arms}
        try:
            for _ in range(ROUNDS):
                for name, arm in arms.items():
                    for _ in range(PER_ROUND):
                        started = time.perf_counter()
                        await arm()
                        latencies[name].append(time.perf_counter() - started)
            bursts: dict[str, float] = {}
            for name in ("add: NORMAL + group fsync", "INSERT, synchronous=FULL"):
                arm = arms[name]
                remaining = iter(range(BURST))

                async def caller() -> None:
                    for _ in remaining:
                        await arm()

                started = time.perf_counter()
                await asyncio.gather(*(caller() for _ in range(CONCURRENT)))
                bursts[name] = time.perf_counter() - started
        finally:
            await store.close()
    return latencies, bursts


def main() -> int:
    latencies, bursts = asyncio.run(measure())

    def ms(values: list[float], q: int) -> float:
        return statistics.quantiles(values, n=100)[q - 1] * 1000

    print(f"SQLite Submit commit on this disk, {ROUNDS * PER_ROUND} sequential calls per arm in {ROUNDS} interleaved rounds")
    for name, values in latencies.items():
        print(f"  {name:30} p50 {ms(values, 50):7.3f} ms   p99 {ms(values, 99):7.3f} ms")
    full, group = bursts["INSERT, synchronous=FULL"], bursts["add: NORMAL + group fsync"]
    print(f"{BURST} Submits, {CONCURRENT} at a time: FULL {full:.2f} s, group fsync {group:.2f} s = {group / full:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
