"""Wakes status subscribers when any request changes.

One counter for the whole queue, not one per request: a request's queue position moves
whenever any request ahead of it leaves the queue, so every waiting subscriber has to
re-read anyway. Subscribers only read state; they never own work.
"""

from __future__ import annotations

import asyncio


class ChangeFeed:
    def __init__(self) -> None:
        self._version = 0
        self._changed = asyncio.Condition()
        self._closed = False

    @property
    def version(self) -> int:
        return self._version

    @property
    def closed(self) -> bool:
        return self._closed

    def notify(self) -> None:
        self._version += 1
        asyncio.get_running_loop().create_task(self._wake())

    def close(self) -> None:
        self._closed = True
        self.notify()

    async def _wake(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def wait_past(self, version: int) -> int:
        """Returns once the version is past `version` (at once if it already is)."""
        async with self._changed:
            await self._changed.wait_for(lambda: self._version > version)
        return self._version
