"""Retention: finished requests, their logs and their output files expire (like fal's media expiry).

A request that finished more than `retention_seconds` ago loses its output files (the whole
`tenants/<tenant digest>/outputs/<id>/` folder, so files of earlier attempts and of a run cancelled while it stored its
images go too), then its result, input, logs and client_request_id; what stays is a small
tombstone (state, times, error), so GetResult answers NOT_FOUND with reason RESULT_EXPIRED
instead of handing out URLs to deleted files, and GetStatus still tells how the request ended.
Uploads (the files callers stored to name as inputs) are deleted `retention_seconds` after they
were stored, whatever used them.

Files are deleted before the request is marked: if the object store fails, the request stays
as it was and the next round tries again, so no file outlives its request unnoticed. Every
gateway sweeps (on PostgreSQL two may pick the same request; deleting twice is harmless). Each
round also drops the live previews of requests that ended a minute ago (gateway/previews.py); with
`retention_seconds` 0 or less (keep requests forever) the rounds still run, for that alone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from gateway.periodic import Periodic
from gateway.previews import KEEP_AFTER_END_SECONDS
from gateway.store import RequestStore
from storage.object_store import ObjectStore
from storage.object_store import output_prefix as files_folder

log = logging.getLogger(__name__)

# A round looks this often, at most (never less than once a second, or than a tenth of the retention).
MAX_PERIOD_SECONDS = 60.0
# Requests per store query; a round takes at most BATCH × MAX_BATCHES_PER_ROUND, then lets the next round go on.
BATCH = 100
MAX_BATCHES_PER_ROUND = 50


def output_prefix(request_id: str, tenant: str = "") -> str:
    """Where a worker stores a request's outputs (serving/app.py: `tenants/<tenant digest>/outputs/<id>/<name>`)."""
    return files_folder(tenant, request_id)


class RetentionSweeper(Periodic):
    name = "retention sweep"

    def __init__(
        self,
        store: RequestStore,
        files: ObjectStore,
        retention_seconds: float,
        *,
        on_error: Callable[[BaseException], None],
        period_seconds: float | None = None,
        clock: Callable[[], float] = time.time,
        on_uploads_deleted: Callable[[], None] = lambda: None,
    ) -> None:
        period = MAX_PERIOD_SECONDS if retention_seconds <= 0 else min(MAX_PERIOD_SECONDS, max(1.0, retention_seconds / 10))
        super().__init__(period_seconds or period, on_error)
        self._store = store
        self._files = files
        self.retention_seconds = retention_seconds
        self._clock = clock
        self._on_uploads_deleted = on_uploads_deleted

    async def run_once(self, now: float | None = None) -> list[str]:
        """Expires what finished more than retention_seconds before `now` (the clock's now); returns the ids."""
        now = self._clock() if now is None else now
        await self._store.drop_previews(now - KEEP_AFTER_END_SECONDS)
        if self.retention_seconds <= 0:
            return []
        before = now - self.retention_seconds
        expired: list[str] = []
        for _ in range(MAX_BATCHES_PER_ROUND):
            records = await self._store.expirable(before, BATCH)
            for record in records:
                await asyncio.to_thread(self._files.delete_prefix, output_prefix(record.id, record.tenant))
            expired += await self._store.expire([record.id for record in records])
            if len(records) < BATCH:
                break
        uploads = await asyncio.to_thread(self._files.delete_uploads_before, before)
        if uploads:
            self._on_uploads_deleted()
            log.info("deleted expired uploads", extra={"count": uploads, "retention_seconds": self.retention_seconds})
        if expired:
            log.info(
                "expired finished requests", extra={"count": len(expired), "retention_seconds": self.retention_seconds}
            )
        return expired
