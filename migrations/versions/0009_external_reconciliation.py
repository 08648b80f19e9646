"""Provider records, external reconciliation runs, provider prices, and console sessions (issue 16).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02

- `external_uploads` keeps each provider file as it came, with its SHA-256 (unique: the same file is stored once),
  and `external_records` the records parsed from it. Both are append-only, like the journal: what a provider said
  is evidence, never edited.
- `external_channel_map` says which ledger channel a provider's api key or project is (admin configuration).
- `provider_prices` are what a provider charges per million tokens or per request, for the margin report's
  estimate when no cost record exists.
- `external_reconciliations` are runs (one per distinct input), their items, and `external_explanations`: notes
  a person attached to an item (append-only: an explanation is added, never changed or removed).
- `console_sessions` are the auditors' web console sign-ins: only the SHA-256 of the cookie's secret is stored.
"""

from collections.abc import Sequence

from alembic import op

from ledger_service.db.scripts import run_script

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: Sequence[str] | None = None
depends_on: Sequence[str] | None = None

SOURCES = "'openai_usage', 'openai_costs', 'anthropic_usage', 'anthropic_costs', 'csv'"


def _append_only(table: str) -> str:
    return f"""
CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table}
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change();
CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table}
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_change();
"""


UPGRADE = (
    f"""
CREATE TABLE external_uploads (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source      text NOT NULL CHECK (source IN ({SOURCES})),
    sha256      bytea NOT NULL UNIQUE CHECK (length(sha256) = 32),
    filename    text CHECK (length(filename) <= 255),
    channel_id  bigint CHECK (channel_id > 0),
    content     bytea NOT NULL,
    records     integer NOT NULL CHECK (records >= 0),
    uploaded_by bigint REFERENCES api_keys (id),
    uploaded_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON COLUMN external_uploads.channel_id IS
    'The channel of records whose api key or project has no channel-map entry (the CLI''s --channel)';

CREATE TABLE external_records (
    upload_id             bigint NOT NULL REFERENCES external_uploads (id),
    line                  integer NOT NULL CHECK (line > 0),
    bucket_start          timestamptz NOT NULL,
    bucket_end            timestamptz NOT NULL CHECK (bucket_end > bucket_start),
    api_key_id            text,
    project_id            text,
    channel_id            bigint CHECK (channel_id > 0),
    model                 text,
    input_tokens          bigint CHECK (input_tokens >= 0),
    output_tokens         bigint CHECK (output_tokens >= 0),
    cached_tokens         bigint CHECK (cached_tokens >= 0),
    cache_creation_tokens bigint CHECK (cache_creation_tokens >= 0),
    requests              bigint CHECK (requests >= 0),
    cost_usd              numeric,
    currency              text,
    line_item             text,
    raw                   jsonb NOT NULL,
    PRIMARY KEY (upload_id, line)
);
COMMENT ON COLUMN external_records.line IS 'Where the record is in the file: the CSV line, or the n-th result';
CREATE INDEX external_records_by_time ON external_records (bucket_start);

CREATE TABLE external_channel_map (
    source       text NOT NULL CHECK (source IN ({SOURCES})),
    external_key text NOT NULL CHECK (length(external_key) BETWEEN 1 AND 200),
    channel_id   bigint NOT NULL CHECK (channel_id > 0),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source, external_key)
);

CREATE TABLE provider_prices (
    model                     text PRIMARY KEY CHECK (length(model) BETWEEN 1 AND 200),
    input_usd_per_mtok        numeric NOT NULL CHECK (input_usd_per_mtok >= 0),
    output_usd_per_mtok       numeric NOT NULL CHECK (output_usd_per_mtok >= 0),
    cached_input_usd_per_mtok numeric CHECK (cached_input_usd_per_mtok >= 0),
    request_usd               numeric NOT NULL DEFAULT 0 CHECK (request_usd >= 0),
    updated_at                timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE external_reconciliations (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    fingerprint   bytea NOT NULL UNIQUE CHECK (length(fingerprint) = 32),
    params        jsonb NOT NULL,
    status        text NOT NULL DEFAULT 'running' CHECK (status IN ('running', 'completed', 'failed')),
    progress      jsonb,
    matched       integer NOT NULL DEFAULT 0,
    differs       integer NOT NULL DEFAULT 0,
    only_provider integer NOT NULL DEFAULT 0,
    only_ledger   integer NOT NULL DEFAULT 0,
    drift         jsonb,
    error         text,
    created_by    bigint REFERENCES api_keys (id),
    created_at    timestamptz NOT NULL DEFAULT now(),
    heartbeat_at  timestamptz NOT NULL DEFAULT now(),
    completed_at  timestamptz
);
COMMENT ON COLUMN external_reconciliations.fingerprint IS
    'SHA-256 of the run''s input (parameters, and the upload''s hash): the same input is the same run';
COMMENT ON COLUMN external_reconciliations.progress IS 'Where a running run has got to; a resumed run starts there';

CREATE TABLE external_reconciliation_items (
    run_id       bigint NOT NULL REFERENCES external_reconciliations (id),
    id           integer NOT NULL CHECK (id > 0),
    class        text NOT NULL CHECK (class IN ('matched', 'differs', 'only_provider', 'only_ledger')),
    channel_id   bigint,
    model        text,
    bucket_start timestamptz NOT NULL,
    bucket_end   timestamptz NOT NULL,
    ledger       jsonb,
    provider     jsonb,
    difference   jsonb,
    PRIMARY KEY (run_id, id)
);

CREATE TABLE external_explanations (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id     bigint NOT NULL,
    item_id    integer NOT NULL,
    note       text NOT NULL CHECK (length(note) BETWEEN 1 AND 2000),
    author_key bigint REFERENCES api_keys (id),
    author     text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (run_id, item_id) REFERENCES external_reconciliation_items (run_id, id)
);
CREATE INDEX external_explanations_by_item ON external_explanations (run_id, item_id);

CREATE TABLE console_sessions (
    secret_hash bytea PRIMARY KEY CHECK (length(secret_hash) = 32),
    api_key_id  bigint NOT NULL REFERENCES api_keys (id),
    csrf_token  text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    ended_at    timestamptz
);
"""
    + _append_only("external_uploads")
    + _append_only("external_records")
    + _append_only("external_reconciliation_items")
    + _append_only("external_explanations")
)

DOWNGRADE = """
DROP TABLE console_sessions;
DROP TABLE external_explanations;
DROP TABLE external_reconciliation_items;
DROP TABLE external_reconciliations;
DROP TABLE provider_prices;
DROP TABLE external_channel_map;
DROP TABLE external_records;
DROP TABLE external_uploads;
"""


def upgrade() -> None:
    run_script(op.get_bind(), UPGRADE)


def downgrade() -> None:
    run_script(op.get_bind(), DOWNGRADE)
