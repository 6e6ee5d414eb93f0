"""Result URLs made when a result is read, so a result stays downloadable as long as its objects exist.

A presigned URL stops working when its signature expires (an hour by default), but a
request's result is kept for days. The request store keeps what the worker returned;
each URL in it names its object's key (`ObjectStore.key_for_url` reads it back whatever
the signature or expiry), so reading a result signs every file anew from its key.
"""

from __future__ import annotations

import base64

from loraserve.v1 import types_pb2
from storage.object_store import ObjectStore

DATA_URI_PREFIX = "data:"

_FILE_FIELDS = ("debug_latents", "debug_per_pass_latents")


def data_uri(data: bytes, content_type: str) -> str:
    """An output returned inline (sync_mode), as fal returns it: the file's bytes in its URL."""
    return f"{DATA_URI_PREFIX}{content_type};base64,{base64.b64encode(data).decode('ascii')}"


def fresh_url(url: str, files: ObjectStore, expires_in_seconds: float | None = None) -> str:
    """The store's current URL for the object `url` names; other URLs (another store's, data URIs) as they are."""
    if url.startswith(DATA_URI_PREFIX):
        # sync_mode's inline outputs: megabytes that name no object.
        return url
    key = files.key_for_url(url)
    return url if key is None else files.url(key, expires_in_seconds)


def with_fresh_urls(
    output: types_pb2.GenerateOutput, files: ObjectStore, expires_in_seconds: float | None = None
) -> types_pb2.GenerateOutput:
    """A copy of `output` whose image and debug-file URLs are signed now (valid for `expires_in_seconds`,
    None: the store's setting); `output` is left as stored."""
    fresh = types_pb2.GenerateOutput()
    fresh.CopyFrom(output)
    for image in fresh.images:
        image.url = fresh_url(image.url, files, expires_in_seconds)
    for field in _FILE_FIELDS:
        if fresh.HasField(field):
            file = getattr(fresh, field)
            if file.url:
                file.url = fresh_url(file.url, files, expires_in_seconds)
    return fresh
