"""A round of upkeep run every few seconds in the gateway's event loop, that no error ends.

Lease renewal and take-back, start timeouts and retention are rounds like this: a round that
fails (the store unreachable for a moment) is logged and counted, and the next one runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)


class Periodic:
    """Subclasses define `run_once`; `name` labels the task and the log line of a failed round."""

    name = "upkeep"

    def __init__(self, period_seconds: float, on_error: Callable[[BaseException], None]) -> None:
        self._period = period_seconds
        self._on_error = on_error
        self._task: asyncio.Task[None] | None = None
        self._woken = asyncio.Event()

    async def run_once(self) -> object:
        raise NotImplementedError

    def wake(self) -> None:
        """The next round runs now rather than at the end of the period (e.g. when there is work for it)."""
        self._woken.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=self.name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            try:
                await self.run_once()
            except Exception as exc:  # noqa: BLE001 - the next round retries; upkeep must outlive errors
                log.warning(f"{self.name} failed; retrying", extra={"error": f"{type(exc).__name__}: {exc}"})
                self._on_error(exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._woken.wait(), self._period)
            self._woken.clear()
