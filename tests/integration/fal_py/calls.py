"""fal's Python client, unchanged, run the way a user runs it; one scenario per call.

`python calls.py SCENARIO 'JSON ARGS'` prints one JSON line that the tests read. The
environment (FAL_KEY, FAL_QUEUE_RUN_HOST, FAL_RUN_HOST, SSL_CERT_FILE) is set by the
test, as docs/fal.md tells users to set it; nothing here points the client anywhere.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
from collections.abc import Callable
from typing import Any

import fal_client
import fal_client.client
import httpx
from PIL import Image

APP = "fal-ai/lora"


def update(status: fal_client.Status) -> dict[str, Any]:
    """A status as plain JSON: its class, position and log messages (None when logs were off)."""
    logs = getattr(status, "logs", None)
    return {
        "kind": type(status).__name__,
        "position": getattr(status, "position", None),
        "logs": None if logs is None else [entry["message"] for entry in logs],
        "error": getattr(status, "error", None),
        "error_type": getattr(status, "error_type", None),
    }


def http_error(call: Callable[[], Any]) -> dict[str, Any]:
    """What FalClientHTTPError carried, or that nothing was raised."""
    try:
        call()
    except fal_client.FalClientHTTPError as error:
        return {
            "raised": True,
            "status_code": error.status_code,
            "message": error.message,
            "error_type": error.error_type,
            "request_id": error.response_headers.get("x-fal-request-id"),
        }
    return {"raised": False}


def opened(url: str) -> dict[str, Any]:
    """The file behind an output URL, fetched over the same TLS trust the client uses."""
    response = httpx.get(url)
    image = Image.open(io.BytesIO(response.content))
    return {
        "status": response.status_code,
        "content_type": response.headers.get("content-type"),
        "bytes": len(response.content),
        "size": list(image.size),
        "sha256": hashlib.sha256(response.content).hexdigest(),
    }


def subscribe(args: dict[str, Any]) -> dict[str, Any]:
    # A request ahead of ours keeps the one worker busy, so ours is seen waiting first.
    blocker = fal_client.submit(APP, arguments=args["blocker_arguments"])
    updates: list[fal_client.Status] = []
    enqueued: list[str] = []
    result = fal_client.subscribe(
        APP,
        arguments=args["arguments"],
        with_logs=True,
        on_enqueue=enqueued.append,
        on_queue_update=updates.append,
    )
    return {
        "blocker": update(blocker.status()),
        "enqueued": enqueued,
        "updates": [update(u) for u in updates],
        "result": result,
        "image": opened(result["images"][0]["url"]),
    }


def queue(args: dict[str, Any]) -> dict[str, Any]:
    # fal's own headers as this client writes them: X-Fal-Runner-Hint, X-Fal-Queue-Priority and
    # X-Fal-Request-Timeout as a float ("600.0").
    handle = fal_client.submit(
        APP,
        arguments=args["arguments"],
        webhook_url=args["webhook_url"],
        hint="lora:style",
        priority="normal",
        start_timeout=600,
    )
    first = handle.status(with_logs=True)
    result = handle.get()
    final = handle.status(with_logs=True)
    quiet = fal_client.status(APP, handle.request_id, with_logs=False)
    again = fal_client.result(APP, handle.request_id)
    late_cancel = http_error(handle.cancel)

    long = fal_client.submit(APP, arguments=args["long_arguments"], webhook_url=args["webhook_url"])
    long_first = long.status()
    fal_client.cancel(APP, long.request_id)
    long_events = list(long.iter_events(with_logs=True))
    return {
        "request_id": handle.request_id,
        "first": update(first),
        "result": result,
        "final": update(final),
        "quiet": update(quiet),
        "again": again,
        "late_cancel": late_cancel,
        "long_request_id": long.request_id,
        "long_first": update(long_first),
        "long_events": [update(e) for e in long_events],
        "long_result": http_error(long.get),
    }


def failing(args: dict[str, Any]) -> dict[str, Any]:
    where: list[str] = []

    def submit_and_get() -> None:
        handle = fal_client.submit(APP, arguments=args["invalid_arguments"])
        where.append("accepted")
        handle.get()

    invalid = http_error(submit_and_get)
    handle = fal_client.submit(APP, arguments=args["failing_arguments"])
    events = list(handle.iter_events(with_logs=True))
    return {
        "invalid": invalid,
        "invalid_accepted": bool(where),
        "failing_request_id": handle.request_id,
        "failing_final": update(events[-1]),
        "failing_result": http_error(handle.get),
    }


def run(args: dict[str, Any]) -> dict[str, Any]:
    result = fal_client.run(APP, arguments=args["arguments"])
    return {"result": result, "image": opened(result["images"][0]["url"])}


def upload(args: dict[str, Any]) -> dict[str, Any]:
    # fal-client has no setting for its REST and CDN hosts; these module attributes are read
    # at upload time, so pointing them at the service before the first upload is enough.
    fal_client.client.REST_URL = args["base_url"]
    fal_client.client.CDN_URL = args["base_url"]
    via_cdn = fal_client.upload_file(args["lora_file"])
    via_storage = fal_client.upload_file(args["lora_file"], repository="fal", fallback_repository=[])
    images = {}
    for name, path in (("local", args["lora_file"]), ("via_cdn", via_cdn), ("via_storage", via_storage)):
        arguments = dict(args["arguments"], loras=[{"path": path}])
        images[name] = opened(fal_client.subscribe(APP, arguments=arguments)["images"][0]["url"])
    plain = opened(fal_client.subscribe(APP, arguments=args["arguments"])["images"][0]["url"])
    return {"via_cdn": via_cdn, "via_storage": via_storage, "images": images, "plain": plain}


def flux(args: dict[str, Any]) -> dict[str, Any]:
    """fal-ai/flux-lora's family through the queue: the client polls the URLs it rebuilds without the sub-path."""
    result = fal_client.subscribe(args["app"], arguments=args["arguments"], with_logs=True)
    return {"result": result, "image": opened(result["images"][0]["url"])}


SCENARIOS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "subscribe": subscribe,
    "queue": queue,
    "failing": failing,
    "run": run,
    "upload": upload,
    "flux": flux,
}

if __name__ == "__main__":
    print(json.dumps(SCENARIOS[sys.argv[1]](json.loads(sys.argv[2]))))
