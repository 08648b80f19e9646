"""The ledger: entries, postings, requests, tokens, pricing, API keys and snapshots, with their guards.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from collections.abc import Sequence

from alembic import op

from ledger_service.db.scripts import create_functions, run_script

revision: str = "0001"
down_revision: str | None = None
branch_labels: Sequence[str] | None = None
depends_on: Sequence[str] | None = None

MAX_AMOUNT = 10**15

# The guards' trigger functions (migrations/sql), created before the tables whose triggers run them.
FUNCTIONS = (
    "ledger_check_entry_balanced",
    "ledger_refuse_change",
    "ledger_check_request_transition",
    "ledger_check_token_owner",
)

UPGRADE = f"""
-- Journal -----------------------------------------------------------------------------------------------------
CREATE TABLE entries (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind        text NOT NULL CHECK (kind IN ('topup', 'adjustment', 'allowance', 'hold', 'settle', 'refund',
                                              'expire', 'consume', 'reversal')),
    request_id  text,
    user_id     bigint,
    token_id    bigint,
    channel_id  bigint,
    reference   text,
    fingerprint bytea,
    reverses    bigint REFERENCES entries (id),
    charged     bigint CHECK (charged BETWEEN 0 AND {MAX_AMOUNT}),
    details     jsonb NOT NULL DEFAULT '{{}}',
    hash        bytea NOT NULL CHECK (length(hash) = 32),
    txid        xid8 NOT NULL DEFAULT pg_current_xact_id(),
    created_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT entries_reference_key UNIQUE (reference),
    CONSTRAINT entries_reverses_key UNIQUE (reverses),
    CONSTRAINT entries_request_steps_name_request CHECK (
        kind NOT IN ('hold', 'settle', 'refund', 'expire', 'consume') OR request_id IS NOT NULL),
    CONSTRAINT entries_charges_name_parties CHECK (
        kind NOT IN ('settle', 'consume')
        OR (user_id IS NOT NULL AND token_id IS NOT NULL AND channel_id IS NOT NULL AND charged IS NOT NULL))
);
COMMENT ON COLUMN entries.txid IS
    'Id of the writing transaction: snapshots include exactly the entries below a horizon every writer has left';

-- At most one entry of each step per request: a double settlement or double expiry cannot be stored.
CREATE UNIQUE INDEX entries_one_hold_per_request ON entries (request_id) WHERE kind = 'hold';
CREATE UNIQUE INDEX entries_one_charge_per_request ON entries (request_id) WHERE kind IN ('settle', 'consume');
CREATE UNIQUE INDEX entries_one_release_per_request ON entries (request_id) WHERE kind IN ('refund', 'expire');
CREATE INDEX entries_by_request ON entries (request_id);
CREATE INDEX entries_by_txid ON entries (txid);
CREATE INDEX entries_usage_by_user ON entries (user_id, txid) INCLUDE (charged) WHERE kind IN ('settle', 'consume');
CREATE INDEX entries_usage_by_token ON entries (token_id, txid) INCLUDE (charged) WHERE kind IN ('settle', 'consume');
CREATE INDEX entries_usage_by_channel ON entries (channel_id, txid) INCLUDE (charged)
    WHERE kind IN ('settle', 'consume');

CREATE TABLE postings (
    entry_id bigint NOT NULL REFERENCES entries (id),
    ledger   text NOT NULL CHECK (ledger IN ('quota', 'allowance')),
    account  text NOT NULL CHECK (account ~ '^(system|user|token|hold|channel):[A-Za-z0-9._:-]{{1,128}}$'),
    amount   bigint NOT NULL CHECK (amount <> 0 AND amount BETWEEN -{MAX_AMOUNT} AND {MAX_AMOUNT}),
    txid     xid8 NOT NULL DEFAULT pg_current_xact_id(),
    PRIMARY KEY (entry_id, ledger, account)
);
CREATE INDEX postings_by_account ON postings (account, ledger, txid) INCLUDE (amount);
CREATE INDEX postings_by_txid ON postings (txid);

-- Every entry balances per ledger. Checked at commit, once all postings of the transaction are in.
CREATE CONSTRAINT TRIGGER postings_balanced AFTER INSERT ON postings
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION ledger_check_entry_balanced();

-- History is append-only: corrections are reversing entries, never edits.
CREATE TRIGGER entries_append_only BEFORE UPDATE OR DELETE ON entries
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change();
CREATE TRIGGER entries_no_truncate BEFORE TRUNCATE ON entries
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_change();
CREATE TRIGGER postings_append_only BEFORE UPDATE OR DELETE ON postings
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change();
CREATE TRIGGER postings_no_truncate BEFORE TRUNCATE ON postings
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_change();

-- Requests: one row per relay request (a hold or a consumption), keyed by its idempotency key ---------------
CREATE TABLE requests (
    request_id            text PRIMARY KEY CHECK (request_id ~ '^[A-Za-z0-9._:-]{{1,128}}$'),
    kind                  text NOT NULL CHECK (kind IN ('hold', 'consumption')),
    status                text NOT NULL CHECK (status IN ('open', 'settled', 'refunded', 'expired')),
    user_id               bigint NOT NULL CHECK (user_id > 0),
    token_id              bigint NOT NULL CHECK (token_id > 0),
    token_limited         boolean NOT NULL,
    group_name            text NOT NULL,
    model                 text NOT NULL,
    prompt_tokens         bigint NOT NULL CHECK (prompt_tokens BETWEEN 0 AND {MAX_AMOUNT}),
    max_tokens            bigint NOT NULL CHECK (max_tokens BETWEEN 0 AND {MAX_AMOUNT}),
    amount                bigint NOT NULL CHECK (amount BETWEEN 0 AND {MAX_AMOUNT}),
    trusted               boolean NOT NULL,
    model_ratio           numeric NOT NULL CHECK (model_ratio >= 0),
    completion_ratio      numeric NOT NULL CHECK (completion_ratio >= 0),
    group_ratio           numeric NOT NULL CHECK (group_ratio >= 0),
    model_price           numeric CHECK (model_price >= 0),
    channel_id            bigint CHECK (channel_id > 0),
    settled_prompt_tokens bigint CHECK (settled_prompt_tokens BETWEEN 0 AND {MAX_AMOUNT}),
    completion_tokens     bigint CHECK (completion_tokens BETWEEN 0 AND {MAX_AMOUNT}),
    charged               bigint CHECK (charged BETWEEN 0 AND {MAX_AMOUNT}),
    late                  boolean NOT NULL DEFAULT false,
    request_fingerprint      bytea NOT NULL,
    settle_fingerprint    bytea,
    refund_fingerprint    bytea,
    created_at            timestamptz NOT NULL DEFAULT now(),
    expires_at            timestamptz,
    resolved_at           timestamptz,
    CONSTRAINT requests_settled_has_charge CHECK (status <> 'settled' OR (charged IS NOT NULL AND channel_id IS NOT NULL))
);
CREATE INDEX requests_open_by_user ON requests (user_id) INCLUDE (amount) WHERE status = 'open';
CREATE INDEX requests_open_by_token ON requests (token_id) INCLUDE (amount) WHERE status = 'open';
CREATE INDEX requests_open_by_expiry ON requests (expires_at) WHERE status = 'open';

-- A request moves only forward through its lifecycle, and what it is about never changes.
CREATE TRIGGER requests_lifecycle BEFORE UPDATE OR DELETE ON requests
    FOR EACH ROW EXECUTE FUNCTION ledger_check_request_transition();
CREATE TRIGGER requests_no_truncate BEFORE TRUNCATE ON requests
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_change();

-- Tokens: the registry of API tokens; a token never changes user -------------------------------------------
CREATE TABLE tokens (
    token_id   bigint PRIMARY KEY CHECK (token_id > 0),
    user_id    bigint NOT NULL CHECK (user_id > 0),
    unlimited  boolean NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TRIGGER tokens_owner_fixed BEFORE UPDATE ON tokens
    FOR EACH ROW EXECUTE FUNCTION ledger_check_token_owner();
CREATE TRIGGER tokens_kept BEFORE DELETE ON tokens
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change();
CREATE TRIGGER tokens_no_truncate BEFORE TRUNCATE ON tokens
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_change();

-- Pricing ------------------------------------------------------------------------------------------------------
CREATE TABLE model_prices (
    model            text PRIMARY KEY CHECK (length(model) BETWEEN 1 AND 200),
    model_ratio      numeric NOT NULL CHECK (model_ratio >= 0),
    completion_ratio numeric NOT NULL CHECK (completion_ratio >= 0),
    model_price      numeric CHECK (model_price >= 0),
    updated_at       timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE group_ratios (
    group_name  text PRIMARY KEY CHECK (length(group_name) BETWEEN 1 AND 200),
    group_ratio numeric NOT NULL CHECK (group_ratio >= 0),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
INSERT INTO model_prices (model, model_ratio, completion_ratio) VALUES
    ('gpt-4o', 2.5, 4),
    ('gpt-4o-mini', 0.075, 4),
    ('gpt-3.5-turbo', 0.25, 3),
    ('gpt-4', 15, 2),
    ('claude-3-5-sonnet-20241022', 1.5, 5),
    ('deepseek-chat', 0.07, 2);
INSERT INTO group_ratios (group_name, group_ratio) VALUES ('default', 1), ('vip', 1), ('svip', 1);

-- API keys: only a SHA-256 of each secret is stored ------------------------------------------------------------
CREATE TABLE api_keys (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name       text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    role       text NOT NULL CHECK (role IN ('admin', 'relay', 'auditor')),
    key_hash   bytea NOT NULL UNIQUE CHECK (length(key_hash) = 32),
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz
);

-- Snapshots: materialized sums of everything below a transaction horizon (docs/accounting.md) -----------------
CREATE TABLE snapshot_runs (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    horizon          xid8 NOT NULL UNIQUE,
    taken_at         timestamptz NOT NULL DEFAULT now(),
    accounts_changed integer NOT NULL,
    subjects_changed integer NOT NULL
);
CREATE TABLE balance_snapshots (
    account  text NOT NULL,
    ledger   text NOT NULL CHECK (ledger IN ('quota', 'allowance')),
    balance  bigint NOT NULL,
    postings bigint NOT NULL,
    horizon  xid8 NOT NULL,
    PRIMARY KEY (account, ledger)
);
COMMENT ON TABLE balance_snapshots IS
    'balance = sum of the account''s postings with txid < horizon; add the postings at or above it to read';
CREATE TABLE usage_snapshots (
    subject       text PRIMARY KEY,
    used          bigint NOT NULL,
    request_count bigint NOT NULL,
    horizon       xid8 NOT NULL
);
COMMENT ON TABLE usage_snapshots IS
    'used and request_count of a user:, token: or channel: subject over settle/consume entries with txid < horizon';
"""

DOWNGRADE = """
DROP TABLE usage_snapshots, balance_snapshots, snapshot_runs, api_keys, group_ratios, model_prices;
DROP TABLE tokens, requests;
DROP TABLE postings, entries;
DROP FUNCTION ledger_check_token_owner(), ledger_check_request_transition(), ledger_refuse_change(),
    ledger_check_entry_balanced();
"""


def upgrade() -> None:
    create_functions(op.get_bind(), "0001", FUNCTIONS)
    run_script(op.get_bind(), UPGRADE)


def downgrade() -> None:
    run_script(op.get_bind(), DOWNGRADE)
