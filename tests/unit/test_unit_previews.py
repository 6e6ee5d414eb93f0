"""Live previews in the request store, on both engines: written with the run's progress while its lease
holds, read only by streams that asked, each sent once, the last one with COMPLETED, dropped a minute
after the request ended; and on PostgreSQL, written by one gateway and read, after its notification,
by another."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from gateway.previews import KEEP_AFTER_END_SECONDS, PreviewStream, without_preview
from gateway.retention import RetentionSweeper
from gateway.store import RequestRecord, RequestStore, State
from gateway.store_postgres import PostgresStore
from loraserve.v1 import generation_pb2, types_pb2
from storage.object_store import LocalObjectStore

RUNNING = generation_pb2.REQUEST_STATE_IN_PROGRESS


def status(request_id: str, state: int = RUNNING, step: int = 3) -> generation_pb2.RequestStatus:
    out = generation_pb2.RequestStatus(request_id=request_id, state=state)  # type: ignore[arg-type]
    if state == RUNNING:
        out.progress.CopyFrom(types_pb2.StepProgress(step=step, total=10))
    return out


async def running(store: RequestStore) -> RequestRecord:
    record, _ = await store.add(types_pb2.GenerateInput(model_name="org/model", prompt="p"), seed=1, model_key="k")
    run = await store.claim(record.id)
    assert run is not None
    return run


async def test_progress_with_a_preview_replaces_the_latest_and_without_one_keeps_it(store: RequestStore) -> None:
    run = await running(store)
    assert await store.preview(run.id) is None
    await store.set_progress(run.id, run.lease_token, 2, 10, b"jpeg-2")
    first = await store.preview(run.id)
    assert first is not None and (first.step, first.total, first.jpeg) == (2, 10, b"jpeg-2")
    await store.set_progress(run.id, run.lease_token, 3, 10)
    assert await store.preview(run.id) == first
    assert await store.preview(run.id, after_version=first.version) is None
    await store.set_progress(run.id, run.lease_token, 5, 10, b"jpeg-5")
    newer = await store.preview(run.id, after_version=first.version)
    assert newer is not None and newer.version > first.version and newer.jpeg == b"jpeg-5"
    record = await store.get(run.id)
    assert record is not None and (record.step, record.total_steps) == (5, 10)


async def test_a_run_that_lost_its_lease_writes_no_preview_and_a_retry_counts_on(store: RequestStore) -> None:
    run = await running(store)
    await store.set_progress(run.id, run.lease_token, 4, 10, b"first-run")
    kept = await store.preview(run.id)
    assert kept is not None
    assert await store.requeue(run.id, run.lease_token)
    await store.set_progress(run.id, run.lease_token, 6, 10, b"stale")
    assert await store.preview(run.id) == kept
    rerun = await store.claim(run.id)
    assert rerun is not None
    await store.set_progress(run.id, rerun.lease_token, 1, 10, b"second-run")
    latest = await store.preview(run.id, after_version=kept.version)
    assert latest is not None and latest.jpeg == b"second-run"


async def test_the_preview_stays_after_the_request_ends_and_goes_when_it_expires(store: RequestStore) -> None:
    run = await running(store)
    await store.set_progress(run.id, run.lease_token, 10, 10, b"final")
    assert await store.complete(run.id, run.lease_token, types_pb2.GenerateOutput(seed=1), 1.0)
    final = await store.preview(run.id)
    assert final is not None and final.jpeg == b"final"
    assert [r.id for r in await store.expirable(time.time() + 1, 10)] == [run.id]
    assert await store.expire([run.id]) == [run.id]
    assert await store.preview(run.id) is None


async def test_the_retention_sweep_drops_previews_a_minute_after_their_request_ended(
    store: RequestStore, tmp_path: Path
) -> None:
    ended, still_running = await running(store), await running(store)
    for run in (ended, still_running):
        await store.set_progress(run.id, run.lease_token, 10, 10, b"jpeg")
    assert await store.complete(ended.id, ended.lease_token, types_pb2.GenerateOutput(seed=1), 1.0)
    finished = await store.get(ended.id)
    assert finished is not None and finished.finished_at is not None
    assert await store.drop_previews(finished.finished_at) == 0
    files = LocalObjectStore(tmp_path / "files", "http://127.0.0.1:1")
    clock = finished.finished_at + KEEP_AFTER_END_SECONDS / 2
    sweeper = RetentionSweeper(store, files, 7 * 24 * 3600.0, on_error=_raise, clock=lambda: clock)
    await sweeper.run_once()
    assert await store.preview(ended.id) is not None, "kept for streams yet to read the final status"
    clock = finished.finished_at + KEEP_AFTER_END_SECONDS + 1
    assert await sweeper.run_once() == [], "the request itself is kept: only its preview goes"
    assert await store.preview(ended.id) is None
    assert await store.preview(still_running.id) is not None
    assert (await store.get(ended.id)) == finished


async def test_with_retention_zero_the_sweep_still_drops_previews_and_keeps_every_request(
    store: RequestStore, tmp_path: Path
) -> None:
    run = await running(store)
    await store.set_progress(run.id, run.lease_token, 10, 10, b"jpeg")
    assert await store.complete(run.id, run.lease_token, types_pb2.GenerateOutput(seed=1), 1.0)
    finished = await store.get(run.id)
    assert finished is not None and finished.finished_at is not None
    files = LocalObjectStore(tmp_path / "files", "http://127.0.0.1:1")
    years_later = finished.finished_at + 10 * 365 * 24 * 3600.0
    sweeper = RetentionSweeper(store, files, 0, on_error=_raise, clock=lambda: years_later)
    assert await sweeper.run_once() == []
    assert await store.preview(run.id) is None
    assert (await store.get(run.id)) == finished


def _raise(exc: BaseException) -> None:
    raise exc


async def test_each_preview_once_per_stream_and_every_stream_gets_it(store: RequestStore) -> None:
    run = await running(store)
    first, second = PreviewStream(store), PreviewStream(store)
    sent = status(run.id)
    await first.attach(sent)
    assert sent.progress.preview_jpeg == b""
    await store.set_progress(run.id, run.lease_token, 3, 10, b"jpeg-3")
    sent = status(run.id)
    await first.attach(sent)
    assert sent.progress.preview_jpeg == b"jpeg-3" and sent.progress.step == 3
    again = status(run.id, step=4)
    await first.attach(again)
    assert again.progress.preview_jpeg == b""
    other = status(run.id, step=4)
    await second.attach(other)
    assert other.progress.preview_jpeg == b"jpeg-3"
    await store.set_progress(run.id, run.lease_token, 5, 10, b"jpeg-5")
    newer = status(run.id, step=5)
    await first.attach(newer)
    assert newer.progress.preview_jpeg == b"jpeg-5"


async def test_the_last_preview_comes_with_completed_when_missed_but_not_with_failures_or_the_queue(
    store: RequestStore,
) -> None:
    run = await running(store)
    await store.set_progress(run.id, run.lease_token, 10, 10, b"final")
    queued = status(run.id, generation_pb2.REQUEST_STATE_IN_QUEUE)
    await PreviewStream(store).attach(queued)
    assert not queued.HasField("progress")
    failed = status(run.id, generation_pb2.REQUEST_STATE_COMPLETED)
    failed.error.CopyFrom(types_pb2.RequestError(type="INTERNAL", message="x"))
    await PreviewStream(store).attach(failed)
    assert not failed.HasField("progress")
    assert await store.complete(run.id, run.lease_token, types_pb2.GenerateOutput(seed=1), 1.0)
    done = status(run.id, generation_pb2.REQUEST_STATE_COMPLETED)
    await PreviewStream(store).attach(done)
    assert (done.progress.step, done.progress.total, done.progress.preview_jpeg) == (10, 10, b"final")


def test_what_a_stream_remembers_has_no_preview() -> None:
    sent = status("r1")
    sent.progress.preview_jpeg = b"jpeg"
    without_preview(sent)
    assert sent == status("r1")


async def test_a_preview_written_on_one_gateway_is_announced_to_and_read_on_another(postgres_dsn: str) -> None:
    a = await PostgresStore.open(postgres_dsn, owner="gateway-a")
    b = await PostgresStore.open(postgres_dsn, owner="gateway-b")
    try:
        run = await running(a)
        seen: asyncio.Queue[str] = asyncio.Queue()
        await b.listen(lambda request_id, _moved: seen.put_nowait(request_id))
        assert await asyncio.wait_for(seen.get(), 30) == "", "a (re)connected listener first asks for a full re-read"
        await a.set_progress(run.id, run.lease_token, 4, 8, b"from-a")
        assert await asyncio.wait_for(seen.get(), 30) == run.id
        on_b = PreviewStream(b)
        sent = status(run.id, step=4)
        await on_b.attach(sent)
        assert sent.progress.preview_jpeg == b"from-a"
        record = await b.get(run.id)
        assert record is not None and record.state == State.IN_PROGRESS and record.step == 4
    finally:
        await a.close()
        await b.close()
