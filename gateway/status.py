"""Builds the RequestStatus a caller sees from what the RequestStore holds."""

from __future__ import annotations

from gateway.store import RequestRecord, RequestStore, State
from loraserve.v1 import generation_pb2, types_pb2

_STATES = {
    State.IN_QUEUE: generation_pb2.REQUEST_STATE_IN_QUEUE,
    State.IN_PROGRESS: generation_pb2.REQUEST_STATE_IN_PROGRESS,
    State.COMPLETED: generation_pb2.REQUEST_STATE_COMPLETED,
    State.CANCELLED: generation_pb2.REQUEST_STATE_CANCELLED,
}


async def build_status(
    store: RequestStore, record: RequestRecord, logs: list[types_pb2.LogEntry] | None = None
) -> generation_pb2.RequestStatus:
    status = generation_pb2.RequestStatus(request_id=record.id, state=_STATES[record.state], logs=logs or [])
    if record.state == State.IN_QUEUE:
        status.queue_position = await store.queue_position(record)
    if record.state == State.IN_PROGRESS and record.total_steps:
        status.progress.CopyFrom(types_pb2.StepProgress(step=record.step, total=record.total_steps))
    if record.finished:
        status.metrics.CopyFrom(_metrics(record))
        if record.error is not None:
            status.error.CopyFrom(record.error)
    return status


def _metrics(record: RequestRecord) -> generation_pb2.RequestMetrics:
    end = record.finished_at or record.created_at
    started = record.started_at or end
    return generation_pb2.RequestMetrics(
        queue_wait_seconds=started - record.created_at,
        inference_seconds=record.inference_seconds or 0.0,
        total_seconds=end - record.created_at,
    )
