"""The waiting requests' start order, kept in a gateway's memory for a shared (PostgreSQL) store.

A queue position is the number of requests waiting ahead in (priority, fair_tag, seq) order.
Counting them in the database costs a scan of everything ahead, on every GetStatus and every
Submit. Instead each gateway keeps the order of the waiting requests sorted, applies every
change of the queue once (its own writes when they commit, other gateways' from their
notifications), and answers every caller's position with a binary search.

Changes may arrive late or twice (a gateway's own write and its notification; a notification
overtaking the write's local apply): each carries the request's `moves` (its state changes so
far, counted by the database), and a change no newer than what is known of that request is
dropped.
"""

from __future__ import annotations

import bisect
import time
from collections import OrderedDict
from dataclasses import dataclass

Order = tuple[int, float, int]

# How long a request that left the queue is remembered, to drop a late notification of its joining.
FORGET_AFTER_SECONDS = 300.0


@dataclass(frozen=True)
class QueueChange:
    request_id: str
    moves: int
    waiting: bool
    order: Order


class QueueIndex:
    def __init__(self) -> None:
        self._orders: list[Order] = []
        # What is known of each request: its last applied moves and its order if waiting.
        self._known: dict[str, tuple[int, Order | None]] = {}
        # Requests that left the queue, oldest first, with when: forgotten after FORGET_AFTER_SECONDS.
        self._left: OrderedDict[str, float] = OrderedDict()
        # Changes applied while a reload reads the table, re-applied onto what it read.
        self._during_reload: list[QueueChange] | None = None

    def __len__(self) -> int:
        return len(self._orders)

    def position(self, order: Order) -> int:
        return bisect.bisect_left(self._orders, order)

    def apply(self, change: QueueChange) -> None:
        if self._during_reload is not None:
            self._during_reload.append(change)
        known = self._known.get(change.request_id)
        if known is not None and known[0] >= change.moves:
            return
        if known is not None and known[1] is not None:
            at = bisect.bisect_left(self._orders, known[1])
            if at < len(self._orders) and self._orders[at] == known[1]:
                del self._orders[at]
        if change.waiting:
            bisect.insort(self._orders, change.order)
            self._known[change.request_id] = (change.moves, change.order)
            self._left.pop(change.request_id, None)
        else:
            self._known[change.request_id] = (change.moves, None)
            self._left[change.request_id] = time.monotonic()
            self._left.move_to_end(change.request_id)
        self._forget_old()

    def begin_reload(self) -> None:
        """Before reading the table: changes applied from now on are applied again onto what it read."""
        self._during_reload = []

    def finish_reload(self, waiting: list[QueueChange]) -> None:
        """`waiting`: every waiting request as the table held them after `begin_reload`."""
        during = self._during_reload or []
        self._during_reload = None
        self._orders = sorted(change.order for change in waiting)
        self._known = {change.request_id: (change.moves, change.order) for change in waiting}
        self._left.clear()
        for change in during:
            self.apply(change)

    def abandon_reload(self) -> None:
        """The table could not be read: the index stays as it was (and is not trusted until a reload succeeds)."""
        self._during_reload = None

    def _forget_old(self) -> None:
        horizon = time.monotonic() - FORGET_AFTER_SECONDS
        while self._left:
            request_id, left_at = next(iter(self._left.items()))
            if left_at > horizon:
                break
            del self._left[request_id]
            known = self._known.get(request_id)
            if known is not None and known[1] is None:
                del self._known[request_id]
