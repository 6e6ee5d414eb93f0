"""The gateway's upkeep of the shared queue: its leases renewed, dead owners' requests taken back,
start timeouts enforced.

Every gateway runs one. Renewal keeps this gateway's running requests its own; taking back
is what makes a SIGKILLed gateway (or a lost node) lose nothing: once its leases run out,
any gateway puts those requests back in the queue, in their old places, or fails them with
WORKER_FAILED once they have used `max_attempts` (a request that kills whatever runs it
must not do so forever). A failing round is logged and counted, and the next one runs: the
keeper never dies with the store.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from gateway.periodic import Periodic
from gateway.store import RequestStore

log = logging.getLogger(__name__)

# Start timeouts and dead owners are looked for this often; leases are renewed every third of their length.
TICK_SECONDS = 1.0


class LeaseKeeper(Periodic):
    name = "lease upkeep"

    def __init__(
        self,
        store: RequestStore,
        *,
        renew: Callable[[], Awaitable[None]],
        max_attempts: int,
        on_change: Callable[[list[str]], None],
        on_error: Callable[[BaseException], None],
        tick_seconds: float = TICK_SECONDS,
    ) -> None:
        super().__init__(min(tick_seconds, store.lease_seconds / 3), on_error)
        self._store = store
        self._renew = renew
        self._max_attempts = max_attempts
        self._on_change = on_change
        self._last_renewal = 0.0

    async def run_once(self) -> None:
        now = time.monotonic()
        if now - self._last_renewal >= self._store.lease_seconds / 3:
            await self._renew()
            self._last_renewal = now
        taken = await self._store.take_back(self._max_attempts)
        if taken:
            log.warning(
                "took back requests whose gateway stopped renewing their leases",
                extra={"requeued": taken.requeued, "failed": taken.failed},
            )
        expired = await self._store.expire_start_deadlines()
        if expired:
            log.info("requests not started within their start_timeout", extra={"request_ids": expired})
        await self._store.waiting_count()
        changed = taken.requeued + taken.failed + expired
        if changed:
            self._on_change(changed)
