"""Everything on one machine: local Ray + Serve workers, then the gateway in this process."""

from __future__ import annotations

import asyncio
from types import TracebackType

from loraserve.config import Settings


class EmbeddedService:
    def __init__(self, settings: Settings) -> None:
        from gateway.server import Gateway

        self.settings = settings
        self.gateway = Gateway(settings)

    async def __aenter__(self) -> EmbeddedService:
        from serving.runtime import start_workers

        await asyncio.to_thread(start_workers, self.settings)
        await self.gateway.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        from serving.runtime import stop_workers

        await self.gateway.stop()
        await asyncio.to_thread(stop_workers)
