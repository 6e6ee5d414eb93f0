"""fal's JSON for what the gateway answers: a GenerateOutput as the hosted endpoint returns it, a
RequestStatus as fal's status body, for the HTTP facade and webhooks.

Proto JSON (json_format) is not fal's JSON: it prints int64 (`seed`, `file_size`) as strings and
camelCases names unless told not to, so the walk over the message descriptors is done here. A
request body's JSON is read by the request model (loraserve/request/fal_json.py).
"""

from __future__ import annotations

import base64
import datetime
import math
from collections.abc import Mapping
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from gateway.errors import CANCELLED_MESSAGE, request_error_http
from loraserve.errors import ErrorType
from loraserve.v1 import generation_pb2, types_pb2

_FLOATS = (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE)
_LEVELS = {v.number: v.name.removeprefix("LOG_LEVEL_") for v in types_pb2.LogLevel.DESCRIPTOR.values}


def output_json(output: types_pb2.GenerateOutput) -> dict[str, Any]:
    """GenerateOutput as the hosted endpoint returns it: snake_case, integers as JSON numbers,
    `images`, `seed` and `has_nsfw_concepts` always, debug files when there are any."""
    return _message_json(output)


def _message_json(msg: Message) -> dict[str, Any]:
    """Scalars without presence always (but empty bytes), optional scalars and messages when set,
    lists always; int64 stays a number, bytes become base64, enums their names."""
    result: dict[str, Any] = {}
    for field in msg.DESCRIPTOR.fields:
        value = getattr(msg, field.name)
        if field.is_repeated:
            result[field.name] = [_value_json(field, item) for item in value]
        elif field.type == FieldDescriptor.TYPE_MESSAGE or field.has_presence:
            if msg.HasField(field.name):
                result[field.name] = _value_json(field, value)
        elif field.type == FieldDescriptor.TYPE_BYTES and not value:
            continue
        else:
            result[field.name] = _value_json(field, value)
    return result


def _value_json(field: FieldDescriptor, value: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return _message_json(value)
    if field.type == FieldDescriptor.TYPE_BYTES:
        return base64.b64encode(value).decode("ascii")
    if field.type == FieldDescriptor.TYPE_ENUM:
        return field.enum_type.values_by_number[value].name
    if field.type in _FLOATS and not math.isfinite(value):
        return None
    return value


# --- status ------------------------------------------------------------------------------------


def log_json(entry: types_pb2.LogEntry) -> dict[str, Any]:
    """A log line as fal's status carries it: {message, level, source, timestamp (ISO-8601, UTC)}."""
    when = datetime.datetime.fromtimestamp(entry.timestamp, datetime.UTC)
    return {
        "message": entry.message,
        "level": _LEVELS.get(entry.level, "INFO") if entry.level else "INFO",
        "source": entry.source,
        "timestamp": when.isoformat(),
    }


def status_json(
    status: generation_pb2.RequestStatus, urls: Mapping[str, str], logs: list[types_pb2.LogEntry] | None
) -> dict[str, Any]:
    """A RequestStatus as fal's status body: IN_QUEUE, IN_PROGRESS or COMPLETED, never anything else
    (fal's clients fail on any other value): a failed or cancelled request is COMPLETED with
    `error` and `error_type`. `logs` is null when the caller did not ask for logs."""
    body: dict[str, Any] = {"request_id": status.request_id, **urls}
    body["logs"] = None if logs is None else [log_json(entry) for entry in logs]
    if status.state == generation_pb2.REQUEST_STATE_IN_QUEUE:
        body["status"] = "IN_QUEUE"
        body["queue_position"] = status.queue_position
        return body
    if status.state == generation_pb2.REQUEST_STATE_IN_PROGRESS:
        body["status"] = "IN_PROGRESS"
        body["metrics"] = {}
        return body
    body["status"] = "COMPLETED"
    body["metrics"] = {"inference_time": status.metrics.inference_seconds}
    if status.state == generation_pb2.REQUEST_STATE_CANCELLED or status.error.type == ErrorType.CANCELLED:
        body["error"] = CANCELLED_MESSAGE
        body["error_type"] = request_error_http(ErrorType.CANCELLED)[1]
    elif status.HasField("error"):
        body["error"] = status.error.message
        body["error_type"] = request_error_http(status.error.type)[1]
    return body
