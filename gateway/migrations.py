"""Numbered schema migrations for both store engines, applied at start and recorded in the database.

A migration is appended, never edited: a database remembers which numbers it has run
(`schema_migrations`), so a gateway started on an older database brings it up to date,
and two gateways starting at once on PostgreSQL take an advisory lock and run each step
once. Version 1 is the schema SQLite stores had before migrations existed (`IF NOT EXISTS`
makes it a no-op on them).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


SQLITE: tuple[Migration, ...] = (
    Migration(
        1,
        "requests and logs",
        """
CREATE TABLE IF NOT EXISTS requests (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    client_request_id TEXT UNIQUE,
    state TEXT NOT NULL,
    input BLOB NOT NULL,
    seed INTEGER NOT NULL,
    model_key TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    step INTEGER NOT NULL DEFAULT 0,
    total_steps INTEGER NOT NULL DEFAULT 0,
    output BLOB,
    error_type TEXT,
    error_message TEXT,
    inference_seconds REAL
);
CREATE INDEX IF NOT EXISTS requests_waiting ON requests (seq) WHERE state = 'IN_QUEUE';
CREATE TABLE IF NOT EXISTS logs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL,
    message TEXT NOT NULL,
    level INTEGER NOT NULL,
    source TEXT NOT NULL,
    timestamp REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS logs_by_request ON logs (request_id, seq);
""",
    ),
    Migration(
        2,
        "leases and start deadlines",
        """
ALTER TABLE requests ADD COLUMN owner TEXT;
ALTER TABLE requests ADD COLUMN lease_token TEXT;
ALTER TABLE requests ADD COLUMN lease_expires_at REAL;
ALTER TABLE requests ADD COLUMN start_deadline REAL;
CREATE INDEX requests_running ON requests (lease_expires_at) WHERE state = 'IN_PROGRESS';
CREATE INDEX requests_start_deadlines ON requests (start_deadline)
    WHERE state = 'IN_QUEUE' AND start_deadline IS NOT NULL;
""",
    ),
    Migration(
        3,
        "tenants, API keys and fair order",
        # SQLite cannot drop a column's UNIQUE: the table is rebuilt with the key scoped per tenant.
        """
CREATE TABLE requests_v3 (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    client_request_id TEXT,
    state TEXT NOT NULL,
    input BLOB NOT NULL,
    seed INTEGER NOT NULL,
    model_key TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    step INTEGER NOT NULL DEFAULT 0,
    total_steps INTEGER NOT NULL DEFAULT 0,
    output BLOB,
    error_type TEXT,
    error_message TEXT,
    inference_seconds REAL,
    owner TEXT,
    lease_token TEXT,
    lease_expires_at REAL,
    start_deadline REAL,
    tenant TEXT NOT NULL DEFAULT '',
    priority INTEGER NOT NULL DEFAULT 0,
    fair_tag REAL NOT NULL DEFAULT 0,
    UNIQUE (tenant, client_request_id)
);
INSERT INTO requests_v3 (seq, id, client_request_id, state, input, seed, model_key, created_at, started_at, finished_at, attempts, step, total_steps, output, error_type, error_message, inference_seconds, owner, lease_token, lease_expires_at, start_deadline, tenant)
    SELECT seq, id, client_request_id, state, input, seed, model_key, created_at, started_at, finished_at, attempts, step, total_steps, output, error_type, error_message, inference_seconds, owner, lease_token, lease_expires_at, start_deadline, '' FROM requests;
DROP TABLE requests;
ALTER TABLE requests_v3 RENAME TO requests;
CREATE INDEX requests_waiting ON requests (seq) WHERE state = 'IN_QUEUE';
CREATE INDEX requests_running ON requests (lease_expires_at) WHERE state = 'IN_PROGRESS';
CREATE INDEX requests_start_deadlines ON requests (start_deadline)
    WHERE state = 'IN_QUEUE' AND start_deadline IS NOT NULL;
CREATE INDEX requests_fair_order ON requests (priority, fair_tag, seq) WHERE state = 'IN_QUEUE';
CREATE INDEX requests_by_tenant ON requests (tenant, state);
-- A tenant's last fair tag in O(log n) at every Submit, however long its backlog.
CREATE INDEX requests_tenant_tags ON requests (tenant, fair_tag) WHERE state IN ('IN_QUEUE', 'IN_PROGRESS');
CREATE TABLE queue_clock (id INTEGER PRIMARY KEY CHECK (id = 1), v REAL NOT NULL);
INSERT INTO queue_clock (id, v) VALUES (1, 0);
CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    name TEXT NOT NULL DEFAULT '',
    secret_sha256 TEXT NOT NULL,
    created_at REAL NOT NULL,
    revoked_at REAL
);
""",
    ),
    Migration(
        4,
        "retention",
        """
ALTER TABLE requests ADD COLUMN expired_at REAL;
CREATE INDEX requests_to_expire ON requests (finished_at) WHERE finished_at IS NOT NULL AND expired_at IS NULL;
""",
    ),
    Migration(
        5,
        "webhooks",
        # One delivery per request, created in the transaction that ends it. `body` is built once, at the
        # first attempt, and every attempt sends those bytes; a claim (token and expiry) lets one sender
        # at a time attempt it, and one that dies loses its claim when it runs out.
        """
ALTER TABLE requests ADD COLUMN webhook_url TEXT NOT NULL DEFAULT '';
CREATE TABLE webhook_deliveries (
    request_id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    url TEXT NOT NULL,
    body BLOB,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    claim_token TEXT,
    claim_expires_at REAL,
    last_status INTEGER,
    last_error TEXT,
    created_at REAL NOT NULL,
    delivered_at REAL,
    given_up_at REAL
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at)
    WHERE delivered_at IS NULL AND given_up_at IS NULL;
""",
    ),
    Migration(
        6,
        "the input field a failure names",
        "ALTER TABLE requests ADD COLUMN error_field TEXT NOT NULL DEFAULT '';",
    ),
    Migration(
        7,
        "live previews",
        # Beside `requests`, not in it: a status read (`SELECT *`) never carries a preview's bytes, and a
        # preview written every second rewrites this small row, not the request's.
        """
CREATE TABLE previews (
    request_id TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    step INTEGER NOT NULL,
    total_steps INTEGER NOT NULL,
    jpeg BLOB NOT NULL
);
""",
    ),
    Migration(
        8,
        "retry backoff",
        # A request back in the queue after a failed attempt is not claimed before `not_before`, by any
        # gateway: the backoff is the store's, not the memory of the gateway whose attempt failed.
        """
ALTER TABLE requests ADD COLUMN not_before REAL;
CREATE INDEX requests_backing_off ON requests (not_before) WHERE state = 'IN_QUEUE' AND not_before IS NOT NULL;
""",
    ),
    Migration(
        9,
        "queue counts",
        # Each tenant's waiting and running requests, kept by triggers in the transaction of every write
        # that changes a request's state: a quota check reads one row instead of counting the queue.
        """
CREATE TABLE queue_counts (
    tenant TEXT PRIMARY KEY,
    waiting INTEGER NOT NULL DEFAULT 0,
    running INTEGER NOT NULL DEFAULT 0
);
INSERT INTO queue_counts (tenant, waiting, running)
    SELECT tenant, sum(state = 'IN_QUEUE'), sum(state = 'IN_PROGRESS') FROM requests
    WHERE state IN ('IN_QUEUE', 'IN_PROGRESS') GROUP BY tenant;
CREATE TRIGGER requests_counted_in AFTER INSERT ON requests BEGIN
    INSERT INTO queue_counts (tenant, waiting, running) VALUES (NEW.tenant, NEW.state = 'IN_QUEUE', NEW.state = 'IN_PROGRESS')
        ON CONFLICT (tenant) DO UPDATE SET waiting = waiting + excluded.waiting, running = running + excluded.running;
END;
CREATE TRIGGER requests_counted_move AFTER UPDATE OF state ON requests WHEN OLD.state IS NOT NEW.state BEGIN
    UPDATE queue_counts SET waiting = waiting - (OLD.state = 'IN_QUEUE'), running = running - (OLD.state = 'IN_PROGRESS')
        WHERE tenant = OLD.tenant;
    INSERT INTO queue_counts (tenant, waiting, running) VALUES (NEW.tenant, NEW.state = 'IN_QUEUE', NEW.state = 'IN_PROGRESS')
        ON CONFLICT (tenant) DO UPDATE SET waiting = waiting + excluded.waiting, running = running + excluded.running;
END;
CREATE TRIGGER requests_counted_out AFTER DELETE ON requests BEGIN
    UPDATE queue_counts SET waiting = waiting - (OLD.state = 'IN_QUEUE'), running = running - (OLD.state = 'IN_PROGRESS')
        WHERE tenant = OLD.tenant;
END;
""",
    ),
    Migration(
        10,
        "trace context",
        # The submit span's `traceparent` (core/tracing.py), so a dispatch on any gateway continues its trace.
        "ALTER TABLE requests ADD COLUMN trace_context TEXT NOT NULL DEFAULT '';",
    ),
)

POSTGRES: tuple[Migration, ...] = (
    Migration(
        1,
        "requests and logs",
        """
CREATE TABLE requests (
    seq BIGSERIAL PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    client_request_id TEXT UNIQUE,
    state TEXT NOT NULL,
    input BYTEA NOT NULL,
    seed BIGINT NOT NULL,
    model_key TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    started_at DOUBLE PRECISION,
    finished_at DOUBLE PRECISION,
    attempts INTEGER NOT NULL DEFAULT 0,
    step INTEGER NOT NULL DEFAULT 0,
    total_steps INTEGER NOT NULL DEFAULT 0,
    output BYTEA,
    error_type TEXT,
    error_message TEXT,
    inference_seconds DOUBLE PRECISION
);
CREATE INDEX requests_waiting ON requests (seq) WHERE state = 'IN_QUEUE';
CREATE TABLE logs (
    seq BIGSERIAL PRIMARY KEY,
    request_id TEXT NOT NULL,
    message TEXT NOT NULL,
    level INTEGER NOT NULL,
    source TEXT NOT NULL,
    timestamp DOUBLE PRECISION NOT NULL
);
CREATE INDEX logs_by_request ON logs (request_id, seq);
""",
    ),
    Migration(
        2,
        "leases and start deadlines",
        """
ALTER TABLE requests ADD COLUMN owner TEXT;
ALTER TABLE requests ADD COLUMN lease_token TEXT;
ALTER TABLE requests ADD COLUMN lease_expires_at DOUBLE PRECISION;
ALTER TABLE requests ADD COLUMN start_deadline DOUBLE PRECISION;
CREATE INDEX requests_running ON requests (lease_expires_at) WHERE state = 'IN_PROGRESS';
CREATE INDEX requests_start_deadlines ON requests (start_deadline)
    WHERE state = 'IN_QUEUE' AND start_deadline IS NOT NULL;
""",
    ),
    Migration(
        3,
        "tenants, API keys and fair order",
        """
ALTER TABLE requests ADD COLUMN tenant TEXT NOT NULL DEFAULT '';
ALTER TABLE requests DROP CONSTRAINT requests_client_request_id_key;
ALTER TABLE requests ADD CONSTRAINT requests_tenant_client_request_id_key UNIQUE (tenant, client_request_id);
ALTER TABLE requests ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
ALTER TABLE requests ADD COLUMN fair_tag DOUBLE PRECISION NOT NULL DEFAULT 0;
CREATE INDEX requests_fair_order ON requests (priority, fair_tag, seq) WHERE state = 'IN_QUEUE';
CREATE INDEX requests_by_tenant ON requests (tenant, state);
-- A tenant's last fair tag in O(log n) at every Submit, however long its backlog.
CREATE INDEX requests_tenant_tags ON requests (tenant, fair_tag) WHERE state IN ('IN_QUEUE', 'IN_PROGRESS');
CREATE TABLE queue_clock (id INTEGER PRIMARY KEY CHECK (id = 1), v DOUBLE PRECISION NOT NULL);
INSERT INTO queue_clock (id, v) VALUES (1, 0);
CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    name TEXT NOT NULL DEFAULT '',
    secret_sha256 TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    revoked_at DOUBLE PRECISION
);
""",
    ),
    Migration(
        4,
        "retention",
        """
ALTER TABLE requests ADD COLUMN expired_at DOUBLE PRECISION;
CREATE INDEX requests_to_expire ON requests (finished_at) WHERE finished_at IS NOT NULL AND expired_at IS NULL;
""",
    ),
    Migration(
        5,
        "webhooks",
        """
ALTER TABLE requests ADD COLUMN webhook_url TEXT NOT NULL DEFAULT '';
CREATE TABLE webhook_deliveries (
    request_id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    url TEXT NOT NULL,
    body BYTEA,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at DOUBLE PRECISION NOT NULL,
    claim_token TEXT,
    claim_expires_at DOUBLE PRECISION,
    last_status INTEGER,
    last_error TEXT,
    created_at DOUBLE PRECISION NOT NULL,
    delivered_at DOUBLE PRECISION,
    given_up_at DOUBLE PRECISION
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at)
    WHERE delivered_at IS NULL AND given_up_at IS NULL;
""",
    ),
    Migration(
        6,
        "the input field a failure names",
        "ALTER TABLE requests ADD COLUMN error_field TEXT NOT NULL DEFAULT '';",
    ),
    Migration(
        7,
        "live previews",
        """
CREATE TABLE previews (
    request_id TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    step INTEGER NOT NULL,
    total_steps INTEGER NOT NULL,
    jpeg BYTEA NOT NULL
);
""",
    ),
    Migration(
        8,
        "retry backoff",
        """
ALTER TABLE requests ADD COLUMN not_before DOUBLE PRECISION;
CREATE INDEX requests_backing_off ON requests (not_before) WHERE state = 'IN_QUEUE' AND not_before IS NOT NULL;
""",
    ),
    Migration(
        9,
        "queue counts and moves",
        # `queue_counts`: as on SQLite. `moves` counts a request's state changes, so a gateway applying the
        # queue changes it hears about (gateway/queue_index.py) can tell a late notification from a newer one.
        """
CREATE TABLE queue_counts (
    tenant TEXT PRIMARY KEY,
    waiting BIGINT NOT NULL DEFAULT 0,
    running BIGINT NOT NULL DEFAULT 0
);
INSERT INTO queue_counts (tenant, waiting, running)
    SELECT tenant, count(*) FILTER (WHERE state = 'IN_QUEUE'), count(*) FILTER (WHERE state = 'IN_PROGRESS')
    FROM requests WHERE state IN ('IN_QUEUE', 'IN_PROGRESS') GROUP BY tenant;
ALTER TABLE requests ADD COLUMN moves INTEGER NOT NULL DEFAULT 0;
CREATE FUNCTION loraserve_count_states() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND OLD.state = NEW.state THEN
        RETURN NULL;
    END IF;
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        UPDATE queue_counts SET waiting = waiting - (OLD.state = 'IN_QUEUE')::int,
            running = running - (OLD.state = 'IN_PROGRESS')::int
            WHERE tenant = OLD.tenant AND OLD.state IN ('IN_QUEUE', 'IN_PROGRESS');
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') AND NEW.state IN ('IN_QUEUE', 'IN_PROGRESS') THEN
        INSERT INTO queue_counts AS c (tenant, waiting, running)
            VALUES (NEW.tenant, (NEW.state = 'IN_QUEUE')::int, (NEW.state = 'IN_PROGRESS')::int)
            ON CONFLICT (tenant) DO UPDATE SET waiting = c.waiting + EXCLUDED.waiting, running = c.running + EXCLUDED.running;
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER requests_counted AFTER INSERT OR DELETE OR UPDATE OF state ON requests
    FOR EACH ROW EXECUTE FUNCTION loraserve_count_states();
CREATE FUNCTION loraserve_count_moves() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.state IS DISTINCT FROM OLD.state THEN
        NEW.moves := OLD.moves + 1;
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER requests_moves BEFORE UPDATE OF state ON requests FOR EACH ROW EXECUTE FUNCTION loraserve_count_moves();
""",
    ),
    Migration(
        10,
        "trace context",
        "ALTER TABLE requests ADD COLUMN trace_context TEXT NOT NULL DEFAULT '';",
    ),
)

MIGRATIONS_TABLE = "schema_migrations"


def pending(applied: set[int], migrations: tuple[Migration, ...]) -> list[Migration]:
    return [m for m in migrations if m.version not in applied]
