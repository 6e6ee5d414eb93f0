"""Wakes status streams: a request's own change wakes only its streams; the queue moving wakes the
streams of waiting requests, whose positions it changes.

A gateway with 1,000 open streams must not wake (and make re-read the store) all of them for
each progress step of one request: a step, a log line or a result is `changed(id)`. What moves
queue positions — a request submitted, started, put back, cancelled or failed while waiting —
is also `queue_moved()`, which wakes only streams whose request is waiting. `everything()` is
for what the gateway cannot tell apart (a reconnected listener, leases taken back). Streams
only read state; they never own work.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

Cursor = tuple[int, int, int]


@dataclass
class _Watched:
    version: int = 0
    watchers: int = 0
    waiting: set[asyncio.Future[None]] = field(default_factory=set)


class Watch:
    """One stream's view of the feed for one request."""

    def __init__(self, feed: ChangeFeed, request_id: str) -> None:
        self._feed = feed
        self._request_id = request_id

    def cursor(self) -> Cursor:
        """Take it before reading the request: a change after that ends the next `wait` at once."""
        return self._feed._cursor(self._request_id)

    async def wait(self, since: Cursor, *, in_queue: bool) -> Cursor:
        """Returns once the request changed since `since` (or, `in_queue`, the queue moved, or the feed closed)."""
        return await self._feed._wait(self._request_id, since, in_queue)


class ChangeFeed:
    def __init__(self) -> None:
        self._requests: dict[str, _Watched] = {}
        self._queue_version = 0
        self._all_version = 0
        self._queue_waiting: set[asyncio.Future[None]] = set()
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def streams(self) -> int:
        """Streams watching a request now (for tests and metrics)."""
        return sum(watched.watchers for watched in self._requests.values())

    @contextmanager
    def watch(self, request_id: str) -> Iterator[Watch]:
        watched = self._requests.setdefault(request_id, _Watched())
        watched.watchers += 1
        try:
            yield Watch(self, request_id)
        finally:
            watched.watchers -= 1
            if not watched.watchers:
                del self._requests[request_id]

    def changed(self, request_id: str) -> None:
        watched = self._requests.get(request_id)
        if watched is not None:
            watched.version += 1
            _wake(watched.waiting)

    def queue_moved(self) -> None:
        self._queue_version += 1
        _wake(self._queue_waiting)

    def everything(self) -> None:
        self._all_version += 1
        _wake(self._queue_waiting)
        for watched in self._requests.values():
            _wake(watched.waiting)

    def close(self) -> None:
        self._closed = True
        self.everything()

    def _cursor(self, request_id: str) -> Cursor:
        return (self._requests[request_id].version, self._queue_version, self._all_version)

    async def _wait(self, request_id: str, since: Cursor, in_queue: bool) -> Cursor:
        watched = self._requests[request_id]
        now = self._cursor(request_id)
        moved = now[0] != since[0] or now[2] != since[2] or (in_queue and now[1] != since[1])
        if moved or self._closed:
            return now
        woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        watched.waiting.add(woken)
        if in_queue:
            self._queue_waiting.add(woken)
        try:
            await woken
        finally:
            watched.waiting.discard(woken)
            self._queue_waiting.discard(woken)
        return self._cursor(request_id)


def _wake(futures: set[asyncio.Future[None]]) -> None:
    for future in list(futures):
        if not future.done():
            future.set_result(None)
    futures.clear()
