"""Live previews in status streams: the latest preview of each request, kept in the request store, and
handed to the streams that asked for previews, on whichever gateway they were opened.

Workers make a preview for every request at a bounded rate (serving/previews.py), cheap enough
not to ask first: whether anyone watches is known only to the gateways, and a stream may start
long after the request did. The gateway running the request writes each preview with the step it
came with (`RequestStore.set_progress`, one write, at most one a `preview_interval_seconds` plus
the last step), into a table of its own: one row per request, replaced each time, so status reads
of streams that did not ask never carry its bytes. The write's notification (PostgreSQL's NOTIFY
on several gateways) wakes every stream of the request, and a stream that asked reads the preview
only when its version is newer than the one it sent. So a stream gets each preview once, in
`progress.preview_jpeg`; one that has not had the last preview when the request completes gets it
with the COMPLETED status, so a stream that asked always ends with a preview of the final latents.
The last preview of a request that ended is kept KEEP_AFTER_END_SECONDS, for the streams that
have yet to read its final status, then dropped by the retention sweep (gateway/retention.py), so
the table holds the running requests' and a minute's worth of ended ones, not 2-10 KB per request
for the whole retention period.

A preview write costs the running gateway about 0.01 ms on SQLite and 0.1-0.35 ms on PostgreSQL
over the progress write it rides on (3-10 KB, `python -m bench.preview_writes`); a stream that
asked adds one small query per wake-up (0.3 ms on PostgreSQL), and the others read nothing more.
"""

from __future__ import annotations

from gateway.store import RequestStore
from loraserve.v1 import generation_pb2

# How long a request that ended keeps its last preview (dropped by the next retention sweep after).
KEEP_AFTER_END_SECONDS = 60.0


class PreviewStream:
    """One status stream's previews: each sent once, and only while the request runs or once it completed."""

    def __init__(self, store: RequestStore) -> None:
        self._store = store
        self._sent = 0

    async def attach(self, status: generation_pb2.RequestStatus) -> None:
        """Puts the request's latest preview into `status` when this stream has not had it yet."""
        if status.state == generation_pb2.REQUEST_STATE_COMPLETED and status.HasField("error"):
            return
        if status.state not in (generation_pb2.REQUEST_STATE_IN_PROGRESS, generation_pb2.REQUEST_STATE_COMPLETED):
            return
        preview = await self._store.preview(status.request_id, after_version=self._sent)
        if preview is None:
            return
        self._sent = preview.version
        if not status.HasField("progress"):
            status.progress.step, status.progress.total = preview.step, preview.total
        status.progress.preview_jpeg = preview.jpeg


def without_preview(status: generation_pb2.RequestStatus) -> None:
    """What a stream remembers of the status it sent, to tell whether the next one differs: not the preview."""
    if status.HasField("progress"):
        status.progress.ClearField("preview_jpeg")
