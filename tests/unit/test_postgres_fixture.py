"""The PostgreSQL fixture gives each test a real, separate, writable database."""

from __future__ import annotations

import psycopg

from tests.postgres_server import PostgresServer


def test_postgres_dsn_round_trips_rows(postgres_dsn: str) -> None:
    with psycopg.connect(postgres_dsn) as conn:
        conn.execute("CREATE TABLE requests (id text PRIMARY KEY, state text NOT NULL)")
        conn.execute("INSERT INTO requests VALUES (%s, %s), (%s, %s)", ("a", "queued", "b", "done"))
        conn.commit()
    with psycopg.connect(postgres_dsn) as conn:
        rows = conn.execute("SELECT id, state FROM requests ORDER BY id").fetchall()
    assert rows == [("a", "queued"), ("b", "done")]


def test_fresh_databases_are_isolated(postgres_server: PostgresServer) -> None:
    first, second = postgres_server.fresh_database(), postgres_server.fresh_database()
    assert first != second
    with psycopg.connect(first) as conn:
        conn.execute("CREATE TABLE only_here (x int)")
    with psycopg.connect(second) as conn:
        tables = conn.execute("SELECT count(*) FROM pg_tables WHERE tablename = 'only_here'").fetchone()
    assert tables == (0,)


def test_default_database_exists(postgres_server: PostgresServer) -> None:
    assert postgres_server.default_dsn.endswith("/loraserve_test")
    with psycopg.connect(postgres_server.default_dsn) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == ("loraserve_test",)
