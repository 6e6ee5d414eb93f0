"""Retention: finished requests, their logs and output files expire.

The store methods run against both engines (SQLite in a temp dir, PostgreSQL on loopback), the
sweeper against both object stores (a local folder, S3 through moto), and the whole thing through
a gateway in tests/integration/test_retention.py.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from pathlib import Path
from typing import cast

import pytest

from gateway.retention import BATCH, RetentionSweeper, output_prefix
from gateway.store import RequestRecord, RequestStore, State
from loraserve.errors import ErrorType
from loraserve.v1 import types_pb2
from storage.object_store import (
    InvalidKey,
    LocalObjectStore,
    ObjectNotFound,
    ObjectStore,
    upload_key,
    uploads_prefix,
)
from storage.s3 import S3ObjectStore, S3Settings
from tests.unit.conftest import Opener


@pytest.fixture(params=["local", "s3"])
def files(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "local":
        return LocalObjectStore(tmp_path / "files", "http://127.0.0.1:1")
    endpoint: str = request.getfixturevalue("s3_endpoint")
    return S3ObjectStore(
        S3Settings(
            endpoint=endpoint,
            access_key="writer",
            secret_key="writer-secret",
            bucket=f"retention-{secrets.token_hex(4)}",
            secure=False,
            key_prefix="loraserve",
        )
    )


def generate_input(prompt: str = "a red house") -> types_pb2.GenerateInput:
    return types_pb2.GenerateInput(model_name="org/model", prompt=prompt, num_images=1)


async def add(store: RequestStore, *, client_request_id: str = "") -> RequestRecord:
    record, created = await store.add(generate_input(), seed=7, model_key="key", client_request_id=client_request_id)
    assert created
    return record


async def completed(store: RequestStore, files: ObjectStore | None = None, **add_args: str) -> RequestRecord:
    """A request that ran and stored one image (in `files`, when given)."""
    record = await add(store, **add_args)
    claimed = await store.claim(record.id)
    assert claimed is not None
    output = types_pb2.GenerateOutput(seed=7)
    if files is not None:
        stored = files.put(f"{output_prefix(record.id)}image.png", b"png bytes", "image/png")
        output.images.add(url=stored.url, width=64, height=64)
    await store.add_log(record.id, types_pb2.LogEntry(message="generating", source="worker"))
    assert await store.complete(record.id, claimed.lease_token, output, 0.5)
    return await get(store, record.id)


async def get(store: RequestStore, request_id: str) -> RequestRecord:
    record = await store.get(request_id)
    assert record is not None
    return record


def far_future(record: RequestRecord) -> float:
    assert record.finished_at is not None
    return record.finished_at + 1


async def test_only_finished_requests_are_expirable_oldest_first(store: RequestStore) -> None:
    first = await completed(store)
    second = await completed(store)
    cancelled = await add(store)
    assert await store.cancel(cancelled.id)
    waiting = await add(store)
    running = await add(store)
    assert await store.claim(running.id) is not None
    cancelled = await get(store, cancelled.id)

    found = await store.expirable(far_future(cancelled), 10)
    assert [r.id for r in found] == [first.id, second.id, cancelled.id]
    assert [r.id for r in await store.expirable(far_future(cancelled), 2)] == [first.id, second.id]
    assert second.finished_at is not None
    assert [r.id for r in await store.expirable(second.finished_at, 10)] == [first.id]
    assert waiting.id not in {r.id for r in found} and running.id not in {r.id for r in found}


async def test_an_expired_request_keeps_a_tombstone_without_result_input_logs_or_key(store: RequestStore) -> None:
    done = await completed(store, client_request_id="mine")
    kept = await completed(store)
    assert await store.logs(done.id)

    assert await store.expire([done.id]) == [done.id]
    expired = await get(store, done.id)
    assert expired.expired_at is not None and expired.state == State.COMPLETED
    assert expired.output is None and expired.input == types_pb2.GenerateInput()
    assert expired.finished_at == done.finished_at and expired.error is None
    assert await store.logs(done.id) == []
    assert await store.expirable(far_future(kept), 10) == [await get(store, kept.id)]
    # Once expired, the tenant's client_request_id names a new request.
    again, created = await store.add(generate_input(), seed=7, model_key="key", client_request_id="mine")
    assert created and again.id != done.id
    # The untouched one is untouched.
    untouched = await get(store, kept.id)
    assert untouched.output is not None and untouched.expired_at is None and await store.logs(kept.id)


async def test_expire_changes_only_finished_requests_and_each_once(store: RequestStore) -> None:
    failed = await add(store)
    error = types_pb2.RequestError(type=ErrorType.MODEL_LOAD_FAILED, message="no such model")
    assert await store.fail(failed.id, error)
    waiting = await add(store)
    assert await store.expire([failed.id, waiting.id, "no-such-id"]) == [failed.id]
    assert await store.expire([failed.id]) == []
    assert await store.expire([]) == []
    tombstone = await get(store, failed.id)
    assert tombstone.error == error, "how it ended is kept"
    assert (await get(store, waiting.id)).state == State.IN_QUEUE
    assert [r.id for r in await store.waiting(10)] == [waiting.id]


async def test_expiry_survives_a_restart(open_store: Opener) -> None:
    store = await open_store()
    done = await completed(store)
    await store.expire([done.id])
    await store.close()
    reopened = await open_store()
    try:
        assert (await get(reopened, done.id)).expired_at is not None
        assert await reopened.expirable(far_future(done), 10) == []
    finally:
        await reopened.close()


@pytest.mark.parametrize("open_store", ["sqlite"], indirect=True)
async def test_the_sweeper_deletes_files_then_marks_and_leaves_younger_requests(
    store: RequestStore, files: ObjectStore
) -> None:
    old = await completed(store, files)
    young = await completed(store, files)
    assert old.finished_at is not None and young.finished_at is not None
    # Files of an earlier attempt that the result does not list go too: the whole folder.
    files.put(f"{output_prefix(old.id)}attempt-1.png", b"older", "image/png")
    other = files.put("uploads/keep.png", b"upload", "image/png")
    # Retention ends between the two: the older one is past it, the younger one not.
    retention = 100.0
    now = (old.finished_at + young.finished_at) / 2 + retention
    sweeper = RetentionSweeper(store, files, retention, on_error=_fail, clock=lambda: now)

    assert await sweeper.run_once() == [old.id]
    for name in ("image.png", "attempt-1.png"):
        with pytest.raises(ObjectNotFound):
            files.get(f"{output_prefix(old.id)}{name}")
    assert files.get(f"{output_prefix(young.id)}image.png") == b"png bytes"
    assert files.get(other.key) == b"upload"
    assert (await get(store, old.id)).expired_at is not None
    assert (await get(store, young.id)).expired_at is None
    assert await sweeper.run_once() == []


@pytest.mark.parametrize("open_store", ["sqlite"], indirect=True)
async def test_uploads_expire_under_retention_and_count_toward_their_tenant(store: RequestStore, files: ObjectStore) -> None:
    before_put = time.time()
    upload = files.put(upload_key("team-a", "in.png"), b"upload", "image/png")
    files.put(upload_key("team-b", "in.png"), b"other tenant", "image/png")
    after_put = time.time()
    output = files.put(f"{output_prefix('r1', 'team-a')}image.png", b"output", "image/png")
    assert files.usage(uploads_prefix("team-a")) == len(b"upload")
    assert files.usage(uploads_prefix("team-c")) == 0
    retention = 100.0

    young = RetentionSweeper(store, files, retention, on_error=_fail, clock=lambda: before_put - 5 + retention)
    await young.run_once()
    assert files.get(upload.key) == b"upload"

    old = RetentionSweeper(store, files, retention, on_error=_fail, clock=lambda: after_put + 5 + retention)
    await old.run_once()
    with pytest.raises(ObjectNotFound):
        files.get(upload.key)
    assert files.usage(uploads_prefix("team-a")) == files.usage(uploads_prefix("team-b")) == 0
    # Outputs go with their requests only.
    assert files.get(output.key) == b"output"


@pytest.mark.parametrize("open_store", ["sqlite"], indirect=True)
async def test_a_request_whose_files_could_not_be_deleted_stays_and_goes_next_round(store: RequestStore) -> None:
    done = await completed(store)
    broken = BrokenFiles(down=True)
    sweeper = RetentionSweeper(store, broken.as_store(), 1.0, on_error=_fail, clock=lambda: far_future(done) + 1)
    with pytest.raises(OSError, match="store down"):
        await sweeper.run_once()
    assert (await get(store, done.id)).expired_at is None
    broken.down = False
    assert await sweeper.run_once() == [done.id]
    assert broken.deleted == [output_prefix(done.id)]


@pytest.mark.parametrize("open_store", ["sqlite"], indirect=True)
async def test_a_long_backlog_is_swept_in_batches(store: RequestStore) -> None:
    records = [await completed(store) for _ in range(BATCH + 3)]
    broken = BrokenFiles()
    sweeper = RetentionSweeper(store, broken.as_store(), 1.0, on_error=_fail, clock=lambda: far_future(records[-1]) + 1)
    assert sorted(await sweeper.run_once()) == sorted(r.id for r in records)
    assert len(broken.deleted) == BATCH + 3


@pytest.mark.parametrize("open_store", ["sqlite"], indirect=True)
async def test_the_sweeper_runs_in_the_background_and_outlives_errors(store: RequestStore) -> None:
    done = await completed(store)
    broken = BrokenFiles(fail_once=True)
    errors: list[BaseException] = []
    sweeper = RetentionSweeper(
        store, broken.as_store(), 1.0, on_error=errors.append, period_seconds=0.01, clock=lambda: far_future(done) + 1
    )
    sweeper.start()
    try:
        await asyncio.wait_for(asyncio.to_thread(broken.done.wait), 30)
    finally:
        await sweeper.stop()
    assert len(errors) == 1 and broken.deleted == [output_prefix(done.id)]


def test_delete_prefix_takes_a_whole_folder_and_nothing_beside_it(tmp_path: Path) -> None:
    files = LocalObjectStore(tmp_path / "files", "http://127.0.0.1:1")
    for key in ("outputs/a/1.png", "outputs/a/2.png", "outputs/ab/1.png", "outputs/b/1.png"):
        files.put(key, b"x", "image/png")
    assert files.delete_prefix("outputs/a/") == 2
    assert files.delete_prefix("outputs/a/") == 0
    assert files.get("outputs/ab/1.png") == b"x" and files.get("outputs/b/1.png") == b"x"
    for bad in ("outputs/a", "../", "outputs/../b/", "/"):
        with pytest.raises(InvalidKey):
            files.delete_prefix(bad)


def test_s3_delete_prefix_takes_a_whole_folder_and_nothing_beside_it(s3_endpoint: str) -> None:
    settings = S3Settings(
        endpoint=s3_endpoint,
        access_key="writer",
        secret_key="writer-secret",
        bucket=f"retention-{secrets.token_hex(4)}",
        secure=False,
        key_prefix="loraserve",
    )
    files = S3ObjectStore(settings)
    for key in ("outputs/a/1.png", "outputs/a/2.png", "outputs/ab/1.png"):
        files.put(key, b"x", "image/png")
    assert files.delete_prefix("outputs/a/") == 2
    assert files.delete_prefix("outputs/a/") == 0
    assert files.get("outputs/ab/1.png") == b"x"
    with pytest.raises(ObjectNotFound):
        files.get("outputs/a/1.png")
    with pytest.raises(InvalidKey):
        files.delete_prefix("outputs/a")


class BrokenFiles:
    """Records deletions; while `down`, or on its first call with `fail_once`, raises like a store that is down."""

    def __init__(self, *, down: bool = False, fail_once: bool = False) -> None:
        self.down = down
        self.fail_once = fail_once
        self.deleted: list[str] = []
        self.done = threading.Event()

    def delete_prefix(self, prefix: str) -> int:
        if self.down or self.fail_once:
            self.fail_once = False
            raise OSError("store down")
        self.deleted.append(prefix)
        self.done.set()
        return 1

    def delete_uploads_before(self, before: float) -> int:
        return 0

    def as_store(self) -> ObjectStore:
        """The sweeper calls only delete_prefix and delete_uploads_before."""
        return cast(ObjectStore, self)


def _fail(exc: BaseException) -> None:
    raise AssertionError(f"unexpected sweep error: {exc}")
