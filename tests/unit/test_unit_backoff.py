"""core.backoff and gateway.circuit_breaker: waits that grow, are capped and jittered; a breaker
that opens after calls in a row found no worker, probes with growing patience and closes."""

from __future__ import annotations

import random

import pytest

from gateway.circuit_breaker import CircuitBreaker
from core.backoff import Backoff


def test_backoff_doubles_up_to_its_cap() -> None:
    backoff = Backoff(1.0, 60.0)
    assert [backoff.ceiling(n) for n in range(1, 9)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert backoff.ceiling(0) == 1.0
    assert backoff.ceiling(100_000) == 60.0, "a long outage's failure count does not overflow"


def test_backoff_is_jittered_within_the_upper_half() -> None:
    backoff = Backoff(1.0, 60.0)
    rng = random.Random(7)
    delays = [backoff.delay(4, rng.random) for _ in range(200)]
    assert all(4.0 <= d <= 8.0 for d in delays)
    assert len({round(d, 6) for d in delays}) > 150, "retries that broke together do not come back together"


@pytest.mark.parametrize(
    ("initial", "cap", "multiplier", "why"),
    [
        (-1.0, 1.0, 2.0, r"initial_seconds must not be negative, got -1\.0"),
        (2.0, 1.0, 2.0, r"max_seconds must be at least initial_seconds \(2\.0\), got 1\.0"),
        (1.0, 2.0, 0.5, r"multiplier must be at least 1, got 0\.5"),
    ],
)
def test_backoff_refuses_nonsense(initial: float, cap: float, multiplier: float, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        Backoff(initial, cap, multiplier)


def test_breaker_opens_after_the_threshold_in_a_row() -> None:
    breaker = CircuitBreaker(threshold=3, backoff=Backoff(0.001, 0.01))
    assert not breaker.record_unreached() and not breaker.record_unreached()
    breaker.record_reached()
    assert not breaker.record_unreached() and not breaker.record_unreached()
    assert not breaker.is_open, "a call that reached a worker started the count again"
    assert breaker.record_unreached() and breaker.is_open
    assert not breaker.record_unreached(), "only the call that opened it says so"


async def test_breaker_probes_with_growing_patience_until_the_workers_answer() -> None:
    backoff = Backoff(0.001, 0.016)
    breaker = CircuitBreaker(threshold=1, backoff=backoff)
    probes: list[float] = []

    async def probe(timeout_seconds: float) -> bool:
        probes.append(timeout_seconds)
        return len(probes) == 3

    assert breaker.record_unreached()
    await breaker.recover(probe)
    assert not breaker.is_open
    assert probes == [0.001, 0.002, 0.004]

    # Open again with no call reaching a worker in between: it starts out more patient.
    probes.clear()
    assert breaker.record_unreached()
    await breaker.recover(probe)
    assert probes[0] == 0.002

    breaker.record_reached()
    probes.clear()
    assert breaker.record_unreached()
    await breaker.recover(probe)
    assert probes[0] == 0.001, "a call that reached a worker reset the patience"


def test_breaker_needs_a_threshold() -> None:
    with pytest.raises(ValueError, match="threshold must be at least 1"):
        CircuitBreaker(threshold=0, backoff=Backoff(1, 1))
