"""Numeric sums: balances, totals and usage that no number of accepted writes can push past bigint (issue 14).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02

Each amount is at most 10^15, but nothing bounds a sum of them: about 9,200 postings of 10^15 on one account pass
2^63-1, and every bigint holding or returning such a sum (the snapshot columns, ledger_balances) then failed with
`bigint out of range`, the snapshot refresh with it, and sealing behind the refresh. A sum is now numeric wherever
it is stored or returned (docs/accounting.md, "Sums are unbounded"). The postings themselves stay bigint.

`ledger_balances` and `ledger_balance` change their result type, which `CREATE OR REPLACE` cannot do: they are
dropped and created again, in both directions. The downgrade fails if a stored sum no longer fits a bigint.
"""

from collections.abc import Sequence

from alembic import op

from ledger_service.db.scripts import create_functions, run_script

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: Sequence[str] | None = None
depends_on: Sequence[str] | None = None

COLUMNS = (
    ("balance_snapshots", "balance"),
    ("usage_snapshots", "used"),
    ("kind_snapshots", "balance"),
    ("balance_history", "balance"),
)

DROP = "DROP FUNCTION ledger_balance(text, text);\nDROP FUNCTION ledger_balances(jsonb);"


def _alter(type_name: str) -> str:
    return "\n".join(f"ALTER TABLE {table} ALTER COLUMN {column} TYPE {type_name};" for table, column in COLUMNS)


def upgrade() -> None:
    connection = op.get_bind()
    run_script(connection, _alter("numeric") + "\n" + DROP)
    create_functions(connection, "0007", ("ledger_balances", "ledger_balance"))


def downgrade() -> None:
    connection = op.get_bind()
    run_script(connection, DROP + "\n" + _alter("bigint"))
    create_functions(connection, "0005", ("ledger_balances",))
    create_functions(connection, "0004", ("ledger_balance",))
