"""Import runs, what each run saw in the relay, and the ledger-side state an import decides from, in bulk.

Every read here takes a page of ids (a few thousand) and answers in one round trip: an import of 100,000 users is
a few dozen transactions, not 100,000 requests.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import bindparam, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncConnection

from ledger_service.domain.relay_import import LedgerToken, SeenToken


async def start_run(conn: AsyncConnection, source_id: str, relay_kind: str, source_url: str) -> int:
    run_id = await conn.scalar(
        text(
            "INSERT INTO relay_import_runs (source_id, relay_kind, source_url) VALUES (:source_id, :kind, :url)"
            " RETURNING id"
        ),
        {"source_id": source_id, "kind": relay_kind, "url": source_url},
    )
    return int(run_id)


async def finish_run(conn: AsyncConnection, run_id: int, summary: dict[str, Any]) -> None:
    await conn.execute(
        text("UPDATE relay_import_runs SET finished_at = now(), summary = :summary WHERE id = :id").bindparams(
            bindparam("summary", type_=JSONB)
        ),
        {"id": run_id, "summary": summary},
    )


async def lock_users(conn: AsyncConnection, user_ids: Sequence[int]) -> None:
    """The users' balance locks (locks.lock_user's keys), in ascending order as the lifecycle takes them."""
    await conn.execute(
        text(
            "SELECT pg_advisory_xact_lock(hashtextextended('user:' || u, 0))"
            " FROM (SELECT DISTINCT u FROM unnest(CAST(:ids AS bigint[])) AS u ORDER BY u) locked"
        ),
        {"ids": list(user_ids)},
    )


async def seen_users(conn: AsyncConnection, source_id: str, user_ids: Sequence[int]) -> dict[int, int]:
    rows = await conn.execute(
        text(
            "SELECT relay_id, quota FROM relay_import_balances"
            " WHERE source_id = :source_id AND subject = 'user' AND relay_id = ANY(CAST(:ids AS bigint[]))"
        ),
        {"source_id": source_id, "ids": list(user_ids)},
    )
    return {row.relay_id: row.quota for row in rows}


async def seen_tokens(conn: AsyncConnection, source_id: str, token_ids: Sequence[int]) -> dict[int, SeenToken]:
    rows = await conn.execute(
        text(
            "SELECT relay_id, quota, unlimited FROM relay_import_balances"
            " WHERE source_id = :source_id AND subject = 'token' AND relay_id = ANY(CAST(:ids AS bigint[]))"
        ),
        {"source_id": source_id, "ids": list(token_ids)},
    )
    return {row.relay_id: SeenToken(remain_quota=row.quota, unlimited=row.unlimited) for row in rows}


_USER_TOTALS = text(
    """
    SELECT u.id, ledger_balance('user:' || u.id, 'quota') + coalesce(h.held, 0) AS total
      FROM unnest(CAST(:ids AS bigint[])) AS u(id)
      LEFT JOIN (SELECT user_id, sum(amount) AS held FROM requests
                  WHERE status = 'open' AND user_id = ANY(CAST(:ids AS bigint[])) GROUP BY user_id) h
             ON h.user_id = u.id
    """
)


async def user_totals(conn: AsyncConnection, user_ids: Sequence[int]) -> dict[int, int]:
    """Each user's available + held: the balance a relay's `quota` is compared with."""
    rows = await conn.execute(_USER_TOTALS, {"ids": list(user_ids)})
    return {row.id: int(row.total) for row in rows}


_LEDGER_TOKENS = text(
    """
    SELECT t.token_id, t.user_id, t.unlimited, ledger_balance('token:' || t.token_id, 'allowance') AS allowance
      FROM tokens t WHERE t.token_id = ANY(CAST(:ids AS bigint[]))
    """
)


async def ledger_tokens(conn: AsyncConnection, token_ids: Sequence[int]) -> dict[int, LedgerToken]:
    rows = await conn.execute(_LEDGER_TOKENS, {"ids": list(token_ids)})
    return {
        row.token_id: LedgerToken(user_id=row.user_id, unlimited=row.unlimited, allowance=int(row.allowance))
        for row in rows
    }


async def register_tokens(conn: AsyncConnection, tokens: Sequence[tuple[int, int, bool]]) -> set[int]:
    """Insert or update (token_id, user_id, unlimited); returns the ids written. A token registered to another user
    in the meantime is left alone and missing from the answer, as tokens.save does for one."""
    if not tokens:
        return set()
    rows = await conn.execute(
        text(
            """
            INSERT INTO tokens (token_id, user_id, unlimited)
            SELECT * FROM unnest(CAST(:ids AS bigint[]), CAST(:users AS bigint[]), CAST(:unlimited AS boolean[]))
            ON CONFLICT (token_id) DO UPDATE SET unlimited = excluded.unlimited, updated_at = now()
             WHERE tokens.user_id = excluded.user_id
            RETURNING token_id
            """
        ),
        {"ids": [t[0] for t in tokens], "users": [t[1] for t in tokens], "unlimited": [t[2] for t in tokens]},
    )
    return {row.token_id for row in rows}


async def remember(
    conn: AsyncConnection,
    source_id: str,
    run_id: int,
    subject: str,
    seen: Sequence[tuple[int, int, bool | None]],
) -> None:
    """Record (relay_id, quota, unlimited) as what this run saw, replacing what an earlier run saw."""
    if not seen:
        return
    await conn.execute(
        text(
            """
            INSERT INTO relay_import_balances (source_id, subject, relay_id, quota, unlimited, run_id)
            SELECT :source_id, :subject, s.relay_id, s.quota, s.unlimited, :run_id
              FROM unnest(CAST(:ids AS bigint[]), CAST(:quotas AS bigint[]), CAST(:unlimited AS boolean[]))
                   AS s(relay_id, quota, unlimited)
            ON CONFLICT (source_id, subject, relay_id)
            DO UPDATE SET quota = excluded.quota, unlimited = excluded.unlimited, run_id = excluded.run_id
            """
        ),
        {
            "source_id": source_id,
            "subject": subject,
            "run_id": run_id,
            "ids": [s[0] for s in seen],
            "quotas": [s[1] for s in seen],
            "unlimited": [s[2] for s in seen],
        },
    )
