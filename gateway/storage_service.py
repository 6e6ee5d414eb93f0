"""StorageService.Upload: a client-streamed file into the object store, never whole in memory."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator, Collection
from pathlib import Path

import grpc

from gateway.auth import Authenticator
from gateway.errors import FieldViolation, InvalidArgument, grpc_errors
from loraserve.v1 import storage_pb2, storage_pb2_grpc, types_pb2
from storage.object_store import ObjectStore, random_name
from storage.uploads import UploadRefused, UploadWriter

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class StorageService(storage_pb2_grpc.StorageServiceServicer):
    def __init__(
        self,
        store: ObjectStore,
        *,
        max_upload_bytes: int,
        allowed_content_types: Collection[str],
        spool_dir: Path,
        auth: Authenticator,
    ) -> None:
        self._store = store
        self._auth = auth
        self._max_bytes = max_upload_bytes
        self._allowed = allowed_content_types
        self._spool_dir = spool_dir
        spool_dir.mkdir(parents=True, exist_ok=True)

    @grpc_errors
    async def Upload(
        self, request_iterator: AsyncIterator[storage_pb2.UploadRequest], context: grpc.aio.ServicerContext
    ) -> storage_pb2.UploadResponse:
        await self._auth.tenant(context.invocation_metadata())
        writer: UploadWriter | None = None
        name = ""
        try:
            async for message in request_iterator:
                if writer is None:
                    name = _safe_name(message.file_name)
                    writer = UploadWriter(
                        self._store,
                        f"uploads/{uuid.uuid4().hex}/{name}",
                        max_bytes=self._max_bytes,
                        declared_content_type=message.content_type,
                        allowed_content_types=self._allowed,
                        spool_dir=self._spool_dir,
                    )
                writer.write(message.chunk)
            if writer is None:
                raise UploadRefused("the upload is empty")
            stored = await asyncio.to_thread(writer.commit)
        except UploadRefused as exc:
            raise InvalidArgument([FieldViolation("chunk", str(exc))]) from None
        finally:
            if writer is not None:
                writer.abort()
        return storage_pb2.UploadResponse(
            file=types_pb2.File(
                url=stored.url, content_type=stored.content_type, file_name=name, file_size=stored.size
            )
        )


def _safe_name(file_name: str) -> str:
    base = _UNSAFE.sub("_", file_name.rsplit("/", 1)[-1]).lstrip("._")[:100]
    return base or random_name()
