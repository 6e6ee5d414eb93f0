"""gateway.store.RequestStore: the SQLite queue — FIFO order, positions, transitions, restarts."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.store import RequestRecord, RequestStore, State
from loraserve.v1 import types_pb2


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "requests.sqlite3"


@pytest.fixture
def store(path: Path) -> Iterator[RequestStore]:
    store = RequestStore(path)
    yield store
    store.close()


def inp(prompt: str = "a red house") -> types_pb2.GenerateInput:
    return types_pb2.GenerateInput(model_name="org/model", prompt=prompt, num_images=2)


def add(store: RequestStore, prompt: str = "p", *, client_request_id: str = "") -> RequestRecord:
    record, created = store.add(inp(prompt), seed=7, model_key="key", client_request_id=client_request_id)
    assert created
    return record


def positions(store: RequestStore, *records: RequestRecord) -> list[int]:
    return [store.queue_position(r) for r in records]


def output() -> types_pb2.GenerateOutput:
    return types_pb2.GenerateOutput(images=[types_pb2.Image(url="http://h/files/a.png", width=64, height=64)], seed=7)


def test_add_and_get(store: RequestStore) -> None:
    record, created = store.add(inp("hello"), seed=123, model_key="mk")
    assert created
    got = store.get(record.id)
    assert got == record
    assert got.state == State.IN_QUEUE and not got.finished
    assert got.input == inp("hello")
    assert (got.seed, got.model_key, got.attempts, got.step, got.total_steps) == (123, "mk", 0, 0, 0)
    assert got.started_at is None and got.finished_at is None
    assert got.output is None and got.error is None
    assert store.get("no-such-id") is None


def test_fifo_and_queue_positions(store: RequestStore) -> None:
    assert store.oldest_waiting() is None
    assert store.waiting_count() == 0
    a, b, c, d = (add(store, name) for name in "abcd")
    assert positions(store, a, b, c, d) == [0, 1, 2, 3]
    assert store.oldest_waiting().id == a.id
    assert store.waiting_count() == 4

    assert store.start(a.id)
    assert positions(store, b, c, d) == [0, 1, 2]
    assert store.oldest_waiting().id == b.id

    assert store.cancel(c.id)
    assert positions(store, b, d) == [0, 1]

    assert store.start(b.id)
    assert positions(store, d) == [0]
    assert store.oldest_waiting().id == d.id
    assert store.waiting_count() == 1


def test_start_transitions_once_and_counts_attempts(store: RequestStore) -> None:
    a = add(store)
    assert store.start(a.id)
    started = store.get(a.id)
    assert started.state == State.IN_PROGRESS
    assert started.attempts == 1 and started.started_at is not None
    assert not store.start(a.id), "an IN_PROGRESS request cannot start again"
    assert store.get(a.id).attempts == 1
    assert not store.start("no-such-id")


def test_start_is_false_for_a_cancelled_request(store: RequestStore) -> None:
    a = add(store)
    assert store.cancel(a.id)
    assert not store.start(a.id)
    record = store.get(a.id)
    assert record.state == State.CANCELLED and record.attempts == 0
    assert store.oldest_waiting() is None


def test_client_request_id_dedupes(store: RequestStore) -> None:
    first, created = store.add(inp("first"), seed=1, model_key="k", client_request_id="retry-1")
    assert created
    again, created_again = store.add(inp("second"), seed=2, model_key="other", client_request_id="retry-1")
    assert not created_again
    assert again == first
    assert again.input.prompt == "first" and again.seed == 1
    assert store.waiting_count() == 1
    # A different id, or none, queues a new request each time.
    other, created_other = store.add(inp(), seed=1, model_key="k", client_request_id="retry-2")
    none_1, c1 = store.add(inp(), seed=1, model_key="k")
    none_2, c2 = store.add(inp(), seed=1, model_key="k", client_request_id="")
    assert created_other and c1 and c2
    assert len({first.id, other.id, none_1.id, none_2.id}) == 4
    assert store.waiting_count() == 4


def test_client_request_id_dedupes_after_the_request_finished(store: RequestStore) -> None:
    first = add(store, client_request_id="once")
    store.cancel(first.id)
    again, created = store.add(inp(), seed=1, model_key="k", client_request_id="once")
    assert not created and again.id == first.id and again.state == State.CANCELLED


def test_requeue_keeps_the_original_fifo_place(store: RequestStore) -> None:
    a, b, c = add(store, "a"), add(store, "b"), add(store, "c")
    assert store.start(a.id)
    store.set_progress(a.id, 4, 10)
    assert store.oldest_waiting().id == b.id
    store.requeue(a.id)
    again = store.get(a.id)
    assert again.state == State.IN_QUEUE
    assert (again.step, again.total_steps, again.attempts) == (0, 0, 1)
    assert store.oldest_waiting().id == a.id
    assert positions(store, a, b, c) == [0, 1, 2]
    # The next start counts a second attempt but keeps the first start time.
    assert store.start(a.id)
    restarted = store.get(a.id)
    assert restarted.attempts == 2 and restarted.started_at == again.started_at


def test_requeue_ignores_requests_that_are_not_running(store: RequestStore) -> None:
    waiting, done = add(store), add(store)
    store.cancel(done.id)
    store.requeue(waiting.id)
    store.requeue(done.id)
    assert store.get(waiting.id).state == State.IN_QUEUE
    assert store.get(done.id).state == State.CANCELLED


def test_progress_only_while_running(store: RequestStore) -> None:
    a = add(store)
    store.set_progress(a.id, 1, 5)
    assert (store.get(a.id).step, store.get(a.id).total_steps) == (0, 0)
    store.start(a.id)
    store.set_progress(a.id, 2, 5)
    assert (store.get(a.id).step, store.get(a.id).total_steps) == (2, 5)


def test_recover_after_reopening_requeues_running_requests(path: Path) -> None:
    first = RequestStore(path)
    a, b, c = add(first, "a"), add(first, "b"), add(first, "c")
    first.start(a.id)
    first.set_progress(a.id, 3, 10)
    first.start(c.id)
    first.complete(c.id, output(), 1.5)
    first.close()

    second = RequestStore(path)
    try:
        assert second.recover() == 1
        assert second.recover() == 0
        recovered = second.get(a.id)
        assert recovered.state == State.IN_QUEUE
        assert (recovered.step, recovered.total_steps, recovered.attempts) == (0, 0, 1)
        assert recovered.input == inp("a")
        assert second.get(b.id).state == State.IN_QUEUE
        assert second.get(c.id).state == State.COMPLETED
        assert second.get(c.id).output == output()
        assert second.oldest_waiting().id == a.id
        assert positions(second, a, b) == [0, 1]
        # New requests go after everything already stored.
        d = add(second, "d")
        assert second.queue_position(d) == 2 and d.seq > c.seq
    finally:
        second.close()


def test_complete_only_a_running_request(store: RequestStore) -> None:
    a = add(store)
    assert not store.complete(a.id, output(), 1.0), "a waiting request has not run"
    store.start(a.id)
    assert store.complete(a.id, output(), 2.5)
    done = store.get(a.id)
    assert done.state == State.COMPLETED and done.finished
    assert done.output == output() and done.inference_seconds == 2.5
    assert done.error is None and done.finished_at is not None
    # Finished: nothing changes it any more.
    assert not store.cancel(a.id)
    assert not store.fail(a.id, types_pb2.RequestError(type="INTERNAL", message="late"))
    assert not store.complete(a.id, types_pb2.GenerateOutput(seed=1), 9.0)
    assert not store.start(a.id)
    assert store.get(a.id) == done


@pytest.mark.parametrize("started", [False, True], ids=["waiting", "running"])
def test_fail_ends_an_unfinished_request(store: RequestStore, started: bool) -> None:
    a = add(store)
    if started:
        store.start(a.id)
    error = types_pb2.RequestError(type="OUT_OF_MEMORY", message="CUDA out of memory")
    assert store.fail(a.id, error)
    failed = store.get(a.id)
    assert failed.state == State.COMPLETED and failed.finished
    assert failed.error == error and failed.output is None
    assert not store.cancel(a.id)
    assert not store.fail(a.id, types_pb2.RequestError(type="INTERNAL", message="again"))
    assert store.get(a.id).error == error


@pytest.mark.parametrize("started", [False, True], ids=["waiting", "running"])
def test_cancel_ends_an_unfinished_request(store: RequestStore, started: bool) -> None:
    a = add(store)
    if started:
        store.start(a.id)
    assert store.cancel(a.id)
    cancelled = store.get(a.id)
    assert cancelled.state == State.CANCELLED and cancelled.finished
    assert cancelled.error == types_pb2.RequestError(type="CANCELLED", message="cancelled by the caller")
    assert not store.cancel(a.id)
    assert not store.complete(a.id, output(), 1.0)
    assert not store.fail(a.id, types_pb2.RequestError(type="INTERNAL", message="x"))
    assert store.get(a.id).state == State.CANCELLED


def test_unknown_ids_are_no_ops(store: RequestStore) -> None:
    assert not store.cancel("nope")
    assert not store.complete("nope", output(), 1.0)
    assert not store.fail("nope", types_pb2.RequestError(type="INTERNAL"))


def test_logs_ordered_per_request_and_after_seq(store: RequestStore) -> None:
    a, b = add(store, "a"), add(store, "b")
    for i in range(3):
        store.add_log(a.id, types_pb2.LogEntry(message=f"a{i}", level=20, source="worker", timestamp=100.0 + i))
        store.add_log(b.id, types_pb2.LogEntry(message=f"b{i}", level=30, source="gateway", timestamp=200.0 + i))
    logs = store.logs(a.id)
    assert [row.entry.message for row in logs] == ["a0", "a1", "a2"]
    assert [row.entry.timestamp for row in logs] == [100.0, 101.0, 102.0]
    assert {(row.entry.level, row.entry.source) for row in logs} == {(20, "worker")}
    seqs = [row.seq for row in logs]
    assert seqs == sorted(seqs) and len(set(seqs)) == 3
    assert [row.entry.message for row in store.logs(a.id, after_seq=seqs[0])] == ["a1", "a2"]
    assert store.logs(a.id, after_seq=seqs[-1]) == []
    assert [row.entry.message for row in store.logs(b.id)] == ["b0", "b1", "b2"]
    assert store.logs("nope") == []


def test_wal_mode_is_on(store: RequestStore, path: Path) -> None:
    add(store)
    with sqlite3.connect(path) as other:
        (mode,) = other.execute("PRAGMA journal_mode").fetchone()
    other.close()
    assert mode.lower() == "wal"


def test_a_second_connection_sees_committed_writes(store: RequestStore, path: Path) -> None:
    a = add(store)
    store.start(a.id)
    reader = RequestStore(path)
    try:
        assert reader.get(a.id).state == State.IN_PROGRESS
    finally:
        reader.close()


def wal_bytes(path: Path) -> int:
    return Path(f"{path}-wal").stat().st_size


def test_commits_never_checkpoint_on_the_callers_thread(store: RequestStore, path: Path) -> None:
    """With SQLite's automatic checkpoint the log is copied back (and reused) at 1,000 pages; here only the checkpointer copies."""
    store.checkpointer.stop()
    for index in range(1500):
        record = add(store, f"p{index}")
        store.cancel(record.id)
    page = 4096
    assert wal_bytes(path) > 2000 * page
    done = store.checkpointer.checkpoint()
    assert not done.busy and done.log_frames > 2000 and done.checkpointed_frames == done.log_frames
    with sqlite3.connect(path) as other:
        assert other.execute("SELECT COUNT(*) FROM requests WHERE state = 'CANCELLED'").fetchone() == (1500,)
    other.close()


def test_the_checkpointer_thread_copies_the_log_every_few_hundred_commits(store: RequestStore, path: Path) -> None:
    from gateway.wal_checkpoints import EVERY_COMMITS

    for index in range(EVERY_COMMITS):
        add(store, f"p{index}")
    assert store.checkpointer.wait_for(1, timeout=30)
    # Everything was copied back, so the next commit starts the log over from its beginning.
    add(store, "after")
    assert store.checkpointer.checkpoint().log_frames < 20


def test_positions_agree_with_the_table_through_random_transitions(path: Path) -> None:
    """Positions come from an in-memory index of waiting seqs; the table is the truth they must match."""
    import random

    rng = random.Random(5)
    store = RequestStore(path)
    records: list[RequestRecord] = []
    output = types_pb2.GenerateOutput()
    error = types_pb2.RequestError(type="WORKER_FAILED", message="x")
    actions = {
        "add": lambda r: records.append(add(store)),
        "start": store.start,
        "requeue": store.requeue,
        "cancel": store.cancel,
        "fail": lambda r: store.fail(r, error),
        "complete": lambda r: store.complete(r, output, 1.0),
    }

    def check(current: RequestStore) -> None:
        truth = sqlite3.connect(path)
        waiting = [seq for (seq,) in truth.execute("SELECT seq FROM requests WHERE state = 'IN_QUEUE' ORDER BY seq")]
        truth.close()
        assert current.waiting_count() == len(waiting)
        for record in records:
            expected = sum(1 for seq in waiting if seq < record.seq)
            assert current.queue_position(record) == expected

    for step in range(400):
        name = rng.choice(list(actions))
        if name == "add" or not records:
            actions["add"](None)
        else:
            actions[name](rng.choice(records).id)
        if step % 50 == 49:
            check(store)
    store.close()
    reopened = RequestStore(path)
    assert reopened.recover() >= 0
    check(reopened)
    reopened.close()
