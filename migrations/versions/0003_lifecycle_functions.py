"""The lifecycle in two round trips: read what a plan needs, then apply the plan if its premises still hold.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27

The service decides (prices, posting rules, refusals) in Python, from what `ledger_lifecycle_read` returns. It then
sends the whole plan to `ledger_lifecycle_apply`, which takes the users' locks, checks that every balance and
request status the plan relied on is still what was read, and writes everything in one transaction; otherwise it
writes nothing and answers `stale`. See docs/design.md ("Plan, then apply").
"""

from collections.abc import Sequence

from alembic import op

from ledger_service.db.scripts import create_functions, run_script

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: Sequence[str] | None = None
depends_on: Sequence[str] | None = None

# The functions this revision defines: migrations/sql/<name>/0003.sql.
FUNCTIONS = (
    "ledger_check_posted_entries",
    "ledger_balance",
    "ledger_lock_plan",
    "ledger_lifecycle_read",
    "ledger_lifecycle_apply",
)

UPGRADE = """
-- Every entry balances per ledger, checked once per statement that posts (ledger_check_posted_entries) instead of
-- once per posting at commit; the same trigger checks that the entries exist, which the foreign key did with a
-- lookup and a row lock per posting.
ALTER TABLE postings DROP CONSTRAINT postings_entry_id_fkey;
DROP TRIGGER postings_balanced ON postings;
CREATE TRIGGER postings_balanced AFTER INSERT ON postings REFERENCING NEW TABLE AS posted
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_check_posted_entries();
"""

DOWNGRADE = """
DROP TRIGGER postings_balanced ON postings;
DROP FUNCTION ledger_check_posted_entries();
CREATE CONSTRAINT TRIGGER postings_balanced AFTER INSERT ON postings
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION ledger_check_entry_balanced();
ALTER TABLE postings ADD CONSTRAINT postings_entry_id_fkey FOREIGN KEY (entry_id) REFERENCES entries (id);
DROP FUNCTION ledger_lifecycle_apply(jsonb), ledger_lifecycle_read(jsonb), ledger_lock_plan(bigint[], text[]),
    ledger_balance(text, text);
"""


def upgrade() -> None:
    create_functions(op.get_bind(), "0003", FUNCTIONS)
    run_script(op.get_bind(), UPGRADE)


def downgrade() -> None:
    run_script(op.get_bind(), DOWNGRADE)
