"""The queries behind the reconciliation report: each finds the offenders against one rule of the books.

Every query recomputes from the journal (entries and postings), never from a derived table, and compares. They
scan whole tables: this is an audit, run on demand, not on the write path.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from ledger_service.domain.accounts import SubLedger
from ledger_service.domain.audit import FeedPosition
from ledger_service.domain.entries import Posting, content_hash

OFFENDER_LIMIT = 50
"""At most this many offenders are listed per check (the count is always exact)."""


@dataclass(frozen=True, slots=True)
class Findings:
    count: int
    offenders: list[str]


async def _findings(conn: AsyncConnection, sql: str, params: dict[str, Any] | None = None) -> Findings:
    """Run an offender query (one text column, `offender`) and count it without materializing it all."""
    count = int(await conn.scalar(text(f"SELECT count(*) FROM ({sql}) found"), params or {}) or 0)  # noqa: S608
    if count == 0:  # the usual answer: the listing would scan the whole journal again to find nothing
        return Findings(0, [])
    rows = await conn.execute(text(f"SELECT offender FROM ({sql}) found LIMIT {OFFENDER_LIMIT}"), params or {})  # noqa: S608
    return Findings(count, [row.offender for row in rows])


async def unbalanced_entries(conn: AsyncConnection) -> Findings:
    return await _findings(
        conn,
        """SELECT format('entry %s: %s postings sum to %s', entry_id, ledger, sum(amount)) AS offender
             FROM postings GROUP BY entry_id, ledger HAVING sum(amount) <> 0""",
    )


async def snapshot_mismatches(conn: AsyncConnection) -> Findings:
    return await _findings(
        conn,
        """
        SELECT format('balance snapshot %s/%s: %s, postings below its horizon: %s',
                      s.account, s.ledger, s.balance, coalesce(p.total, 0)) AS offender
          FROM balance_snapshots s
          LEFT JOIN LATERAL (SELECT sum(amount) AS total FROM postings
                              WHERE account = s.account AND ledger = s.ledger AND txid < s.horizon) p ON true
         WHERE s.balance <> coalesce(p.total, 0)
        UNION ALL
        SELECT format('kind snapshot %s/%s: %s, postings below its horizon: %s',
                      k.ledger, k.kind, k.balance, coalesce(p.total, 0))
          FROM kind_snapshots k
          LEFT JOIN LATERAL (SELECT sum(amount) AS total FROM postings
                              WHERE ledger = k.ledger AND split_part(account, ':', 1) = k.kind
                                AND txid < k.horizon) p ON true
         WHERE k.balance <> coalesce(p.total, 0)
        UNION ALL
        SELECT format('usage snapshot %s: used %s in %s requests, entries say %s in %s',
                      u.subject, u.used, u.request_count, coalesce(t.used, 0), coalesce(t.requests, 0))
          FROM usage_snapshots u
          -- The charges summed per subject in one pass over the journal, as the snapshot refresh sums them
          -- (db/snapshots.py), joined by hash: a lookup per snapshot row read the journal once per subject.
          LEFT JOIN (
                SELECT s.subject, sum(e.charged) AS used,
                       count(*) FILTER (WHERE e.kind <> 'reversal') - count(*) FILTER (WHERE e.kind = 'reversal')
                           AS requests
                  FROM entries e
                 CROSS JOIN LATERAL (VALUES ('user:' || e.user_id), ('token:' || e.token_id),
                                            ('channel:' || e.channel_id)) AS x(subject)
                  JOIN usage_snapshots s ON s.subject = x.subject AND e.txid < s.horizon
                 WHERE e.charged IS NOT NULL
                 GROUP BY s.subject
          ) t ON t.subject = u.subject
         WHERE u.used <> coalesce(t.used, 0) OR u.request_count <> coalesce(t.requests, 0)
        """,
    )


async def uncleared_holds(conn: AsyncConnection) -> Findings:
    return await _findings(
        conn,
        """
        SELECT format('hold %s (%s, amount %s): hold account holds %s quota and %s allowance',
                      r.request_id, r.status, r.amount, coalesce(q.total, 0), coalesce(a.total, 0)) AS offender
          FROM requests r
          LEFT JOIN LATERAL (SELECT sum(amount) AS total FROM postings
                              WHERE account = 'hold:' || r.request_id AND ledger = 'quota') q ON true
          LEFT JOIN LATERAL (SELECT sum(amount) AS total FROM postings
                              WHERE account = 'hold:' || r.request_id AND ledger = 'allowance') a ON true
         WHERE CASE WHEN r.status = 'open'
                    THEN coalesce(q.total, 0) <> r.amount
                         OR coalesce(a.total, 0) <> CASE WHEN r.token_limited THEN r.amount ELSE 0 END
                    ELSE coalesce(q.total, 0) <> 0 OR coalesce(a.total, 0) <> 0
               END
        UNION ALL
        SELECT format('hold account %s has postings but no request', p.account)
          FROM (SELECT DISTINCT account FROM postings WHERE account LIKE 'hold:%') p
         WHERE NOT EXISTS (SELECT 1 FROM requests r WHERE 'hold:' || r.request_id = p.account)
        """,
    )


async def overdue_holds(conn: AsyncConnection, *, grace_seconds: float) -> Findings:
    return await _findings(
        conn,
        """SELECT format('hold %s expired at %s and is still open', request_id,
                          to_char(expires_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')) AS offender
             FROM requests
            WHERE status = 'open' AND expires_at < now() - make_interval(secs => :grace)""",
        {"grace": grace_seconds},
    )


async def stalled_background_jobs(conn: AsyncConnection, *, grace_seconds: float) -> Findings:
    """Entries older than the grace that the snapshot refresh, or the sealing after it, has not taken in: the
    background round keeps failing (or no process runs it). Read from the tables, so it sees every process's rounds;
    an idle ledger has nothing outstanding and passes."""
    return await _findings(
        conn,
        """
        SELECT format('%s entries, the oldest created at %s, are not in the snapshots: is the refresh failing?',
                      count(*), min(created_at)) AS offender
          FROM entries
         WHERE txid >= (SELECT coalesce(max(horizon), '0') FROM snapshot_runs)
           AND created_at < now() - make_interval(secs => :grace)
        HAVING count(*) > 0
        UNION ALL
        SELECT format('%s entries, the oldest created at %s, are not sealed: is sealing failing?',
                      count(*), min(created_at))
          FROM entries
         WHERE (txid, id) > coalesce((SELECT (last_txid, last_entry) FROM blocks ORDER BY id DESC LIMIT 1),
                                     ('0'::xid8, 0))
           AND created_at < now() - make_interval(secs => :grace)
        HAVING count(*) > 0
        """,
        {"grace": grace_seconds},
    )


async def requests_disagreeing_with_entries(conn: AsyncConnection) -> Findings:
    """Each request's state (in `requests`) against its entries (the journal)."""
    return await _findings(
        conn,
        """
        SELECT format('request %s is %s with charge %s, its charge entries say %s (%s entries)',
                      r.request_id, r.status, r.charged, c.charged, coalesce(c.n, 0)) AS offender
          FROM requests r
          LEFT JOIN LATERAL (SELECT count(*) AS n, sum(charged) AS charged FROM entries
                              WHERE request_id = r.request_id AND kind IN ('settle', 'consume')) c ON true
         WHERE (r.status = 'settled') <> (coalesce(c.n, 0) = 1)
            OR (r.status = 'settled' AND r.charged IS DISTINCT FROM c.charged)
        UNION ALL
        SELECT format('request %s is %s, but has %s refund/expire entries (amount %s)',
                      r.request_id, r.status, x.n, r.amount)
          FROM requests r
          JOIN LATERAL (SELECT count(*) AS n FROM entries
                         WHERE request_id = r.request_id AND kind IN ('refund', 'expire')) x ON true
         WHERE x.n > 1 OR (r.status = 'open' AND x.n > 0)
            OR (r.status IN ('refunded', 'expired') AND r.amount > 0 AND x.n <> 1)
        UNION ALL
        SELECT format('%s entry %s names request %s, which does not exist', e.kind, e.id, e.request_id)
          FROM entries e
         WHERE e.kind IN ('hold', 'settle', 'refund', 'expire', 'consume')
           AND NOT EXISTS (SELECT 1 FROM requests r WHERE r.request_id = e.request_id)
        """,
    )


async def summaries_disagreeing_with_entries(conn: AsyncConnection) -> Findings:
    """Channel usage against channel balances, and held amounts against the hold accounts behind them."""
    return await _findings(
        conn,
        """
        SELECT format('channel %s: used %s by its charges, but its account holds %s',
                      coalesce(u.channel_id, b.channel_id), coalesce(u.used, 0), coalesce(b.balance, 0)) AS offender
          FROM (SELECT channel_id, sum(charged) AS used FROM entries
                 WHERE charged IS NOT NULL GROUP BY channel_id) u
          FULL JOIN (SELECT split_part(account, ':', 2)::bigint AS channel_id, sum(amount) AS balance
                       FROM postings WHERE account LIKE 'channel:%' AND ledger = 'quota' GROUP BY 1) b
            ON b.channel_id = u.channel_id
         WHERE coalesce(u.used, 0) <> coalesce(b.balance, 0)
        UNION ALL
        SELECT format('%s %s: held %s by its open holds, its hold accounts hold %s', kind, id, held, in_accounts)
          FROM (
                SELECT 'user' AS kind, r.user_id AS id, sum(r.amount) AS held, sum(coalesce(q.total, 0)) AS in_accounts
                  FROM requests r
                  LEFT JOIN LATERAL (SELECT sum(amount) AS total FROM postings
                                      WHERE account = 'hold:' || r.request_id AND ledger = 'quota') q ON true
                 WHERE r.status = 'open' GROUP BY r.user_id
                UNION ALL
                SELECT 'token', r.token_id, sum(r.amount), sum(coalesce(q.total, 0))
                  FROM requests r
                  LEFT JOIN LATERAL (SELECT sum(amount) AS total FROM postings
                                      WHERE account = 'hold:' || r.request_id AND ledger = 'quota') q ON true
                 WHERE r.status = 'open' GROUP BY r.token_id
          ) held
         WHERE held <> in_accounts
        """,
    )


# The hash chain: walked in Python, batch by batch, because it recomputes SHA-256 over every entry. -------------


@dataclass(frozen=True, slots=True)
class JournalEntry:
    position: FeedPosition
    created_at: datetime
    stored_hash: bytes
    computed_hash: bytes


# One page of entries in feed order, each with its postings. The page is cut from `entries` first (an index range
# scan on entries_by_txid that stops at the limit), and each entry's postings are then found by its key. Grouping a
# join of entries and postings instead would aggregate every entry after the position before the limit applies:
# each page would cost as much as the rest of the journal, and the whole walk would grow with its square.
ENTRY_PAGE = text(
    """
    SELECT e.id, e.txid::text AS txid_text, e.created_at, e.hash, e.kind, e.request_id, e.user_id, e.token_id,
           e.channel_id, e.reference, e.reverses, e.details,
           coalesce((SELECT json_agg(json_build_array(p.ledger, p.account, p.amount))
                       FROM postings p WHERE p.entry_id = e.id), '[]') AS postings
      FROM entries e
     WHERE (e.txid, e.id) > (CAST(:txid AS xid8), :entry_id)
     ORDER BY e.txid, e.id
     LIMIT :limit
    """
)


async def journal_in_feed_order(conn: AsyncConnection, *, batch: int = 2000) -> AsyncIterator[list[JournalEntry]]:
    """Every entry, in feed order, with its stored hash and the hash recomputed from what is stored now."""
    after = FeedPosition(0, 0)
    while True:
        rows = (await conn.execute(ENTRY_PAGE, {"txid": after.txid, "entry_id": after.entry_id, "limit": batch})).all()
        if not rows:
            return
        found = []
        for row in rows:
            postings = json.loads(row.postings) if isinstance(row.postings, str) else row.postings
            computed = content_hash(
                kind=row.kind,
                request_id=row.request_id,
                user_id=row.user_id,
                token_id=row.token_id,
                channel_id=row.channel_id,
                reference=row.reference,
                reverses=row.reverses,
                details=row.details,
                postings=[Posting(SubLedger(ledger), account, amount) for ledger, account, amount in postings],
            )
            found.append(
                JournalEntry(FeedPosition(int(row.txid_text), row.id), row.created_at, bytes(row.hash), computed)
            )
        yield found
        after = found[-1].position
