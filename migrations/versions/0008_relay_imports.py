"""Importing a relay's books: the `opening` entry kind, import runs, and what each run saw in the relay (issue 15).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02

`ledger-service import-relay` brings a relay's balances over as `opening` entries (system:issuance -> user) and,
when the relay's balance moved between two runs, one `adjustment` for the difference. To tell "moved in the relay"
from "moved in the ledger since", each run records what it saw per user and token (`relay_import_balances`),
written in the same transaction as the entries it caused. Runs themselves are kept (`relay_import_runs`) so that an
adjustment's reference can name its run, and an operator can see when a source was imported and what it did.

The new kind widens a CHECK: added NOT VALID and validated separately, which scans the journal without blocking
writers. The downgrade fails while any `opening` entry exists: entries are immutable, and an opening cannot be
made into something else.
"""

from collections.abc import Sequence

from alembic import op

from ledger_service.db.scripts import run_script

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: Sequence[str] | None = None
depends_on: Sequence[str] | None = None

KINDS_BEFORE = "'topup', 'adjustment', 'allowance', 'hold', 'settle', 'refund', 'expire', 'consume', 'reversal'"


def _kind_check(kinds: str) -> str:
    return f"""
ALTER TABLE entries DROP CONSTRAINT entries_kind_check;
ALTER TABLE entries ADD CONSTRAINT entries_kind_check CHECK (kind IN ({kinds})) NOT VALID;
ALTER TABLE entries VALIDATE CONSTRAINT entries_kind_check;
"""


UPGRADE = (
    _kind_check(KINDS_BEFORE + ", 'opening'")
    + """
CREATE TABLE relay_import_runs (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source_id   text NOT NULL CHECK (source_id ~ '^[A-Za-z0-9._-]{1,64}$'),
    relay_kind  text NOT NULL CHECK (relay_kind IN ('one-api', 'new-api')),
    source_url  text NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    summary     jsonb
);
COMMENT ON TABLE relay_import_runs IS
    'One row per import-relay run that could post (dry runs write nothing); source_url has no password';

CREATE TABLE relay_import_balances (
    source_id  text NOT NULL,
    subject    text NOT NULL CHECK (subject IN ('user', 'token')),
    relay_id   bigint NOT NULL CHECK (relay_id > 0),
    quota      bigint NOT NULL,
    unlimited  boolean,
    run_id     bigint NOT NULL REFERENCES relay_import_runs (id),
    PRIMARY KEY (source_id, subject, relay_id),
    CHECK ((subject = 'token') = (unlimited IS NOT NULL))
);
COMMENT ON TABLE relay_import_balances IS
    'What the latest import run saw in the relay: a user''s quota, a token''s remain_quota and unlimited_quota';
"""
)

DOWNGRADE = """
DROP TABLE relay_import_balances;
DROP TABLE relay_import_runs;
""" + _kind_check(KINDS_BEFORE)


def upgrade() -> None:
    run_script(op.get_bind(), UPGRADE)


def downgrade() -> None:
    run_script(op.get_bind(), DOWNGRADE)
