"""Everything on one machine: local Ray + Serve workers, then the gateway in this process."""

from __future__ import annotations

import asyncio
import logging
from types import TracebackType

from core.config import Settings

log = logging.getLogger(__name__)


class EmbeddedService:
    def __init__(self, settings: Settings) -> None:
        from gateway.server import Gateway
        from core.worker_auth import with_generated_secret

        # Both sides of the workers' ingress are started here, so they can share a secret made for this run.
        settings = with_generated_secret(settings)
        self.settings = settings
        self.gateway = Gateway(settings)

    async def start(self) -> None:
        """Workers first, so the gateway's first dispatch finds them; a failed start leaves nothing running."""
        from serving.runtime import start_workers, stop_workers

        try:
            await asyncio.to_thread(start_workers, self.settings)
        except BaseException:
            await asyncio.to_thread(stop_workers)
            raise
        try:
            await self.gateway.start()
        except BaseException:
            await asyncio.to_thread(stop_workers)
            raise

    async def stop(self, grace_seconds: float | None = None) -> None:
        """The gateway drains first (running requests finish on the workers, or go back to the queue),
        then Serve and Ray go down."""
        from serving.runtime import stop_workers

        try:
            await self.gateway.stop(grace_seconds)
        finally:
            await asyncio.to_thread(stop_workers)
            log.info("workers stopped")

    async def __aenter__(self) -> EmbeddedService:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
