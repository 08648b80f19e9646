"""Cheaper premises: a plan's balances are checked from what its read saw; entry existence by index probes.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27

`ledger_lifecycle_read` now also returns the snapshot its balances were read in, and takes balances the service read
before with the snapshot they were read in. `ledger_balances` brings such a balance up to date with the postings
that snapshot could not see, instead of reading it again from its materialized snapshot (a scan of every posting
since the last refresh, with a heap visit each), and computes all the balances of a call in one statement.
`ledger_lifecycle_apply` checks balance premises the same way. The postings
trigger checks that the entries it names exist with one index probe per entry, where the planner used to hash
the whole entries table. The account and request_id checks accept the same strings with a cheaper regular
expression, and four entry indexes leave out the entries they can never find. See docs/performance.md.
"""

from collections.abc import Sequence

from alembic import op

from ledger_service.db.scripts import create_functions, run_script

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: Sequence[str] | None = None
depends_on: Sequence[str] | None = None

UPGRADE = """
-- The same address and request_id rules without a bounded repetition: PostgreSQL's regular expression engine
-- builds DFA states afresh for every match, and '{1,128}' kept it busy for every character of every posting's
-- account (a large share of the server's CPU under load). '+' and a length bound accept exactly the same strings.
ALTER TABLE postings DROP CONSTRAINT postings_account_check;
ALTER TABLE postings ADD CONSTRAINT postings_account_check CHECK (
    account ~ '^(system|user|token|hold|channel):[A-Za-z0-9._:-]+$'
    AND length(account) <= length(split_part(account, ':', 1)) + 1 + 128);
ALTER TABLE requests DROP CONSTRAINT requests_request_id_check;
ALTER TABLE requests ADD CONSTRAINT requests_request_id_check CHECK (
    request_id ~ '^[A-Za-z0-9._:-]+$' AND length(request_id) <= 128);

-- Index only the entries an index can find: a lifecycle entry has no reference and reverses nothing, and a hold,
-- refund or expiry names no channel, so each of these index entries was written and never read. A lookup by
-- `column = value` implies `column IS NOT NULL`, so every query that used the full indexes uses these.
ALTER TABLE entries DROP CONSTRAINT entries_reference_key;
CREATE UNIQUE INDEX entries_reference_key ON entries (reference) WHERE reference IS NOT NULL;
ALTER TABLE entries DROP CONSTRAINT entries_reverses_key;
CREATE UNIQUE INDEX entries_reverses_key ON entries (reverses) WHERE reverses IS NOT NULL;
DROP INDEX entries_by_channel;
CREATE INDEX entries_by_channel ON entries (channel_id, txid, id) WHERE channel_id IS NOT NULL;
DROP INDEX entries_by_token;
CREATE INDEX entries_by_token ON entries (token_id, txid, id) WHERE token_id IS NOT NULL;
"""

# The functions this revision redefines (migrations/sql/<name>/0004.sql), which its downgrade restores from their
# 0003 files; ledger_balances, new, is created before them, as ledger_balance's SQL body is checked against it.
# All but ledger_balance now run with `enable_seqscan = off`, which is all that changes in ledger_lock_plan. They
# find rows by key: request ids, token ids, accounts, entry ids. An index scan is right for them whatever the
# statistics say, and the statistics can be badly wrong: on a young ledger the tables grow from empty faster than
# autovacuum analyzes them, and a plan cached while `requests` looked empty went on scanning all of it for every call.
REPLACED = (
    "ledger_check_posted_entries",
    "ledger_balance",
    "ledger_lock_plan",
    "ledger_lifecycle_read",
    "ledger_lifecycle_apply",
)

PREVIOUS_CHECKS = """
ALTER TABLE postings DROP CONSTRAINT postings_account_check;
ALTER TABLE postings ADD CONSTRAINT postings_account_check
    CHECK (account ~ '^(system|user|token|hold|channel):[A-Za-z0-9._:-]{1,128}$');
ALTER TABLE requests DROP CONSTRAINT requests_request_id_check;
ALTER TABLE requests ADD CONSTRAINT requests_request_id_check CHECK (request_id ~ '^[A-Za-z0-9._:-]{1,128}$');
"""


PREVIOUS_INDEXES = """
DROP INDEX entries_reference_key;
ALTER TABLE entries ADD CONSTRAINT entries_reference_key UNIQUE (reference);
DROP INDEX entries_reverses_key;
ALTER TABLE entries ADD CONSTRAINT entries_reverses_key UNIQUE (reverses);
DROP INDEX entries_by_channel;
CREATE INDEX entries_by_channel ON entries (channel_id, txid, id);
DROP INDEX entries_by_token;
CREATE INDEX entries_by_token ON entries (token_id, txid, id);
"""


def upgrade() -> None:
    run_script(op.get_bind(), UPGRADE)
    create_functions(op.get_bind(), "0004", ("ledger_balances", *REPLACED))


def downgrade() -> None:
    run_script(op.get_bind(), PREVIOUS_INDEXES)
    run_script(op.get_bind(), PREVIOUS_CHECKS)
    create_functions(op.get_bind(), "0003", REPLACED)
    op.execute("DROP FUNCTION ledger_balances(jsonb)")
