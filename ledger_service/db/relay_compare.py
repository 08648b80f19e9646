"""The ledger's side of `compare-relay`: its charges over a time window, in pages, and balances a page at a time.

Charges are `settle` and `consume` entries (each names user, token, channel and the amount charged) that no
`reversal` cancelled, joined to their request for the model and the token counts. They are read in
(created_at, id) order by keyset pages, each page its own short statement: the partial index
`entries_charges_by_time (created_at) WHERE charged IS NOT NULL` (migration 0002) serves the range (each page
starts its index range at the last page's time: `created_at >= :after_at`), and the reversal check is a probe of
the unique index on `entries.reverses`. No new index is needed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from datetime import datetime

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger_service.db import journal
from ledger_service.domain import accounts
from ledger_service.domain.accounts import SubLedger
from ledger_service.domain.relay_compare import LedgerCharge, LedgerToken

_CHARGES = text(
    """
    SELECT e.id, e.request_id, e.user_id, e.token_id, e.channel_id, e.charged,
           extract(epoch FROM e.created_at)::float8 AS at, e.created_at,
           coalesce(r.model, '') AS model,
           coalesce(r.settled_prompt_tokens, r.prompt_tokens, 0) AS prompt_tokens,
           coalesce(r.completion_tokens, 0) AS completion_tokens
      FROM entries e
      LEFT JOIN requests r ON r.request_id = e.request_id
     WHERE e.charged IS NOT NULL AND e.kind IN ('settle', 'consume')
       AND e.created_at >= :since AND e.created_at < :until
       AND e.created_at >= :after_at
       AND (e.created_at > :after_at OR e.id > :after_id)
       AND NOT EXISTS (SELECT 1 FROM entries x WHERE x.reverses = e.id)
     ORDER BY e.created_at, e.id
     LIMIT :limit
    """
)


async def check(engine: AsyncEngine) -> None:
    """Fail now, before any output, when the ledger's database cannot be read."""
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1 FROM entries LIMIT 1"))


async def charges(
    engine: AsyncEngine, since: datetime, until: datetime, batch_size: int = 5000
) -> AsyncIterator[list[LedgerCharge]]:
    """Charges with since <= created_at < until, in (created_at, id) order, `batch_size` at a time."""
    after_at, after_id = since, 0
    while True:
        async with engine.connect() as conn:
            rows = (
                await conn.execute(
                    _CHARGES,
                    {
                        "since": since,
                        "until": until,
                        "after_at": after_at,
                        "after_id": after_id,
                        "limit": batch_size,
                    },
                )
            ).all()
        if not rows:
            return
        yield [
            LedgerCharge(
                entry_id=int(r.id),
                request_id=str(r.request_id),
                at=float(r.at),
                user_id=int(r.user_id),
                token_id=int(r.token_id),
                channel_id=int(r.channel_id),
                model=str(r.model),
                prompt_tokens=int(r.prompt_tokens),
                completion_tokens=int(r.completion_tokens),
                charged=int(r.charged),
            )
            for r in rows
        ]
        after_at, after_id = rows[-1].created_at, int(rows[-1].id)


async def user_balances(engine: AsyncEngine, user_ids: Sequence[int]) -> dict[int, int]:
    """The `available` quota of each user (0 for a user the ledger never saw), in one round trip."""
    async with engine.connect() as conn:
        found = await journal.balances(conn, [(accounts.user(u), SubLedger.QUOTA) for u in user_ids])
    return {u: found.get((accounts.user(u), SubLedger.QUOTA), 0) for u in user_ids}


_TOKENS = text(
    f"""
    SELECT t.token_id, t.unlimited,
           CASE WHEN t.unlimited THEN 0
                ELSE {journal.balance_expression("'token:' || t.token_id", "'allowance'")} END AS remaining
      FROM tokens t
     WHERE t.token_id = ANY(CAST(:ids AS bigint[]))
    """  # noqa: S608 - fixed fragments
)


async def token_states(engine: AsyncEngine, token_ids: Sequence[int]) -> dict[int, LedgerToken]:
    """The ledger's tokens among `token_ids` (absent ones are left out), with their remaining allowance."""
    if not token_ids:
        return {}
    async with engine.connect() as conn:
        rows = (await conn.execute(_TOKENS, {"ids": list(token_ids)})).all()
    return {int(r.token_id): LedgerToken(int(r.token_id), bool(r.unlimited), int(r.remaining or 0)) for r in rows}
