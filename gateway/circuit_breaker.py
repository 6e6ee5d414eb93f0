"""Pauses dispatching while the workers cannot be reached, so an outage fails nothing.

Without it, every waiting request would be sent into a dead Serve ingress in turn and
come straight back. After `threshold` worker calls in a row that never reached a worker
the breaker opens: the dispatcher stops taking requests off the queue (they keep their
places) and `recover` probes the workers with backoff until they answer. Each opening
that follows another without a call reaching a worker in between waits longer, so a
Serve ingress that accepts connections but has no application yet is not hammered.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from core.backoff import Backoff

log = logging.getLogger(__name__)


class CircuitBreaker:
    def __init__(self, *, threshold: int, backoff: Backoff) -> None:
        if threshold < 1:
            raise ValueError("the circuit breaker threshold must be at least 1")
        self._threshold = threshold
        self._backoff = backoff
        self._unreached_in_a_row = 0
        self._openings = 0
        self._open = False

    @property
    def is_open(self) -> bool:
        return self._open

    def record_reached(self) -> None:
        """A call reached a worker: the workers are up, whatever became of the call."""
        self._unreached_in_a_row = 0
        self._openings = 0

    def record_unreached(self) -> bool:
        """A call never reached a worker; True when this one opened the breaker."""
        self._unreached_in_a_row += 1
        if self._open or self._unreached_in_a_row < self._threshold:
            return False
        self._open = True
        self._openings += 1
        return True

    async def recover(self, probe: Callable[[float], Awaitable[bool]]) -> None:
        """Probes until the workers answer, then closes (half-open: the next calls tell).

        `probe(timeout_seconds)` is True once the workers can be reached; it is given
        longer each time, as the waits between probes grow.
        """
        tries = 0
        while True:
            tries += 1
            failures = self._openings + tries - 1
            await asyncio.sleep(self._backoff.delay(failures))
            if await probe(self._backoff.ceiling(failures)):
                break
            log.info("workers still unreachable", extra={"probes": tries})
        self._open = False
        self._unreached_in_a_row = 0
