"""StorageService.Upload: a client-streamed file into the object store, never whole in memory.

The file lands under the caller's tenant's folder (storage.uploads.Uploads), so only that
tenant's requests can use it as an input. Over an upload quota (spools open at once, the tenant's
bytes) the answer is RESOURCE_EXHAUSTED with RetryInfo and a QuotaFailure, like the other quotas.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from gateway.auth import Authenticator
from gateway.errors import InvalidArgument, grpc_errors
from loraserve.request.violations import FieldViolation
from loraserve.v1 import storage_pb2, storage_pb2_grpc, types_pb2
from storage.uploads import UploadRefused, Uploads, UploadWriter, safe_file_name


class StorageService(storage_pb2_grpc.StorageServiceServicer):
    def __init__(self, uploads: Uploads, *, auth: Authenticator) -> None:
        self._uploads = uploads
        self._auth = auth

    @grpc_errors
    async def Upload(
        self, request_iterator: AsyncIterator[storage_pb2.UploadRequest], context: grpc.aio.ServicerContext
    ) -> storage_pb2.UploadResponse:
        tenant = await self._auth.tenant(context.invocation_metadata())
        await self._uploads.admit(tenant)
        writer: UploadWriter | None = None
        name = ""
        try:
            async for message in request_iterator:
                if writer is None:
                    name = safe_file_name(message.file_name)
                    writer = self._uploads.writer(
                        self._uploads.new_key(tenant, name), message.content_type, tenant=tenant
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
