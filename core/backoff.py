"""Exponential backoff with jitter, for everything the service retries (worker calls, probes of
unreachable workers, the dispatcher's restarts, object-store writes).

Jitter spreads retries out: after an outage, requests that broke together would otherwise
come back together and break the recovering workers again. Half of each delay is fixed
and half random ("equal jitter"), so a retry never comes back at once.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    initial_seconds: float
    max_seconds: float
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.initial_seconds < 0:
            raise ValueError(f"backoff initial_seconds must not be negative, got {self.initial_seconds}")
        if self.max_seconds < self.initial_seconds:
            raise ValueError(
                f"backoff max_seconds must be at least initial_seconds ({self.initial_seconds}), got {self.max_seconds}"
            )
        if self.multiplier < 1:
            raise ValueError(f"backoff multiplier must be at least 1, got {self.multiplier}")

    def ceiling(self, failures: int) -> float:
        """The longest wait after `failures` failures in a row (the first failure waits `initial_seconds`)."""
        try:
            return min(self.max_seconds, self.initial_seconds * self.multiplier ** max(0, failures - 1))
        except OverflowError:  # `failures` grows without bound during a long outage
            return self.max_seconds

    def delay(self, failures: int, rand: Callable[[], float] = random.random) -> float:
        """Uniform in [ceiling / 2, ceiling]; `rand` draws from [0, 1)."""
        ceiling = self.ceiling(failures)
        return ceiling / 2 + rand() * ceiling / 2
