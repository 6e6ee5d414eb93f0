"""Webhook deliveries in the RequestStore, on both engines: made in the transaction that ends a request
(whatever ends it), claimed by one sender at a time, retried, delivered or given up, kept across a
restart, and keeping the request's output from retention until the body is built."""

from __future__ import annotations

import asyncio
import time

from gateway.store import RequestRecord, RequestStore, State, WebhookDelivery
from gateway.store_postgres import PostgresStore
from gateway.store_sqlite import SqliteStore
from loraserve.v1 import types_pb2
from tests.unit.conftest import Opener
from tests.unit.test_unit_store import claim, get, inp, output

HOOK = "https://receiver.example/hook?a=1&b=2"


async def add(
    store: RequestStore, *, webhook_url: str = HOOK, tenant: str = "team-a", **kwargs: float
) -> RequestRecord:
    record, created = await store.add(inp(), seed=7, model_key="key", tenant=tenant, webhook_url=webhook_url, **kwargs)
    assert created
    return record


async def delivery(store: RequestStore, request_id: str) -> WebhookDelivery:
    found = await store.webhook(request_id)
    assert found is not None
    return found


async def test_the_url_is_kept_with_the_request_and_no_delivery_exists_before_it_ends(store: RequestStore) -> None:
    record = await add(store)
    assert record.webhook_url == HOOK
    assert (await get(store, record.id)).webhook_url == HOOK
    assert await store.webhook(record.id) is None
    await claim(store, record)
    assert await store.webhook(record.id) is None
    assert await store.claim_webhooks(10, 30) == []


async def test_every_way_a_request_ends_creates_its_delivery(store: RequestStore) -> None:
    woken: list[int] = []
    store.on_webhook_due(lambda: woken.append(1))

    completed = await claim(store, await add(store))
    assert await store.complete(completed.id, completed.lease_token, output(), 0.5)
    failed = await claim(store, await add(store))
    assert await store.fail(failed.id, types_pb2.RequestError(type="INVALID_INPUT", message="bad"), failed.lease_token)
    failed_waiting = await add(store)
    assert await store.fail(failed_waiting.id, types_pb2.RequestError(type="INTERNAL", message="x"))
    cancelled = await add(store)
    assert await store.cancel(cancelled.id)
    cancelled_running = await claim(store, await add(store))
    assert await store.cancel(cancelled_running.id)
    timed_out = await add(store, start_timeout_seconds=1e-6)
    assert await store.expire_start_deadlines() == [timed_out.id]
    ended = [completed, failed, failed_waiting, cancelled, cancelled_running, timed_out]

    for record in ended:
        made = await delivery(store, record.id)
        assert (made.tenant, made.url, made.body, made.attempts) == ("team-a", HOOK, None, 0)
        assert made.delivered_at is None and made.given_up_at is None
        assert (await get(store, record.id)).finished
    assert len(woken) == len(ended)

    # No second delivery when something tries to end a request again.
    assert not await store.cancel(completed.id)
    assert len(await store.claim_webhooks(100, 30)) == len(ended)


async def test_lost_owner_failure_creates_the_delivery(open_store: Opener) -> None:
    first = await open_store()
    lost = await claim(first, await add(first))
    await first.close()
    second = await open_store()
    try:
        if isinstance(second, SqliteStore):
            taken = (await second.recover(max_attempts=1)).failed
        else:
            # PostgreSQL takes back only runs whose lease ran out.
            taken = await _take_back_when_expired(second, lost)
        assert taken == [lost.id]
        assert (await delivery(second, lost.id)).url == HOOK
        assert (await get(second, lost.id)).error is not None
    finally:
        await second.close()


async def _take_back_when_expired(store: RequestStore, lost: RequestRecord) -> list[str]:
    assert isinstance(store, PostgresStore)
    async with store._conn() as conn:
        await conn.execute("UPDATE requests SET lease_expires_at = 0 WHERE id = %s", (lost.id,))
    return (await store.take_back(max_attempts=1)).failed


async def test_no_url_no_delivery(store: RequestStore) -> None:
    record = await claim(store, await add(store, webhook_url=""))
    assert await store.complete(record.id, record.lease_token, output(), 0.5)
    assert await store.webhook(record.id) is None


async def test_a_claim_is_held_by_one_sender_until_it_records_an_attempt_or_runs_out(store: RequestStore) -> None:
    record = await add(store)
    assert await store.cancel(record.id)
    (claimed,) = await store.claim_webhooks(10, 30)
    assert claimed.claim_token
    assert await store.claim_webhooks(10, 30) == [], "claimed: nobody else gets it"

    assert await store.set_webhook_body(record.id, claimed.claim_token, b'{"a": 1}') == b'{"a": 1}'
    assert await store.set_webhook_body(record.id, claimed.claim_token, b'{"b": 2}') == b'{"a": 1}', "first wins"
    assert await store.set_webhook_body(record.id, "not-the-token", b"x") is None

    assert await store.webhook_attempted(
        record.id, claimed.claim_token, status=500, error="HTTP 500", delivered=False, retry_in_seconds=0.0
    )
    assert not await store.webhook_attempted(
        record.id, claimed.claim_token, status=200, error="", delivered=True, retry_in_seconds=None
    ), "the claim was released: a stale sender records nothing"
    after = await delivery(store, record.id)
    assert (after.attempts, after.last_status, after.last_error, after.claim_token) == (1, 500, "HTTP 500", "")
    assert after.body == b'{"a": 1}'

    (again,) = await store.claim_webhooks(10, 30)
    assert again.claim_token != claimed.claim_token and again.body == b'{"a": 1}'
    assert await store.webhook_attempted(
        record.id, again.claim_token, status=204, error="", delivered=True, retry_in_seconds=None
    )
    done = await delivery(store, record.id)
    assert done.delivered_at is not None and done.given_up_at is None and done.attempts == 2
    assert await store.claim_webhooks(10, 30) == []


async def test_a_retry_waits_and_a_last_failure_gives_up(store: RequestStore) -> None:
    record = await add(store)
    assert await store.cancel(record.id)
    (claimed,) = await store.claim_webhooks(10, 30)
    assert await store.webhook_attempted(
        record.id, claimed.claim_token, status=None, error="timed out", delivered=False, retry_in_seconds=3600
    )
    assert await store.claim_webhooks(10, 30) == [], "not due for an hour"
    assert (await delivery(store, record.id)).next_attempt_at > time.time() + 3000


async def test_an_expired_claim_is_taken_by_another_sender(store: RequestStore) -> None:
    record = await add(store)
    assert await store.cancel(record.id)
    (first,) = await store.claim_webhooks(10, 0.0)
    (second,) = await store.claim_webhooks(10, 30)
    assert second.claim_token != first.claim_token
    assert not await store.webhook_attempted(
        record.id, first.claim_token, status=200, error="", delivered=True, retry_in_seconds=None
    )


async def test_given_up_is_recorded(store: RequestStore) -> None:
    record = await add(store)
    assert await store.cancel(record.id)
    (claimed,) = await store.claim_webhooks(10, 30)
    assert await store.webhook_attempted(
        record.id, claimed.claim_token, status=404, error="HTTP 404", delivered=False, retry_in_seconds=None
    )
    given_up = await delivery(store, record.id)
    assert given_up.given_up_at is not None and given_up.delivered_at is None
    assert await store.claim_webhooks(10, 30) == []


async def test_deliveries_survive_a_restart(open_store: Opener) -> None:
    first = await open_store()
    record = await add(first)
    running = await claim(first, record)
    assert await first.complete(running.id, running.lease_token, output(), 1.0)
    await first.close()
    second = await open_store()
    try:
        (pending,) = await second.claim_webhooks(10, 30)
        assert (pending.request_id, pending.url, pending.tenant) == (record.id, HOOK, "team-a")
    finally:
        await second.close()


async def test_retention_waits_for_the_body_then_takes_the_finished_delivery(store: RequestStore) -> None:
    record = await claim(store, await add(store))
    assert await store.complete(record.id, record.lease_token, output(), 1.0)
    later = time.time() + 10
    assert await store.expirable(later, 10) == [], "its webhook body is not built yet"
    (claimed,) = await store.claim_webhooks(10, 30)
    await store.set_webhook_body(record.id, claimed.claim_token, b"{}")
    assert [r.id for r in await store.expirable(later, 10)] == [record.id]
    assert await store.webhook_attempted(
        record.id, claimed.claim_token, status=200, error="", delivered=True, retry_in_seconds=None
    )
    assert await store.expire([record.id]) == [record.id]
    assert await store.webhook(record.id) is None
    assert (await get(store, record.id)).state == State.COMPLETED


async def test_gateways_sharing_postgresql_claim_each_delivery_once(postgres_dsn: str) -> None:
    stores = [await PostgresStore.open(postgres_dsn) for _ in range(3)]
    try:
        ended = []
        for _ in range(30):
            record = await add(stores[0])
            assert await stores[0].cancel(record.id)
            ended.append(record.id)
        # Senders racing for the same due rows: each row goes to one of them, the others claim what is left.
        claimed: list[str] = []
        for _ in range(len(ended)):
            rounds = await asyncio.gather(*(store.claim_webhooks(12, 30) for store in stores for _ in range(2)))
            claimed += [d.request_id for batch in rounds for d in batch]
            if len(set(claimed)) == len(ended):
                break
        assert sorted(claimed) == sorted(ended), "every delivery claimed by exactly one of them"
    finally:
        for store in stores:
            await store.close()


async def test_claims_take_tenants_in_turns_and_keep_each_within_its_share(store: RequestStore) -> None:
    """Every tenant's oldest before anyone's second; a tenant with attempts in flight gets only the rest of its share."""
    busy = [await add(store, tenant="busy") for _ in range(5)]
    quiet = [await add(store, tenant="quiet") for _ in range(2)]
    for record in busy + quiet:
        assert await store.cancel(record.id)
    first = await store.claim_webhooks(2, 30)
    assert [d.tenant for d in first] == ["busy", "quiet"]
    capped = await store.claim_webhooks(10, 30, per_tenant=2, sending={"busy": 1})
    assert sorted(d.tenant for d in capped) == ["busy", "quiet"]
    assert await store.claim_webhooks(10, 30, per_tenant=2, sending={"busy": 2}) == []
