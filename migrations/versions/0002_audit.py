"""Audit: reversals of charges, the entry feed order, sealed blocks, snapshot history and per-kind totals.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from collections.abc import Sequence

from alembic import op

from ledger_service.db.scripts import run_script

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: Sequence[str] | None = None
depends_on: Sequence[str] | None = None

MAX_AMOUNT = 10**15

UPGRADE = f"""
-- A reversal of a charge carries the negated charge, so usage and channel balances keep agreeing.
ALTER TABLE entries DROP CONSTRAINT entries_charged_check;
ALTER TABLE entries ADD CONSTRAINT entries_charged_check
    CHECK (charged BETWEEN -{MAX_AMOUNT} AND {MAX_AMOUNT} AND (charged >= 0 OR kind = 'reversal'));
ALTER TABLE entries ADD CONSTRAINT entries_reversal_names_its_entry
    CHECK ((kind = 'reversal') = (reverses IS NOT NULL));

-- Entries are read in (txid, id) order: the order in which they become final (see docs/auditing.md).
DROP INDEX entries_by_txid;
CREATE INDEX entries_by_txid ON entries (txid, id);
DROP INDEX entries_usage_by_user;
DROP INDEX entries_usage_by_token;
DROP INDEX entries_usage_by_channel;
CREATE INDEX entries_by_user ON entries (user_id, txid, id);
CREATE INDEX entries_by_token ON entries (token_id, txid, id);
CREATE INDEX entries_by_channel ON entries (channel_id, txid, id);
CREATE INDEX entries_charges_by_time ON entries (created_at) WHERE charged IS NOT NULL;
CREATE INDEX entries_by_time ON entries (created_at);

-- Postings of an account in feed order (statements), which also serves balance reads (txid >= horizon).
DROP INDEX postings_by_account;
CREATE INDEX postings_by_account ON postings (account, txid, entry_id) INCLUDE (ledger, amount);

-- Usage snapshots now count charges net of their reversals (no reversal existed before, so rows stay valid).
COMMENT ON TABLE usage_snapshots IS
    'used = sum of charged, request_count = charges minus reversed charges, of a subject below horizon';

-- Per-kind totals, for the trial balance without scanning every hold account.
CREATE TABLE kind_snapshots (
    ledger  text NOT NULL CHECK (ledger IN ('quota', 'allowance')),
    kind    text NOT NULL,
    balance bigint NOT NULL,
    horizon xid8 NOT NULL,
    PRIMARY KEY (ledger, kind)
);

-- Snapshot history: at checkpoint runs, the rows that changed since the previous checkpoint are kept, so a
-- balance at a past instant starts from the last checkpoint before it.
ALTER TABLE snapshot_runs ADD COLUMN checkpoint boolean NOT NULL DEFAULT false;
CREATE TABLE balance_history (
    run_id   bigint NOT NULL REFERENCES snapshot_runs (id),
    account  text NOT NULL,
    ledger   text NOT NULL,
    balance  bigint NOT NULL,
    horizon  xid8 NOT NULL,
    PRIMARY KEY (account, ledger, run_id)
);

-- Sealed blocks: a hash chain over every entry, in feed order.
CREATE TABLE blocks (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    first_txid  xid8 NOT NULL,
    first_entry bigint NOT NULL,
    last_txid   xid8 NOT NULL,
    last_entry  bigint NOT NULL,
    entry_count integer NOT NULL CHECK (entry_count > 0),
    prev_hash   bytea NOT NULL CHECK (length(prev_hash) = 32),
    hash        bytea NOT NULL CHECK (length(hash) = 32),
    sealed_at   timestamptz NOT NULL DEFAULT now()
);
CREATE TRIGGER blocks_append_only BEFORE UPDATE OR DELETE ON blocks
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change();
CREATE TRIGGER blocks_no_truncate BEFORE TRUNCATE ON blocks
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_change();
"""

DOWNGRADE = """
DROP TABLE blocks, balance_history, kind_snapshots;
DROP INDEX postings_by_account;
CREATE INDEX postings_by_account ON postings (account, ledger, txid) INCLUDE (amount);
ALTER TABLE snapshot_runs DROP COLUMN checkpoint;
DROP INDEX entries_by_user, entries_by_token, entries_by_channel, entries_charges_by_time, entries_by_time;
CREATE INDEX entries_usage_by_user ON entries (user_id, txid) INCLUDE (charged) WHERE kind IN ('settle', 'consume');
CREATE INDEX entries_usage_by_token ON entries (token_id, txid) INCLUDE (charged) WHERE kind IN ('settle', 'consume');
CREATE INDEX entries_usage_by_channel ON entries (channel_id, txid) INCLUDE (charged)
    WHERE kind IN ('settle', 'consume');
DROP INDEX entries_by_txid;
CREATE INDEX entries_by_txid ON entries (txid);
ALTER TABLE entries DROP CONSTRAINT entries_reversal_names_its_entry;
ALTER TABLE entries DROP CONSTRAINT entries_charged_check;
ALTER TABLE entries ADD CONSTRAINT entries_charged_check CHECK (charged BETWEEN 0 AND 1000000000000000);
"""


def upgrade() -> None:
    run_script(op.get_bind(), UPGRADE)


def downgrade() -> None:
    run_script(op.get_bind(), DOWNGRADE)
