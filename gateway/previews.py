"""Live previews in status streams: the latest preview of each request, kept in the memory of the
gateway that runs it, and handed to the streams that asked for previews.

Workers make a preview for every request at a bounded rate (serving/previews.py), cheap enough
not to ask first: whether anyone watches is known only here, and a stream may start long after
the request did. Previews are not written to the request store: they are replaced every second
or so and worthless once the request ends, so a stream on another gateway than the one that runs
the request (several gateways on PostgreSQL) gets its step numbers but no previews. A stream
gets each preview once, in `progress.preview_jpeg`; one that has not had the last preview when
the request completes gets it with the COMPLETED status, so a stream that asked always ends with
a preview of the final latents.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass

from loraserve.v1 import generation_pb2

# Previews of requests that ended, kept for the streams that have yet to read their last status.
KEEP_FINISHED = 256


@dataclass(frozen=True)
class Preview:
    # Increases with every preview this gateway receives: a stream sends only what is newer than it sent.
    version: int
    step: int
    total: int
    jpeg: bytes


class LatestPreviews:
    def __init__(self, keep_finished: int = KEEP_FINISHED) -> None:
        self._running: dict[str, Preview] = {}
        self._finished: OrderedDict[str, Preview] = OrderedDict()
        self._keep_finished = keep_finished
        self._versions = itertools.count(1)

    def put(self, request_id: str, step: int, total: int, jpeg: bytes) -> None:
        self._finished.pop(request_id, None)
        self._running[request_id] = Preview(next(self._versions), step, total, jpeg)

    def latest(self, request_id: str) -> Preview | None:
        return self._running.get(request_id) or self._finished.get(request_id)

    def ended(self, request_id: str) -> None:
        """The request's call ended (or it went back to the queue): its last preview is kept a while."""
        preview = self._running.pop(request_id, None)
        if preview is None:
            return
        self._finished[request_id] = preview
        while len(self._finished) > self._keep_finished:
            self._finished.popitem(last=False)


class PreviewStream:
    """One status stream's previews: each sent once, and only while the request runs or once it completed."""

    def __init__(self, previews: LatestPreviews) -> None:
        self._previews = previews
        self._sent = 0

    def attach(self, status: generation_pb2.RequestStatus) -> None:
        """Puts the request's latest preview into `status` when this stream has not had it yet."""
        if status.state == generation_pb2.REQUEST_STATE_COMPLETED and status.HasField("error"):
            return
        if status.state not in (generation_pb2.REQUEST_STATE_IN_PROGRESS, generation_pb2.REQUEST_STATE_COMPLETED):
            return
        preview = self._previews.latest(status.request_id)
        if preview is None or preview.version <= self._sent:
            return
        self._sent = preview.version
        if not status.HasField("progress"):
            status.progress.step, status.progress.total = preview.step, preview.total
        status.progress.preview_jpeg = preview.jpeg


def without_preview(status: generation_pb2.RequestStatus) -> None:
    """What a stream remembers of the status it sent, to tell whether the next one differs: not the preview."""
    if status.HasField("progress"):
        status.progress.ClearField("preview_jpeg")
