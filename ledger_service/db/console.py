"""The web console's reads: the overview's counts, a request's entries in feed positions, account statements
within a date range, and (while their own services are not there) external reconciliation runs. Read-only."""

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


async def runs(conn: AsyncConnection, *, before: int | None, limit: int) -> list[RunSummary]:
    rows = await conn.execute(
        text(
            f"SELECT {_RUN_COLUMNS} FROM external_reconciliations"  # noqa: S608 - fixed columns
            " WHERE id < :before ORDER BY id DESC LIMIT :limit"
        ),
        {"before": before if before is not None else 2**63 - 1, "limit": limit},
    )
    return [_run(r) for r in rows]


async def run(conn: AsyncConnection, run_id: int) -> RunSummary | None:
    row = (
        await conn.execute(
            text(f"SELECT {_RUN_COLUMNS} FROM external_reconciliations WHERE id = :id"),  # noqa: S608
            {"id": run_id},
        )
    ).first()
    return None if row is None else _run(row)


@dataclass(frozen=True, slots=True)
class Explanation:
    note: str
    author: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class RunItem:
    id: int
    klass: str
    channel_id: int | None
    model: str | None
    bucket_start: datetime
    bucket_end: datetime
    ledger: dict[str, Any] | None
    provider: dict[str, Any] | None
    difference: dict[str, Any] | None
    explanations: list[Explanation]


async def run_items(conn: AsyncConnection, run_id: int, *, klass: str | None, after: int, limit: int) -> list[RunItem]:
    params: dict[str, Any] = {"run_id": run_id, "after": after, "limit": limit}
    where = "run_id = :run_id AND id > :after"
    if klass is not None:
        where += " AND class = :klass"
        params["klass"] = klass
    rows = (
        await conn.execute(
            text(
                "SELECT id, class, channel_id, model, bucket_start, bucket_end, ledger, provider, difference"  # noqa: S608
                f" FROM external_reconciliation_items WHERE {where} ORDER BY id LIMIT :limit"
            ),
            params,
        )
    ).all()
    notes: dict[int, list[Explanation]] = {row.id: [] for row in rows}
    if rows:
        found = await conn.execute(
            text(
                "SELECT item_id, note, author, created_at FROM external_explanations"
                " WHERE run_id = :run_id AND item_id = ANY(:ids) ORDER BY id"
            ),
            {"run_id": run_id, "ids": list(notes)},
        )
        for n in found:
            notes[n.item_id].append(Explanation(n.note, n.author, n.created_at))
    return [
        RunItem(
            id=r.id,
            klass=r._mapping["class"],
            channel_id=r.channel_id,
            model=r.model,
            bucket_start=r.bucket_start,
            bucket_end=r.bucket_end,
            ledger=r.ledger,
            provider=r.provider,
            difference=r.difference,
            explanations=notes[r.id],
        )
        for r in rows
    ]


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


async def item_exists(conn: AsyncConnection, run_id: int, item_id: int) -> bool:
    found = await conn.scalar(
        text("SELECT 1 FROM external_reconciliation_items WHERE run_id = :run_id AND id = :item_id"),
        {"run_id": run_id, "item_id": item_id},
    )
    return found is not None


async def insert_explanation(
    conn: AsyncConnection, run_id: int, item_id: int, *, note: str, author: str, author_key: int
) -> Explanation:
    row = (
        await conn.execute(
            text(
                "INSERT INTO external_explanations (run_id, item_id, note, author_key, author)"
                " VALUES (:run_id, :item_id, :note, :author_key, :author) RETURNING note, author, created_at"
            ),
            {"run_id": run_id, "item_id": item_id, "note": note, "author_key": author_key, "author": author},
        )
    ).one()
    return Explanation(row.note, row.author, row.created_at)


# Margin --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChannelCharges:
    channel_id: int | None
    model: str | None
    quota: int
    input_tokens: int
    output_tokens: int
    requests: int


async def charges_by_channel_model(conn: AsyncConnection, *, start: datetime, end: datetime) -> list[ChannelCharges]:
    rows = await conn.execute(
        text(
            """
            SELECT e.channel_id, e.details->>'model' AS model, sum(e.charged) AS quota,
                   coalesce(sum((e.details->>'prompt_tokens')::bigint), 0) AS input_tokens,
                   coalesce(sum((e.details->>'completion_tokens')::bigint), 0) AS output_tokens,
                   count(*) FILTER (WHERE e.kind <> 'reversal') - count(*) FILTER (WHERE e.kind = 'reversal')
                       AS requests
              FROM entries e
             WHERE e.charged IS NOT NULL AND e.created_at >= :start AND e.created_at < :end
             GROUP BY 1, 2
            """
        ),
        {"start": start, "end": end},
    )
    return [
        ChannelCharges(r.channel_id, r.model, int(r.quota), int(r.input_tokens), int(r.output_tokens), int(r.requests))
        for r in rows
    ]


async def provider_costs(
    conn: AsyncConnection, *, start: datetime, end: datetime
) -> dict[tuple[int | None, str | None], Any]:
    """Recorded provider costs per (channel, model): the record's channel, else its api key's or project's in the
    channel map, else its upload's."""
    rows = await conn.execute(
        text(
            """
            SELECT coalesce(r.channel_id, mk.channel_id, mp.channel_id, u.channel_id) AS channel_id, r.model,
                   sum(r.cost_usd) AS cost
              FROM external_records r
              JOIN external_uploads u ON u.id = r.upload_id
              LEFT JOIN external_channel_map mk ON mk.source = u.source AND mk.external_key = r.api_key_id
              LEFT JOIN external_channel_map mp ON mp.source = u.source AND mp.external_key = r.project_id
             WHERE r.cost_usd IS NOT NULL AND r.bucket_start >= :start AND r.bucket_start < :end
             GROUP BY 1, 2
            """
        ),
        {"start": start, "end": end},
    )
    return {(r.channel_id, r.model): r.cost for r in rows}


async def provider_prices(conn: AsyncConnection) -> dict[str, tuple[Any, Any, Any]]:
    rows = await conn.execute(
        text("SELECT model, input_usd_per_mtok, output_usd_per_mtok, request_usd FROM provider_prices")
    )
    return {r.model: (r.input_usd_per_mtok, r.output_usd_per_mtok, r.request_usd) for r in rows}
