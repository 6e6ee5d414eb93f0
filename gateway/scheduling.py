"""Which waiting request goes to the workers next: FIFO, bent towards weights that are hot.

Switching a replica to another base model costs seconds, so when the oldest waiting
request needs a model no replica has used lately, a younger request whose model is hot
may go first — but a request is passed over at most `max_skips` times, so nobody waits
more than that many places past their FIFO turn. `max_skips=0` is plain FIFO.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from gateway.store import RequestRecord


class HotFirstOrder:
    def __init__(self, *, max_skips: int, hot_slots: int) -> None:
        self.max_skips = max_skips
        self._hot_slots = max(1, hot_slots)
        # Base-model keys sent to workers lately, least recent first: what replicas likely hold.
        self._hot: OrderedDict[str, None] = OrderedDict()
        self._skips: dict[str, int] = {}

    @property
    def lookahead(self) -> int:
        """How many waiting requests `choose` needs to see."""
        return self.max_skips + 1 if self.max_skips else 1

    def choose(self, waiting: Sequence[RequestRecord]) -> RequestRecord:
        """`waiting` is the head of the queue, oldest first (at least one request)."""
        oldest = waiting[0]
        if self._skips.get(oldest.id, 0) >= self.max_skips or oldest.model_key in self._hot:
            return oldest
        for index, record in enumerate(waiting[1 : self.lookahead], start=1):
            if record.model_key in self._hot:
                for passed in waiting[:index]:
                    self._skips[passed.id] = self._skips.get(passed.id, 0) + 1
                return record
        return oldest

    def dispatched(self, record: RequestRecord) -> None:
        self._skips.pop(record.id, None)
        self._hot[record.model_key] = None
        self._hot.move_to_end(record.model_key)
        while len(self._hot) > self._hot_slots:
            self._hot.popitem(last=False)

    def forget(self, request_id: str) -> None:
        """A request that left the queue without being dispatched (cancelled)."""
        self._skips.pop(request_id, None)
