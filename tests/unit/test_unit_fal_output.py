"""fal's HTTP answers: GenerateOutput / RequestStatus as fal's JSON (gateway.fal_output), and errors as
gateway.errors.to_http answers them (422 `detail` naming the same fields as the gRPC BadRequest)."""

from __future__ import annotations

import json

import pytest

from gateway.errors import InvalidArgument, RequestFailed, ResourceExhausted, field_loc, to_http
from gateway.fal_output import output_json, status_json
from loraserve.errors import ErrorType
from loraserve.request.violations import FieldViolation, InvalidInput
from loraserve.v1 import generation_pb2, types_pb2


def test_field_paths_become_fal_locs() -> None:
    assert field_loc("input.loras[0].path") == ["body", "loras", 0, "path"]
    assert field_loc("input.ip_adapter[1].ip_adapter_image_url[2]") == ["body", "ip_adapter", 1, "ip_adapter_image_url", 2]
    assert field_loc("input.image_size.width") == ["body", "image_size", "width"]
    assert field_loc("priority") == ["header", "x-fal-queue-priority"]
    assert field_loc("webhook_url") == ["query", "fal_webhook"]


@pytest.mark.parametrize("refusal", [InvalidArgument, InvalidInput])
def test_invalid_argument_is_a_422_detail_list(refusal: type[InvalidArgument] | type[InvalidInput]) -> None:
    """The gateway's own refusals and the request model's are answered alike."""
    exc = refusal([FieldViolation("input.loras[0].path", "is required"), FieldViolation("input.x", "extra fields not permitted", "value_error.extra")])
    answer = to_http(exc)
    assert answer.status == 422
    assert answer.body == {
        "detail": [
            {"loc": ["body", "loras", 0, "path"], "msg": "is required", "type": "value_error"},
            {"loc": ["body", "x"], "msg": "extra fields not permitted", "type": "value_error.extra"},
        ]
    }


def test_failures_and_quotas_as_http() -> None:
    timeout = to_http(RequestFailed(ErrorType.START_TIMEOUT, "not started in time"))
    assert timeout.status == 504 and timeout.headers["X-Fal-Request-Timeout-Type"] == "user"
    assert timeout.body == {"detail": "not started in time", "error_type": "request_timeout"}
    bad_model = to_http(RequestFailed(ErrorType.MODEL_LOAD_FAILED, "not a model"))
    assert bad_model.status == 422 and bad_model.body["detail"][0]["msg"] == "not a model"
    assert bad_model.body["detail"][0]["loc"] == ["body"]
    bad_lora = to_http(RequestFailed(ErrorType.INVALID_INPUT, "not a LoRA", field="input.loras[1].path"))
    assert bad_lora.status == 422 and bad_lora.body["detail"][0]["loc"] == ["body", "loras", 1, "path"]
    quota = to_http(ResourceExhausted("slow down", limit="submits_per_second", subject="tenant:a", retry_after_seconds=0.2))
    assert quota.status == 429 and quota.headers["Retry-After"] == "1"
    # A failure after a request was accepted is never answered with a status fal's clients retry.
    for error_type in ErrorType:
        assert to_http(RequestFailed(error_type, "x")).status not in (408, 409, 429, 502, 503)
    crash = to_http(RuntimeError("secret detail"))
    assert crash.status == 500 and "secret" not in json.dumps(crash.body)


def test_output_is_fal_json_with_integers_as_numbers() -> None:
    output = types_pb2.GenerateOutput(
        seed=2**40,
        images=[types_pb2.Image(url="https://h/f.png", content_type="image/png", file_name="f.png", file_size=4404019, width=64, height=64)],
        has_nsfw_concepts=[False],
    )
    body = output_json(output)
    assert body == {
        "images": [
            {"url": "https://h/f.png", "content_type": "image/png", "file_name": "f.png", "file_size": 4404019, "width": 64, "height": 64}
        ],
        "seed": 2**40,
        "has_nsfw_concepts": [False],
    }
    assert '"seed": 1099511627776' in json.dumps(body)
    output.debug_latents.CopyFrom(types_pb2.File(url="https://h/l.tar", file_size=10))
    assert output_json(output)["debug_latents"] == {"url": "https://h/l.tar", "content_type": "", "file_name": "", "file_size": 10}


URLS = {"response_url": "R", "status_url": "R/status", "cancel_url": "R/cancel"}


def test_status_bodies_never_say_anything_but_the_three_states() -> None:
    queued = generation_pb2.RequestStatus(request_id="r", state=generation_pb2.REQUEST_STATE_IN_QUEUE, queue_position=0)
    assert status_json(queued, URLS, None) == {"request_id": "r", **URLS, "logs": None, "status": "IN_QUEUE", "queue_position": 0}
    log = types_pb2.LogEntry(message="m", level=types_pb2.LOG_LEVEL_INFO, source="worker", timestamp=0.0)
    running = generation_pb2.RequestStatus(request_id="r", state=generation_pb2.REQUEST_STATE_IN_PROGRESS)
    body = status_json(running, URLS, [log])
    assert body["status"] == "IN_PROGRESS" and body["metrics"] == {}
    assert body["logs"] == [{"message": "m", "level": "INFO", "source": "worker", "timestamp": "1970-01-01T00:00:00+00:00"}]
    cancelled = generation_pb2.RequestStatus(request_id="r", state=generation_pb2.REQUEST_STATE_CANCELLED)
    body = status_json(cancelled, URLS, None)
    assert (body["status"], body["error"], body["error_type"]) == ("COMPLETED", "Request cancelled", "client_cancelled")
    failed = generation_pb2.RequestStatus(
        request_id="r",
        state=generation_pb2.REQUEST_STATE_COMPLETED,
        error=types_pb2.RequestError(type=ErrorType.ADAPTER_LOAD_FAILED, message="not a LoRA"),
        metrics=generation_pb2.RequestMetrics(inference_seconds=1.5),
    )
    body = status_json(failed, URLS, [])
    assert (body["status"], body["error"], body["error_type"]) == ("COMPLETED", "not a LoRA", "bad_request")
    assert body["logs"] == [] and body["metrics"] == {"inference_time": 1.5}
