"""How much the benchmark measures: the full run (~5 min on 2 cores) and `--quick` (~2.5 min)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

PROMPT = "a photo of a red house"
SEED = 7
GUIDANCE_SCALE = 7.5
PHASES = ("P1", "P2", "P3", "P4")
# The tiny model families (serving/tiny.py's Family, not imported: this module stays free of torch).
P2Family = Literal["sd15", "sdxl"]


@dataclass(frozen=True)
class Plan:
    quick: bool
    # P1: one job of about 1 s on one CPU core (tiny SDXL: the VAE halves, so 64 px is a 32×32 latent).
    p1_size: int = 64
    p1_steps: int = 16
    # 60 calls per arm: the p95 of 40 was the second-slowest call and moved by ±2% between runs.
    p1_rounds: int = 20
    p1_block: int = 3
    # Arms run in blocks of `block` calls, `rounds` times over: small blocks cancel drift on a shared machine.
    # P2 / P3: shorter jobs, so the run stays short.
    small_size: int = 64
    small_steps: int = 4
    num_loras: int = 50
    # P2's guard: rounds of one call per arm (bench/run.py paired_rounds); its references in blocks.
    p2_rounds: int = 40
    p2_reference_rounds: int = 3
    p2_block: int = 2
    # P2's model family: the issue's guard is on tiny SD 1.5 (`--p2-family sdxl` for the SDXL-structured one).
    p2_family: P2Family = "sd15"
    p3_rounds: int = 8
    p3_block: int = 4
    # Calls per arm before measuring (model loads, first-call allocations).
    warmup: int = 2
    # P4: requests waiting behind one long job, timed calls per queue depth, in rounds that
    # alternate the depths (the queue is filled and cancelled back down between them).
    p4_small_waiting: int = 10
    p4_large_waiting: int = 10_000
    # The deepest queue: the copies beyond p4_large_waiting are written into the store directly (bench/bulk_queue.py).
    p4_huge_waiting: int = 100_000
    p4_samples: int = 4000
    p4_rounds: int = 4
    p4_concurrency: int = 64
    # The job that keeps the single replica busy during P4 (cancelled at the end).
    p4_hold_size: int = 512
    p4_hold_steps: int = 150

    @classmethod
    def full(cls) -> Plan:
        return cls(quick=False)

    @classmethod
    def quick_run(cls) -> Plan:
        return cls(
            quick=True,
            p1_rounds=4,
            p1_block=3,
            p2_rounds=12,
            p2_reference_rounds=2,
            p2_block=1,
            p3_rounds=3,
            p3_block=2,
            warmup=1,
            p4_large_waiting=1_000,
            p4_huge_waiting=10_000,
            p4_samples=500,
            p4_rounds=2,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
