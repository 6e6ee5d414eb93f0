"""StorageService.Upload: a client-streamed file into the object store."""

from __future__ import annotations

import mimetypes
import re
import uuid
from collections.abc import AsyncIterator

import grpc

from gateway.errors import FieldViolation, InvalidArgument, grpc_errors
from loraserve.v1 import storage_pb2, storage_pb2_grpc, types_pb2
from storage.object_store import ObjectStore, random_name

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class StorageService(storage_pb2_grpc.StorageServiceServicer):
    def __init__(self, store: ObjectStore, max_upload_bytes: int) -> None:
        self._store = store
        self._max_bytes = max_upload_bytes

    @grpc_errors
    async def Upload(
        self, request_iterator: AsyncIterator[storage_pb2.UploadRequest], context: grpc.aio.ServicerContext
    ) -> storage_pb2.UploadResponse:
        chunks: list[bytes] = []
        size = 0
        first: storage_pb2.UploadRequest | None = None
        async for message in request_iterator:
            first = first or message
            size += len(message.chunk)
            if size > self._max_bytes:
                raise InvalidArgument([FieldViolation("chunk", f"the upload is larger than {self._max_bytes} bytes")])
            chunks.append(message.chunk)
        if first is None or size == 0:
            raise InvalidArgument([FieldViolation("chunk", "the upload is empty")])
        name = _safe_name(first.file_name)
        content_type = first.content_type or mimetypes.guess_type(name)[0] or "application/octet-stream"
        stored = self._store.put(f"uploads/{uuid.uuid4().hex}/{name}", b"".join(chunks), content_type)
        return storage_pb2.UploadResponse(
            file=types_pb2.File(url=stored.url, content_type=content_type, file_name=name, file_size=stored.size)
        )


def _safe_name(file_name: str) -> str:
    base = _UNSAFE.sub("_", file_name.rsplit("/", 1)[-1]).lstrip("._")[:100]
    return base or random_name()
