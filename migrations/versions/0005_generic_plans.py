"""Generic plans for the lifecycle functions: plan each of their statements once per session, not once per call.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28

PL/pgSQL caches a plan per statement, but a statement with parameters (the plan document, the ids it names) is
planned again on every call until the plan cache judges a generic plan no worse; the lifecycle's statements kept
getting custom plans, so every call paid the planner for each of them. Their plans do not depend on the values:
every row is found by key, with sequential scans already off (0004). `force_generic_plan` makes the plan cache
keep one plan per statement and session. A one-hold apply spent a visible share of its server time in the planner
before this (docs/performance.md).
"""

from collections.abc import Sequence

from alembic import op

from ledger_service.db.scripts import create_functions

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: Sequence[str] | None = None
depends_on: Sequence[str] | None = None

# Each gets a 0005.sql that adds `SET plan_cache_mode = force_generic_plan` to its 0004.sql; the downgrade restores
# the 0004 files.
FUNCTIONS = (
    "ledger_lifecycle_read",
    "ledger_lifecycle_apply",
    "ledger_lock_plan",
    "ledger_check_posted_entries",
    "ledger_balances",
)


def upgrade() -> None:
    create_functions(op.get_bind(), "0005", FUNCTIONS)


def downgrade() -> None:
    create_functions(op.get_bind(), "0004", FUNCTIONS)
