"""The web console's reads: the overview's counts and last external reconciliation run, a request's entries in
feed positions, account statements within a date range. Read-only. (The runs and margin pages use the external
reconciliation and margin services.)"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from ledger_service.db.audit import feed_horizon
from ledger_service.domain.audit import StatementPosition

# Overview ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Counts:
    open_holds: int
    overdue_holds: int
    unsealed_entries: int
    """Capped at the `cap` the overview asked for (one more means "more than that")."""
    snapshot_age_seconds: float | None


_COUNTS = text(
    """
    SELECT (SELECT count(*) FROM requests WHERE status = 'open') AS open_holds,
           (SELECT count(*) FROM requests WHERE status = 'open' AND expires_at <= now()) AS overdue_holds,
           (SELECT count(*) FROM (
                SELECT 1 FROM entries e
                 WHERE (e.txid, e.id) > coalesce((SELECT (last_txid, last_entry) FROM blocks ORDER BY id DESC LIMIT 1),
                                                 ('0'::xid8, 0))
                 LIMIT :cap) unsealed) AS unsealed,
           (SELECT extract(epoch FROM now() - max(taken_at)) FROM snapshot_runs) AS snapshot_age
    """
)


async def counts(conn: AsyncConnection, *, unsealed_cap: int) -> Counts:
    row = (await conn.execute(_COUNTS, {"cap": unsealed_cap + 1})).one()
    return Counts(
        open_holds=int(row.open_holds),
        overdue_holds=int(row.overdue_holds),
        unsealed_entries=int(row.unsealed),
        snapshot_age_seconds=None if row.snapshot_age is None else float(row.snapshot_age),
    )


@dataclass(frozen=True, slots=True)
class OverdueHold:
    request_id: str
    user_id: int
    amount: int
    expires_at: datetime


async def overdue_holds(conn: AsyncConnection, *, limit: int) -> list[OverdueHold]:
    rows = await conn.execute(
        text(
            "SELECT request_id, user_id, amount, expires_at FROM requests"
            " WHERE status = 'open' AND expires_at <= now() ORDER BY expires_at LIMIT :limit"
        ),
        {"limit": limit},
    )
    return [OverdueHold(r.request_id, r.user_id, r.amount, r.expires_at) for r in rows]


@dataclass(frozen=True, slots=True)
class DailyUsage:
    day: datetime
    requests: int
    quota: int


async def usage_per_day(conn: AsyncConnection, *, since: datetime) -> list[DailyUsage]:
    """Charges (net of reversals) per UTC day since `since`."""
    rows = await conn.execute(
        text(
            """
            SELECT date_trunc('day', created_at, 'UTC') AS day,
                   count(*) FILTER (WHERE kind <> 'reversal') - count(*) FILTER (WHERE kind = 'reversal') AS requests,
                   sum(charged) AS quota
              FROM entries WHERE charged IS NOT NULL AND created_at >= :since
             GROUP BY 1 ORDER BY 1
            """
        ),
        {"since": since},
    )
    return [DailyUsage(r.day, int(r.requests), int(r.quota)) for r in rows]


@dataclass(frozen=True, slots=True)
class RunSummary:
    id: int
    status: str
    matched: int
    differs: int
    only_provider: int
    only_ledger: int
    created_at: datetime
    completed_at: datetime | None
    params: dict[str, Any]
    error: str | None
    drift: list[dict[str, Any]]


_RUN_COLUMNS = (
    "id, status, matched, differs, only_provider, only_ledger, created_at, completed_at, params, error, drift"
)


def _run(row: Any) -> RunSummary:
    return RunSummary(
        id=row.id,
        status=row.status,
        matched=row.matched,
        differs=row.differs,
        only_provider=row.only_provider,
        only_ledger=row.only_ledger,
        created_at=row.created_at,
        completed_at=row.completed_at,
        params=dict(row.params or {}),
        error=row.error,
        drift=list(row.drift or []),
    )


async def last_run(conn: AsyncConnection) -> RunSummary | None:
    row = (
        await conn.execute(text(f"SELECT {_RUN_COLUMNS} FROM external_reconciliations ORDER BY id DESC LIMIT 1"))  # noqa: S608
    ).first()
    return None if row is None else _run(row)


# A request and its entries -----------------------------------------------------------------------------------


async def entry_positions(conn: AsyncConnection, request_id: str) -> dict[int, int]:
    """entry id -> txid of the request's entries."""
    rows = await conn.execute(
        text("SELECT id, txid::text AS txid_text FROM entries WHERE request_id = :request_id"),
        {"request_id": request_id},
    )
    return {row.id: int(row.txid_text) for row in rows}


# Statements within a date range ------------------------------------------------------------------------------

SLACK_SECONDS = 300
"""An entry's `created_at` is its transaction's start and its feed position its transaction id, so the two orders
can differ by as long as a transaction runs (statements stop at 60 s). A date bound is turned into a feed position
this much wider, and the dates are then compared exactly."""


async def txid_at(conn: AsyncConnection, moment: datetime) -> int | None:
    """The feed position of the first entry created at or after `moment`, None when there is none."""
    found = await conn.scalar(
        text("SELECT txid::text FROM entries WHERE created_at >= :moment ORDER BY created_at LIMIT 1"),
        {"moment": moment},
    )
    return None if found is None else int(found)


@dataclass(frozen=True, slots=True)
class RangeLine:
    position: StatementPosition
    entry_id: int
    kind: str
    created_at: datetime
    ledger: str
    amount: int
    request_id: str | None


_RANGE_CLAUSES = {
    "upper": "p.txid <= CAST(:upper AS xid8)",
    "created_from": "e.created_at >= :created_from",
    "created_to": "e.created_at < :created_to",
}


async def statement_range(
    conn: AsyncConnection,
    account: str,
    *,
    after: StatementPosition,
    upper_txid: int | None,
    created_from: datetime | None,
    created_to: datetime | None,
    limit: int,
) -> list[RangeLine]:
    params: dict[str, Any] = {
        "account": account,
        "horizon": await feed_horizon(conn),
        "txid": after.txid,
        "entry_id": after.entry_id,
        "ledger": after.ledger,
        "limit": limit,
    }
    clauses = [
        "p.account = :account",
        "p.txid < CAST(:horizon AS xid8)",
        "(p.txid, p.entry_id, p.ledger) > (CAST(:txid AS xid8), :entry_id, :ledger)",
    ]
    for name, value in (("upper", upper_txid), ("created_from", created_from), ("created_to", created_to)):
        if value is not None:
            clauses.append(_RANGE_CLAUSES[name])
            params[name] = value
    sql = (
        "SELECT p.txid::text AS txid_text, p.entry_id, p.ledger, p.amount, e.kind, e.created_at, e.request_id"  # noqa: S608
        " FROM postings p JOIN entries e ON e.id = p.entry_id"
        f" WHERE {' AND '.join(clauses)}"
        " ORDER BY p.txid, p.entry_id, p.ledger LIMIT :limit"
    )
    rows = await conn.execute(text(sql), params)
    return [
        RangeLine(
            position=StatementPosition(int(r.txid_text), r.entry_id, r.ledger),
            entry_id=r.entry_id,
            kind=r.kind,
            created_at=r.created_at,
            ledger=r.ledger,
            amount=r.amount,
            request_id=r.request_id,
        )
        for r in rows
    ]
