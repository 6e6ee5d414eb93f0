"""The store on both engines, for tests that must hold on each: SQLite in a temp dir and PostgreSQL on
the real server the session starts (tests/postgres_server.py). A module that needs another `store`
defines its own, which takes precedence."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import pytest_asyncio

from gateway.store import RequestStore
from gateway.store_postgres import PostgresStore
from gateway.store_sqlite import SqliteStore

Opener = Callable[[], Awaitable[RequestStore]]


@pytest.fixture(params=["sqlite", "postgres"])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Opener:
    """Opens (or reopens, as a restarted gateway would) one store of the parametrized engine."""
    if request.param == "sqlite":
        path = tmp_path / "data" / "requests.sqlite3"

        async def sqlite() -> RequestStore:
            return SqliteStore(path)

        return sqlite
    dsn: str = request.getfixturevalue("postgres_dsn")

    async def postgres() -> RequestStore:
        return await PostgresStore.open(dsn)

    return postgres


@pytest_asyncio.fixture
async def store(open_store: Opener) -> AsyncIterator[RequestStore]:
    opened = await open_store()
    yield opened
    await opened.close()
