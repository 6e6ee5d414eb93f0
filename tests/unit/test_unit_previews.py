"""The gateway's live previews: kept per request, each sent once, only with running or completed statuses."""

from __future__ import annotations

from gateway.previews import LatestPreviews, PreviewStream, without_preview
from loraserve.v1 import generation_pb2, types_pb2

RUNNING = generation_pb2.REQUEST_STATE_IN_PROGRESS


def status(state: int = RUNNING, step: int = 3, request_id: str = "r1") -> generation_pb2.RequestStatus:
    out = generation_pb2.RequestStatus(request_id=request_id, state=state)  # type: ignore[arg-type]
    if state == RUNNING:
        out.progress.CopyFrom(types_pb2.StepProgress(step=step, total=10))
    return out


def test_each_preview_once_per_stream_and_every_stream_gets_it() -> None:
    previews = LatestPreviews()
    first, second = PreviewStream(previews), PreviewStream(previews)
    sent = status()
    first.attach(sent)
    assert sent.progress.preview_jpeg == b""
    previews.put("r1", 3, 10, b"jpeg-3")
    sent = status()
    first.attach(sent)
    assert sent.progress.preview_jpeg == b"jpeg-3" and sent.progress.step == 3
    again = status(step=4)
    first.attach(again)
    assert again.progress.preview_jpeg == b""
    other = status(step=4)
    second.attach(other)
    assert other.progress.preview_jpeg == b"jpeg-3"
    previews.put("r1", 5, 10, b"jpeg-5")
    newer = status(step=5)
    first.attach(newer)
    assert newer.progress.preview_jpeg == b"jpeg-5"
    assert previews.latest("r2") is None


def test_the_last_preview_comes_with_completed_when_missed_but_not_with_failures_or_the_queue() -> None:
    previews = LatestPreviews()
    previews.put("r1", 10, 10, b"final")
    previews.ended("r1")
    queued = status(generation_pb2.REQUEST_STATE_IN_QUEUE)
    PreviewStream(previews).attach(queued)
    assert not queued.HasField("progress")
    failed = status(generation_pb2.REQUEST_STATE_COMPLETED)
    failed.error.CopyFrom(types_pb2.RequestError(type="INTERNAL", message="x"))
    PreviewStream(previews).attach(failed)
    assert not failed.HasField("progress")
    done = status(generation_pb2.REQUEST_STATE_COMPLETED)
    PreviewStream(previews).attach(done)
    assert (done.progress.step, done.progress.total, done.progress.preview_jpeg) == (10, 10, b"final")


def test_finished_requests_keep_their_last_preview_only_a_while() -> None:
    previews = LatestPreviews(keep_finished=2)
    for request_id in ("a", "b", "c"):
        previews.put(request_id, 1, 1, request_id.encode())
        previews.ended(request_id)
    assert previews.latest("a") is None
    latest_b, latest_c = previews.latest("b"), previews.latest("c")
    assert latest_b is not None and latest_b.jpeg == b"b"
    assert latest_c is not None and latest_c.jpeg == b"c"
    # Run again (a retry): previews of the new run replace the kept one.
    previews.put("b", 1, 1, b"b-again")
    latest_b = previews.latest("b")
    assert latest_b is not None and latest_b.jpeg == b"b-again"


def test_what_a_stream_remembers_has_no_preview() -> None:
    sent = status()
    sent.progress.preview_jpeg = b"jpeg"
    without_preview(sent)
    assert sent == status()
