"""SQL of the audit features: the entry feed, statements, balances at past instants, the trial balance, sealing.

Every listing here stops at the feed horizon (`pg_snapshot_xmin(pg_current_snapshot())`): entries below it are
final, so a cursor that moves forward through them never skips one that commits late (domain/audit.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from ledger_service.db import journal
from ledger_service.domain.accounts import SubLedger
from ledger_service.domain.audit import STATEMENT_START, FeedPosition, SealedEntry, StatementPosition
from ledger_service.schemas import EntryView


async def feed_horizon(conn: AsyncConnection) -> int:
    return int(await conn.scalar(text("SELECT pg_snapshot_xmin(pg_current_snapshot())::text")) or 0)


@dataclass(frozen=True, slots=True)
class EntryFilter:
    request_id: str | None = None
    user_id: int | None = None
    token_id: int | None = None
    channel_id: int | None = None
    kind: str | None = None
    created_from: datetime | None = None
    created_to: datetime | None = None


_FILTER_CLAUSES = {
    "request_id": "e.request_id = :request_id",
    "user_id": "e.user_id = :user_id",
    "token_id": "e.token_id = :token_id",
    "channel_id": "e.channel_id = :channel_id",
    "kind": "e.kind = :kind",
    "created_from": "e.created_at >= :created_from",
    "created_to": "e.created_at < :created_to",
}


async def list_entries(
    conn: AsyncConnection, where: EntryFilter, *, after: FeedPosition | None, limit: int
) -> list[tuple[FeedPosition, EntryView]]:
    """A page of the entry feed: final entries matching `where`, after `after`, in feed order."""
    params: dict[str, Any] = {"horizon": await feed_horizon(conn), "limit": limit}
    clauses = ["e.txid < CAST(:horizon AS xid8)"]
    if after is not None:
        clauses.append("(e.txid, e.id) > (CAST(:after_txid AS xid8), :after_id)")
        params.update(after_txid=after.txid, after_id=after.entry_id)
    for name, clause in _FILTER_CLAUSES.items():
        value = getattr(where, name)
        if value is not None:
            clauses.append(clause)
            params[name] = value
    rows = (
        (
            await conn.execute(
                text(
                    f"SELECT {journal.ENTRY_COLUMNS}, e.txid::text AS txid_text FROM entries e"  # noqa: S608 - fixed clauses
                    f" WHERE {' AND '.join(clauses)} ORDER BY e.txid, e.id LIMIT :limit"
                ),
                params,
            )
        )
        .mappings()
        .all()
    )
    views = await journal.with_postings(conn, rows)
    return [(FeedPosition(int(row["txid_text"]), row["id"]), view) for row, view in zip(rows, views, strict=True)]


# Statements and balances at past instants ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StatementLine:
    position: StatementPosition
    entry_id: int
    kind: str
    created_at: datetime
    ledger: str
    amount: int
    balance_after: int


_BASE_BEFORE = text(
    """
    SELECT balance, horizon::text AS horizon_text FROM (
        SELECT balance, horizon FROM balance_snapshots WHERE account = :account AND ledger = :ledger
        UNION ALL
        SELECT balance, horizon FROM balance_history WHERE account = :account AND ledger = :ledger
    ) candidates
    WHERE candidates.horizon <= CAST(:txid AS xid8)
    ORDER BY candidates.horizon DESC LIMIT 1
    """
)

_SUM_BETWEEN = text(
    """
    SELECT coalesce(sum(amount), 0) FROM postings
     WHERE account = :account AND ledger = :ledger AND txid >= CAST(:base AS xid8)
       AND (txid, entry_id, ledger) <= (CAST(:txid AS xid8), :entry_id, :through_ledger)
    """
)

_STATEMENT_PAGE = text(
    """
    SELECT p.txid::text AS txid_text, p.entry_id, p.ledger, p.amount, e.kind, e.created_at
      FROM postings p JOIN entries e ON e.id = p.entry_id
     WHERE p.account = :account AND p.txid < CAST(:horizon AS xid8)
       AND (p.txid, p.entry_id, p.ledger) > (CAST(:txid AS xid8), :entry_id, :ledger)
     ORDER BY p.txid, p.entry_id, p.ledger
     LIMIT :limit
    """
)


async def balance_through(conn: AsyncConnection, account: str, ledger: str, position: StatementPosition) -> int:
    """The account's balance in `ledger` counting every posting up to and including statement `position`.

    Starts from the newest snapshot (current or kept in history) that holds nothing past `position`, then adds
    the postings between it and `position`.
    """
    params = {"account": account, "ledger": ledger, "txid": position.txid}
    base = (await conn.execute(_BASE_BEFORE, params)).first()
    start, base_horizon = (int(base.balance), int(base.horizon_text)) if base is not None else (0, 0)
    rest = await conn.scalar(
        _SUM_BETWEEN,
        {**params, "base": base_horizon, "entry_id": position.entry_id, "through_ledger": position.ledger},
    )
    return start + int(rest or 0)


async def statement(
    conn: AsyncConnection, account: str, *, after: StatementPosition | None, limit: int
) -> list[StatementLine]:
    """A page of the account's postings in feed order, each with the balance of its ledger right after it."""
    after = after or STATEMENT_START
    rows = (
        await conn.execute(
            _STATEMENT_PAGE,
            {
                "account": account,
                "horizon": await feed_horizon(conn),
                "txid": after.txid,
                "entry_id": after.entry_id,
                "ledger": after.ledger,
                "limit": limit,
            },
        )
    ).all()
    running: dict[str, int] = {}
    lines = []
    for row in rows:
        if row.ledger not in running:
            running[row.ledger] = await balance_through(conn, account, row.ledger, after)
        running[row.ledger] += row.amount
        lines.append(
            StatementLine(
                position=StatementPosition(int(row.txid_text), row.entry_id, row.ledger),
                entry_id=row.entry_id,
                kind=row.kind,
                created_at=row.created_at,
                ledger=row.ledger,
                amount=row.amount,
                balance_after=running[row.ledger],
            )
        )
    return lines


_CHECKPOINT_BEFORE = text(
    """
    SELECT h.balance, h.horizon::text AS horizon_text
      FROM balance_history h JOIN snapshot_runs r ON r.id = h.run_id
     WHERE h.account = :account AND h.ledger = :ledger AND r.taken_at <= :as_of
     ORDER BY r.id DESC LIMIT 1
    """
)

_CREATED_SINCE = text(
    """
    SELECT coalesce(sum(p.amount), 0)
      FROM postings p JOIN entries e ON e.id = p.entry_id
     WHERE p.account = :account AND p.ledger = :ledger AND p.txid >= CAST(:base AS xid8) AND e.created_at <= :as_of
    """
)


async def balance_as_of(conn: AsyncConnection, account: str, ledger: SubLedger, as_of: datetime) -> int:
    """The balance counting the postings of entries created at or before `as_of`.

    Starts from the last history checkpoint taken at or before `as_of` (every posting in it was created before
    the checkpoint's time, see db/snapshots.py) and adds the postings created between it and `as_of`.
    """
    params: dict[str, Any] = {"account": account, "ledger": str(ledger), "as_of": as_of}
    base = (await conn.execute(_CHECKPOINT_BEFORE, params)).first()
    start, base_horizon = (int(base.balance), int(base.horizon_text)) if base is not None else (0, 0)
    rest = await conn.scalar(_CREATED_SINCE, {**params, "base": base_horizon})
    return start + int(rest or 0)


# Trial balance ---------------------------------------------------------------------------------------------------

_TRIAL_BALANCE = text(
    """
    WITH since AS (SELECT coalesce(min(horizon), '0') AS horizon FROM kind_snapshots)
    SELECT ledger, kind, sum(amount) AS total FROM (
        SELECT ledger, kind, balance AS amount FROM kind_snapshots
        UNION ALL
        SELECT p.ledger, split_part(p.account, ':', 1), p.amount
          FROM postings p
          LEFT JOIN kind_snapshots k ON k.ledger = p.ledger AND k.kind = split_part(p.account, ':', 1)
         WHERE p.txid >= (SELECT horizon FROM since) AND p.txid >= coalesce(k.horizon, '0')
    ) parts
    GROUP BY ledger, kind ORDER BY ledger, kind
    """
)

_TRIAL_BALANCE_AS_OF = text(
    """
    SELECT p.ledger, split_part(p.account, ':', 1) AS kind, sum(p.amount) AS total
      FROM postings p JOIN entries e ON e.id = p.entry_id
     WHERE e.created_at <= :as_of
     GROUP BY 1, 2 ORDER BY 1, 2
    """
)


async def trial_balance(conn: AsyncConnection, as_of: datetime | None) -> dict[str, dict[str, int]]:
    """Sum of balances per ledger and account kind: now from the per-kind snapshots, or at a past instant."""
    if as_of is None:
        rows = await conn.execute(_TRIAL_BALANCE)
    else:
        rows = await conn.execute(_TRIAL_BALANCE_AS_OF, {"as_of": as_of})
    totals: dict[str, dict[str, int]] = {str(ledger): {} for ledger in SubLedger}
    for row in rows:
        totals.setdefault(row.ledger, {})[row.kind] = int(row.total)
    return totals


# Sealing ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BlockRow:
    id: int
    first: FeedPosition
    last: FeedPosition
    entry_count: int
    prev_hash: bytes
    hash: bytes


def _block(row: Any) -> BlockRow:
    return BlockRow(
        id=row.id,
        first=FeedPosition(int(row.first_txid), row.first_entry),
        last=FeedPosition(int(row.last_txid), row.last_entry),
        entry_count=row.entry_count,
        prev_hash=bytes(row.prev_hash),
        hash=bytes(row.hash),
    )


_BLOCK_COLUMNS = "id, first_txid::text, first_entry, last_txid::text, last_entry, entry_count, prev_hash, hash"


async def last_block(conn: AsyncConnection) -> BlockRow | None:
    row = (
        await conn.execute(text(f"SELECT {_BLOCK_COLUMNS} FROM blocks ORDER BY id DESC LIMIT 1"))  # noqa: S608
    ).first()
    return None if row is None else _block(row)


async def blocks(conn: AsyncConnection, *, after_id: int, limit: int) -> list[BlockRow]:
    rows = await conn.execute(
        text(f"SELECT {_BLOCK_COLUMNS} FROM blocks WHERE id > :after ORDER BY id LIMIT :limit"),  # noqa: S608
        {"after": after_id, "limit": limit},
    )
    return [_block(row) for row in rows]


async def entries_to_seal(
    conn: AsyncConnection, *, after: FeedPosition | None, horizon: int, limit: int
) -> list[SealedEntry]:
    after = after or FeedPosition(0, 0)
    rows = await conn.execute(
        text(
            "SELECT e.id, e.txid::text AS txid_text, e.created_at, e.hash FROM entries e"
            " WHERE e.txid < CAST(:horizon AS xid8) AND (e.txid, e.id) > (CAST(:txid AS xid8), :entry_id)"
            " ORDER BY e.txid, e.id LIMIT :limit"
        ),
        {"horizon": horizon, "txid": after.txid, "entry_id": after.entry_id, "limit": limit},
    )
    return [SealedEntry(FeedPosition(int(r.txid_text), r.id), r.created_at, bytes(r.hash)) for r in rows]


async def insert_block(
    conn: AsyncConnection, entries: Sequence[SealedEntry], *, prev_hash: bytes, block_hash: bytes
) -> None:
    await conn.execute(
        text(
            "INSERT INTO blocks (first_txid, first_entry, last_txid, last_entry, entry_count, prev_hash, hash)"
            " VALUES (CAST(:first_txid AS xid8), :first_entry, CAST(:last_txid AS xid8), :last_entry, :n,"
            " :prev_hash, :hash)"
        ),
        {
            "first_txid": entries[0].position.txid,
            "first_entry": entries[0].position.entry_id,
            "last_txid": entries[-1].position.txid,
            "last_entry": entries[-1].position.entry_id,
            "n": len(entries),
            "prev_hash": prev_hash,
            "hash": block_hash,
        },
    )


# Usage report ----------------------------------------------------------------------------------------------------

USAGE_KEYS = {
    "channel": "e.channel_id::text",
    "user": "e.user_id::text",
    "token": "e.token_id::text",
    "model": "e.details->>'model'",
}
USAGE_BUCKETS = {
    "hour": "date_trunc('hour', e.created_at, 'UTC')",
    "day": "date_trunc('day', e.created_at, 'UTC')",
    "none": "CAST(NULL AS timestamptz)",
}


@dataclass(frozen=True, slots=True)
class UsageRow:
    key: str
    bucket_start: datetime | None
    requests: int
    prompt_tokens: int
    completion_tokens: int
    quota: int


async def usage_report(
    conn: AsyncConnection, *, group_by: str, bucket: str, created_from: datetime | None, created_to: datetime | None
) -> list[UsageRow]:
    """Charges (settle, consume) net of their reversals, grouped by a key and a time bucket (UTC)."""
    clauses = ["e.charged IS NOT NULL"]
    params: dict[str, Any] = {}
    if created_from is not None:
        clauses.append("e.created_at >= :created_from")
        params["created_from"] = created_from
    if created_to is not None:
        clauses.append("e.created_at < :created_to")
        params["created_to"] = created_to
    sql = f"""
        SELECT {USAGE_KEYS[group_by]} AS key, {USAGE_BUCKETS[bucket]} AS bucket_start,
               count(*) FILTER (WHERE e.kind <> 'reversal') - count(*) FILTER (WHERE e.kind = 'reversal') AS requests,
               coalesce(sum((e.details->>'prompt_tokens')::bigint), 0) AS prompt_tokens,
               coalesce(sum((e.details->>'completion_tokens')::bigint), 0) AS completion_tokens,
               sum(e.charged) AS quota
          FROM entries e
         WHERE {" AND ".join(clauses)}
         GROUP BY 1, 2
         ORDER BY 2 NULLS FIRST, 1
    """  # noqa: S608 - the key, bucket and clauses come from the fixed tables above
    rows = await conn.execute(text(sql), params)
    return [
        UsageRow(
            key=str(row.key),
            bucket_start=row.bucket_start,
            requests=int(row.requests),
            prompt_tokens=int(row.prompt_tokens),
            completion_tokens=int(row.completion_tokens),
            quota=int(row.quota),
        )
        for row in rows
    ]
