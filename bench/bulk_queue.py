"""P4's deepest queue, written straight into the gateway's store instead of Submitted one by one.

100,000 Submits and as many Cancels would take most of an hour on a 2-core machine; copying a
waiting request the benchmark did Submit 90,000 times in a few SQL statements takes seconds. The
copies are real waiting rows behind everything already waiting (fair tags after the tenant's last),
counted by the store's triggers like any insert; the store then reads the queue's order again
(`RequestStore.reindex`), as a gateway does when it starts.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from gateway.store import RequestStore

# Marks the copies (client_request_id), so they are found again to be deleted.
MARK = "bench-bulk-"
# Rows per transaction. PostgreSQL's triggers update the tenant's one counter row once per row, and
# a transaction's own versions of that row pile up until it commits: 10,000 per transaction took
# 270 s for 90,000 copies on this machine.
CHUNK = 1_000
# A random id shaped as the store's own (str(uuid4()): 8-4-4-4-12 hex digits), so index keys keep their length.
SQLITE_UUID = "lower(" + " || '-' || ".join(f"hex(randomblob({n}))" for n in (4, 2, 2, 2, 6)) + ")"


def _copy_sql(placeholder: str, start: str, count: str, series: str) -> str:
    return (
        "INSERT INTO requests (id, client_request_id, state, input, seed, model_key, created_at, tenant, priority,"
        f" fair_tag) SELECT {{id}}, '{MARK}' || g, 'IN_QUEUE', t.input, t.seed, t.model_key, t.created_at, t.tenant,"
        " t.priority, (SELECT max(fair_tag) FROM requests WHERE tenant = t.tenant AND state IN ('IN_QUEUE', 'IN_PROGRESS')) + g - "
        f"{start} + 1 FROM requests AS t, {series} WHERE t.id = {placeholder} RETURNING id"
    )


async def add_waiting(store: RequestStore, store_url: str, sqlite_path: Path, template_id: str, count: int) -> list[str]:
    """`count` copies of the waiting request `template_id`, at the back of the queue; returns their ids."""
    ids: list[str] = []
    for start in range(0, count, CHUNK):
        size = min(CHUNK, count - start)
        if store_url:
            import psycopg

            sql = _copy_sql("%s", "%s", "%s", "generate_series(%s::int, %s::int) AS g").format(
                id="gen_random_uuid()::text"
            )
            async with await psycopg.AsyncConnection.connect(store_url, autocommit=True) as conn:
                cur = await conn.execute(sql.encode(), (start, start, start + size - 1, template_id))
                ids += [row[0] for row in await cur.fetchall()]
        else:
            sql = (
                "WITH RECURSIVE s(g) AS (SELECT ? UNION ALL SELECT g + 1 FROM s WHERE g < ?) "
                + _copy_sql("?", "?", "?", "s").format(id=SQLITE_UUID)
            )
            with sqlite3.connect(sqlite_path, timeout=60, isolation_level=None) as db:
                db.execute("BEGIN IMMEDIATE")
                ids += [row[0] for row in db.execute(sql, (start, start + size - 1, start, template_id)).fetchall()]
                db.execute("COMMIT")
    await store.reindex()
    return ids


async def remove_waiting(store: RequestStore, store_url: str, sqlite_path: Path) -> None:
    """Deletes every copy `add_waiting` made, CHUNK rows per transaction."""
    if store_url:
        import psycopg

        async with await psycopg.AsyncConnection.connect(store_url, autocommit=True) as conn:
            while True:
                cur = await conn.execute(
                    "DELETE FROM requests WHERE seq IN (SELECT seq FROM requests WHERE client_request_id LIKE %s LIMIT %s)",
                    (MARK + "%", CHUNK),
                )
                if cur.rowcount < CHUNK:
                    break
    else:
        with sqlite3.connect(sqlite_path, timeout=60, isolation_level=None) as db:
            db.execute("DELETE FROM requests WHERE client_request_id LIKE ?", (MARK + "%",))
    await store.reindex()
