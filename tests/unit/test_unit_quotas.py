"""gateway.quotas on a real SQLite store: limits per tenant from settings, running quota at dispatch,
the gateway's own bounds, and a bad `tenant_limits` refused by name."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from gateway.errors import ResourceExhausted
from gateway.quotas import Quotas, TenantLimits, parse_tenant_limits
from gateway.store_sqlite import SqliteStore
from core.config import Settings
from loraserve.v1 import types_pb2
from storage.uploads import UploadBudget, UploadQuotaExceeded

INPUT = types_pb2.GenerateInput(model_name="org/model", prompt="p")


@pytest_asyncio.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    opened = SqliteStore(tmp_path / "requests.sqlite3")
    yield opened
    await opened.close()


def test_per_tenant_limits_override_the_defaults() -> None:
    settings = Settings(tenant_max_waiting=10, tenant_limits=json.dumps({"big": {"weight": 3, "max_running": 2}}))
    default, per_tenant = parse_tenant_limits(settings)
    streams = settings.tenant_max_open_streams
    assert default == TenantLimits(max_waiting=10, max_open_streams=streams)
    assert per_tenant["big"] == TenantLimits(weight=3.0, max_waiting=10, max_running=2, max_open_streams=streams)


@pytest.mark.parametrize(
    "raw, why",
    [
        ("[1]", "JSON object"),
        ('{"a": {"speed": 1}}', "unknown limit"),
        ('{"a": {"weight": 0}}', "weight must be more than 0"),
        ("{not json", "tenant_limits"),
    ],
)
def test_a_bad_tenant_limits_setting_is_refused_by_name(raw: str, why: str) -> None:
    with pytest.raises(ValueError, match="tenant_limits") as refused:
        parse_tenant_limits(Settings(tenant_limits=raw))
    assert why in str(refused.value)


async def test_a_tenant_at_its_running_quota_waits_and_others_do_not(store: SqliteStore) -> None:
    quotas = Quotas(Settings(tenant_limits=json.dumps({"a": {"max_running": 1}})), store)
    assert quotas.limits_running
    first, _ = await store.add(INPUT, seed=0, model_key="k", tenant="a")
    second, _ = await store.add(INPUT, seed=0, model_key="k", tenant="a")
    other, _ = await store.add(INPUT, seed=0, model_key="k", tenant="b")
    assert await quotas.may_run(first)
    assert await store.claim(first.id) is not None
    assert not await quotas.may_run(second)
    assert await quotas.may_run(other)


async def test_the_queue_size_bounds_every_tenant(store: SqliteStore) -> None:
    quotas = Quotas(Settings(max_queue_size=2), store)
    for _ in range(2):
        await quotas.admit("a")
        await store.add(INPUT, seed=0, model_key="k", tenant="a")
    with pytest.raises(ResourceExhausted) as full:
        await quotas.admit("b")
    assert full.value.limit == "max_queue_size" and full.value.retry_after_seconds > 0


def test_open_streams_are_counted_and_released() -> None:
    quotas = Quotas(Settings(max_open_streams=1), store=None)  # type: ignore[arg-type]
    with quotas.stream("a"):
        with pytest.raises(ResourceExhausted, match="status streams open"):
            with quotas.stream("b"):
                pass
    with quotas.stream("a"):
        assert quotas.open_streams == 1
    assert quotas.open_streams == 0


def test_a_tenant_at_its_stream_limit_is_refused_and_others_are_not() -> None:
    quotas = Quotas(
        Settings(tenant_max_open_streams=1, tenant_limits='{"big": {"max_open_streams": 2}}'),
        store=None,  # type: ignore[arg-type]
    )
    with quotas.stream("a"), quotas.stream("b"), quotas.stream("big"), quotas.stream("big"):
        with pytest.raises(ResourceExhausted) as full:
            with quotas.stream("a"):
                pass
        assert (full.value.limit, full.value.subject) == ("max_open_streams", "tenant:a")
        assert full.value.retry_after_seconds > 0
        with pytest.raises(ResourceExhausted):
            with quotas.stream("big"):
                pass
        assert (quotas.tenant_streams("a"), quotas.tenant_streams("big"), quotas.open_streams) == (1, 2, 4)
    assert (quotas.tenant_streams("a"), quotas.open_streams) == (0, 0)


def test_every_refusal_is_reported_with_its_tenant_and_limit_and_once() -> None:
    refused: list[tuple[str, str, str]] = []
    quotas = Quotas(
        Settings(max_open_streams=2, tenant_max_open_streams=1),
        store=None,  # type: ignore[arg-type]
        on_refused=lambda *r: refused.append(r),
    )
    with quotas.stream("a"), quotas.stream("b"):
        for tenant in ("a", "c"):
            with pytest.raises(ResourceExhausted):
                with quotas.stream(tenant):
                    pass
    quotas.tenant_full("d", 3)
    assert refused == [
        ("a", "max_open_streams", "tenant:a"),
        ("c", "max_open_streams", "gateway"),
        ("d", "max_waiting", "tenant:d"),
    ]


async def test_upload_quota_refusals_are_reported_and_what_a_spool_holds_is_not_reported_twice() -> None:
    refused: list[tuple[str, str, str]] = []
    budget = UploadBudget(
        on_refused=lambda *r: refused.append(r), tenant_max_spools=1, tenant_max_bytes=10, stored_bytes=lambda _: 4
    )
    await budget.admit("a")
    with budget.spool("a"):
        with pytest.raises(UploadQuotaExceeded):
            with budget.spool("a"):
                pass
        with pytest.raises(UploadQuotaExceeded):
            budget.charge("a", 7)
    assert refused == [("a", "tenant_max_upload_spools", "tenant:a"), ("a", "tenant_max_upload_bytes", "tenant:a")]
