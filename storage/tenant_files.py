"""A request may name a file of the service's own store only if that file is its tenant's.

Files live under their tenant's folder (storage/object_store.py `tenant_folder`), so the check
needs the key alone. It runs on the worker before anything is loaded, over every string of the
input (model, LoRAs, embeddings, conditioning images and weights, image-to-image inputs, and any
field added later): a URL that names another tenant's file is answered exactly as a URL that
names no file at all, at the same point and in the same words, so a request cannot tell whether
another tenant's file exists. The worker's own file reads then never see such a URL, and a
weights-cache hit cannot hand one tenant a file another tenant uploaded.

This is about inputs only. A signed file URL stays a capability, like an S3 presigned URL:
whoever holds it can download it from the file server (or S3) until it expires.
"""

from __future__ import annotations

from typing import Protocol

from google.protobuf.message import Message

from loraserve.request.input_strings import input_strings
from storage.fetch import NO_SUCH_STORED_FILE, InputFetchError
from storage.object_store import InvalidKey, owned_by


class OwnFiles(Protocol):
    def key_for_url(self, url: str) -> str | None: ...

    def exists(self, key: str) -> bool: ...


def check_stored_inputs(message: Message, tenant: str, files: OwnFiles, prefix: str = "input") -> None:
    """Raises InputFetchError(NO_SUCH_STORED_FILE) for the first stored file of `message` the tenant may not use."""
    for found in input_strings(message, prefix):
        field, url = found.path, found.value
        key = files.key_for_url(url)
        if key is None:
            continue
        try:
            usable = owned_by(key, tenant) and files.exists(key)
        except InvalidKey:
            usable = False
        if not usable:
            raise InputFetchError(field, url, NO_SUCH_STORED_FILE)

