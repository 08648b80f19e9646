"""One shape for a request row and one encoding for bytes in the lifecycle's documents.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02

`ledger_lifecycle_read` returns each request as its row (`to_jsonb`), and `ledger_lifecycle_apply` takes requests in
the same shape: the service describes a request once (domain/lifecycle.py's RequestRow) and decodes and encodes
that. Bytes (fingerprints, entry hashes) travel as base64 both ways, where the apply took hex. A new hold's expiry
comes from the plan's `expires_in` map and whether it is resolved from its kind and status, so a request row in the
plan carries nothing but its columns.
"""

from collections.abc import Sequence

from alembic import op

from ledger_service.db.scripts import create_functions

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: Sequence[str] | None = None
depends_on: Sequence[str] | None = None

FUNCTIONS = ("ledger_lifecycle_read", "ledger_lifecycle_apply")


def upgrade() -> None:
    create_functions(op.get_bind(), "0006", FUNCTIONS)


def downgrade() -> None:
    create_functions(op.get_bind(), "0005", FUNCTIONS)
