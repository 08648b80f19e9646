"""Writing entries with their postings, and reading balances, usage and entries back.

A balance is never stored as a mutable number. It is read as the account's snapshot row (the sum of its
postings below the row's transaction horizon) plus the account's postings at or above that horizon.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import LargeBinary, bindparam, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from ledger_service.domain.accounts import SubLedger
from ledger_service.domain.canonical import canonical_json
from ledger_service.domain.entries import EntryDraft
from ledger_service.schemas import EntryView, PostingView


@dataclass(frozen=True, slots=True)
class StoredEntry:
    id: int
    created_at: datetime


_INSERT_ENTRY = text(
    """
    WITH entry AS (
        INSERT INTO entries (kind, request_id, user_id, token_id, channel_id, reference, fingerprint, reverses,
                             charged, details, hash)
        VALUES (:kind, :request_id, :user_id, :token_id, :channel_id, :reference, :fingerprint, :reverses,
                :charged, :details, :hash)
        RETURNING id, created_at
    ), posted AS (
        INSERT INTO postings (entry_id, ledger, account, amount)
        SELECT entry.id, p.ledger, p.account, p.amount
          FROM entry, unnest(CAST(:ledgers AS text[]), CAST(:accounts AS text[]), CAST(:amounts AS bigint[]))
               AS p(ledger, account, amount)
    )
    SELECT id, created_at FROM entry
    """
).bindparams(bindparam("details", type_=JSONB), bindparam("fingerprint", type_=LargeBinary))


async def insert_entry(
    conn: AsyncConnection, draft: EntryDraft, *, charged: int | None = None, fingerprint: bytes | None = None
) -> StoredEntry:
    """Insert a balanced draft and its postings, in one statement. The database re-checks the balance."""
    row = (
        await conn.execute(
            _INSERT_ENTRY,
            {
                "kind": str(draft.kind),
                "request_id": draft.request_id,
                "user_id": draft.user_id,
                "token_id": draft.token_id,
                "channel_id": draft.channel_id,
                "reference": draft.reference,
                "fingerprint": fingerprint,
                "reverses": draft.reverses,
                "charged": charged,
                "details": dict(draft.details),
                "hash": draft.content_hash(),
                "ledgers": [str(p.ledger) for p in draft.postings],
                "accounts": [p.account for p in draft.postings],
                "amounts": [p.amount for p in draft.postings],
            },
        )
    ).one()
    return StoredEntry(id=row.id, created_at=row.created_at)


_INSERT_REFERENCED_ENTRIES = text(
    """
    WITH entry AS (
        INSERT INTO entries (kind, user_id, token_id, reference, details, hash)
        SELECT e.kind, e.user_id, e.token_id, e.reference, CAST(e.details AS jsonb), e.hash
          FROM unnest(CAST(:kinds AS text[]), CAST(:user_ids AS bigint[]), CAST(:token_ids AS bigint[]),
                      CAST(:references AS text[]), CAST(:details AS text[]), CAST(:hashes AS bytea[]))
               AS e(kind, user_id, token_id, reference, details, hash)
        RETURNING id, reference
    )
    INSERT INTO postings (entry_id, ledger, account, amount)
    SELECT entry.id, p.ledger, p.account, p.amount
      FROM unnest(CAST(:posting_references AS text[]), CAST(:ledgers AS text[]), CAST(:accounts AS text[]),
                  CAST(:amounts AS bigint[])) AS p(reference, ledger, account, amount)
      JOIN entry USING (reference)
    """
)


async def insert_referenced_entries(conn: AsyncConnection, drafts: Sequence[EntryDraft]) -> None:
    """Insert many drafts, each with its own reference, in one statement (bulk imports).

    The references tie each posting to its entry inside the statement; a reference used before fails the whole
    statement on the unique constraint, as one insert_entry would. Only funding-shaped drafts fit: no request,
    channel, charge, fingerprint or reversal.
    """
    if not drafts:
        return
    assert all(d.reference and d.request_id is None and d.reverses is None for d in drafts)
    postings = [(draft.reference, posting) for draft in drafts for posting in draft.postings]
    await conn.execute(
        _INSERT_REFERENCED_ENTRIES,
        {
            "kinds": [str(d.kind) for d in drafts],
            "user_ids": [d.user_id for d in drafts],
            "token_ids": [d.token_id for d in drafts],
            "references": [d.reference for d in drafts],
            "details": [canonical_json(dict(d.details)).decode() for d in drafts],
            "hashes": [d.content_hash() for d in drafts],
            "posting_references": [reference for reference, _ in postings],
            "ledgers": [str(p.ledger) for _, p in postings],
            "accounts": [p.account for _, p in postings],
            "amounts": [p.amount for _, p in postings],
        },
    )


_LATEST_HORIZON = "(SELECT coalesce(max(horizon), '0'::xid8) FROM snapshot_runs)"
"""Where a subject with no usage snapshot row starts: having no row, it had nothing below this horizon."""


def balance_expression(account: str, ledger: str) -> str:
    """SQL for one balance: the account's snapshot row plus its postings at or above the row's horizon.

    `account` and `ledger` are SQL expressions (bind parameters or columns). Every balance the service reads is
    the database function `ledger_balance` (migration 0003), so there is one definition of what a balance is.
    """
    return f"ledger_balance(CAST({account} AS text), CAST({ledger} AS text))"


_BALANCES = text(
    f"""
    SELECT a.account, a.ledger, {balance_expression("a.account", "a.ledger")} AS balance
      FROM unnest(CAST(:accounts AS text[]), CAST(:ledgers AS text[])) AS a(account, ledger)
    """  # noqa: S608 - fixed fragments
)


async def balances(conn: AsyncConnection, wanted: Iterable[tuple[str, SubLedger]]) -> dict[tuple[str, SubLedger], int]:
    """Current balances of several (account, ledger) pairs in one round trip; unknown accounts read 0."""
    pairs = list(wanted)
    if not pairs:
        return {}
    result = await conn.execute(
        _BALANCES, {"accounts": [a for a, _ in pairs], "ledgers": [str(ledger) for _, ledger in pairs]}
    )
    return {(row.account, SubLedger(row.ledger)): int(row.balance) for row in result}


async def balance(conn: AsyncConnection, account: str, ledger: SubLedger) -> int:
    return (await balances(conn, [(account, ledger)]))[(account, ledger)]


_USAGE = {
    column: text(
        f"""
        SELECT coalesce(s.used, 0) + coalesce(d.used, 0) AS used,
               (coalesce(s.request_count, 0) + coalesce(d.requests, 0))::bigint AS request_count
          FROM (SELECT CAST(:subject AS text) AS subject) q
          LEFT JOIN usage_snapshots s ON s.subject = q.subject
          LEFT JOIN LATERAL (
                SELECT sum(e.charged) AS used,
                       count(*) FILTER (WHERE e.kind <> 'reversal')
                       - count(*) FILTER (WHERE e.kind = 'reversal') AS requests
                  FROM entries e
                 WHERE e.{column} = :subject_id AND e.charged IS NOT NULL
                   AND e.txid >= coalesce(s.horizon, {_LATEST_HORIZON})
          ) d ON true
        """  # noqa: S608 - the column name comes from the fixed set below, never from input
    )
    for column in ("user_id", "token_id", "channel_id")
}


async def usage(conn: AsyncConnection, kind: str, subject_id: int) -> tuple[int, int]:
    """(used, request_count) of a user, token or channel: its charges net of reversals, snapshot plus the rest."""
    row = (
        await conn.execute(_USAGE[f"{kind}_id"], {"subject": f"{kind}:{subject_id}", "subject_id": subject_id})
    ).one()
    return int(row.used), int(row.request_count)


ENTRY_COLUMNS = """
    e.id, e.kind, e.request_id, e.user_id, e.token_id, e.channel_id, e.created_at, e.details, e.reverses,
    e.reference, e.hash, e.fingerprint
"""


async def with_postings(conn: AsyncConnection, rows: Sequence[RowMapping]) -> list[EntryView]:
    ids = [row["id"] for row in rows]
    postings: dict[int, list[PostingView]] = {entry_id: [] for entry_id in ids}
    if ids:
        result = await conn.execute(
            text(
                "SELECT entry_id, ledger, account, amount FROM postings"
                " WHERE entry_id = ANY(CAST(:ids AS bigint[])) ORDER BY entry_id, ledger, account"
            ),
            {"ids": ids},
        )
        for p in result:
            postings[p.entry_id].append(PostingView(ledger=p.ledger, account=p.account, amount=p.amount))
    return [entry_view(row, postings[row["id"]]) for row in rows]


def entry_view(row: RowMapping, postings: list[PostingView]) -> EntryView:
    details: dict[str, Any] = row["details"]
    return EntryView(
        id=row["id"],
        kind=row["kind"],
        request_id=row["request_id"],
        user_id=row["user_id"],
        token_id=row["token_id"],
        channel_id=row["channel_id"],
        created_at=row["created_at"],
        postings=postings,
        details=details,
        reverses=row["reverses"],
        reference=row["reference"],
        hash=bytes(row["hash"]).hex(),
    )


async def entries_of_request(conn: AsyncConnection, request_id: str) -> list[EntryView]:
    rows = (
        (
            await conn.execute(
                text(f"SELECT {ENTRY_COLUMNS} FROM entries e WHERE e.request_id = :request_id ORDER BY e.id"),  # noqa: S608
                {"request_id": request_id},
            )
        )
        .mappings()
        .all()
    )
    return await with_postings(conn, rows)


async def get_entry(conn: AsyncConnection, entry_id: int) -> EntryView | None:
    rows = (
        (
            await conn.execute(text(f"SELECT {ENTRY_COLUMNS} FROM entries e WHERE e.id = :id"), {"id": entry_id})  # noqa: S608
        )
        .mappings()
        .all()
    )
    found = await with_postings(conn, rows)
    return found[0] if found else None


async def entry_by_reference(conn: AsyncConnection, reference: str) -> tuple[EntryView, bytes | None] | None:
    """The entry a reference (idempotency key of top-ups, adjustments and reversals) created, with its fingerprint."""
    rows = (
        (
            await conn.execute(
                text(f"SELECT {ENTRY_COLUMNS} FROM entries e WHERE e.reference = :reference"),  # noqa: S608
                {"reference": reference},
            )
        )
        .mappings()
        .all()
    )
    if not rows:
        return None
    fingerprint = rows[0]["fingerprint"]
    return (await with_postings(conn, rows))[0], None if fingerprint is None else bytes(fingerprint)


async def reversal_of(conn: AsyncConnection, entry_id: int) -> int | None:
    """The id of the entry that reverses `entry_id`, if any."""
    found = await conn.scalar(text("SELECT id FROM entries WHERE reverses = :id"), {"id": entry_id})
    return None if found is None else int(found)


async def charge_of(conn: AsyncConnection, entry_id: int) -> int | None:
    """What an entry charged (settle, consume), or None for entries that are not charges."""
    found = await conn.scalar(text("SELECT charged FROM entries WHERE id = :id"), {"id": entry_id})
    return None if found is None else int(found)
