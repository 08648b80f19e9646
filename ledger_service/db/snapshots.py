"""Refreshing the materialized snapshots of balances and usage, incrementally, by transaction horizon.

Why a horizon and not the last posting id: ids (and the txid of a writer) are handed out when a row is inserted,
but rows become visible when their transaction commits, in any order. "Everything up to id N" can therefore
miss a row with a lower id that commits later. Instead each refresh takes

    horizon = pg_snapshot_xmin(pg_current_snapshot())

the oldest transaction still running. Every transaction with a smaller id has finished, and every transaction
that starts later gets a larger id, so the set of rows with `txid < horizon` is final: nothing can join it. A
refresh adds the rows with `previous horizon <= txid < horizon` to the snapshot rows and records the horizon; a
reader adds the rows with `txid >= row horizon` (see journal.balances). No row is counted twice or missed.

Hold accounts are not snapshotted: each has at most four postings in its life, so a read sums them directly.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from ledger_service.db import locks

RUN_RETENTION_SECONDS = 3600
"""How long a run that is not a checkpoint is kept (for inspection) before it is pruned."""


@dataclass(frozen=True, slots=True)
class SnapshotRun:
    horizon: int
    accounts_changed: int
    subjects_changed: int


_BALANCE_DELTA = text(
    """
    INSERT INTO balance_snapshots AS s (account, ledger, balance, postings, horizon)
    SELECT account, ledger, sum(amount), count(*), CAST(:horizon AS xid8)
      FROM postings
     WHERE txid >= CAST(:previous AS xid8) AND txid < CAST(:horizon AS xid8)
       AND account NOT LIKE 'hold:%'
     GROUP BY account, ledger
    ON CONFLICT (account, ledger) DO UPDATE
       SET balance = s.balance + excluded.balance,
           postings = s.postings + excluded.postings,
           horizon = excluded.horizon
    """
)

_USAGE_DELTA = text(
    """
    INSERT INTO usage_snapshots AS s (subject, used, request_count, horizon)
    SELECT subject, sum(e.charged),
           count(*) FILTER (WHERE e.kind <> 'reversal') - count(*) FILTER (WHERE e.kind = 'reversal'),
           CAST(:horizon AS xid8)
      FROM entries e
     CROSS JOIN LATERAL (VALUES ('user:' || e.user_id), ('token:' || e.token_id), ('channel:' || e.channel_id))
           AS subjects(subject)
     WHERE e.txid >= CAST(:previous AS xid8) AND e.txid < CAST(:horizon AS xid8)
       AND e.charged IS NOT NULL
     GROUP BY subject
    ON CONFLICT (subject) DO UPDATE
       SET used = s.used + excluded.used,
           request_count = s.request_count + excluded.request_count,
           horizon = excluded.horizon
    """
)

_KIND_DELTA = text(
    """
    INSERT INTO kind_snapshots AS s (ledger, kind, balance, horizon)
    SELECT ledger, split_part(account, ':', 1), sum(amount), CAST(:horizon AS xid8)
      FROM postings
     WHERE txid >= CAST(:previous AS xid8) AND txid < CAST(:horizon AS xid8)
     GROUP BY 1, 2
    ON CONFLICT (ledger, kind) DO UPDATE SET balance = s.balance + excluded.balance, horizon = excluded.horizon
    """
)

_LAST_CHECKPOINT = text(
    """
    SELECT coalesce(max(horizon), '0')::text AS horizon_text,
           coalesce(bool_and(taken_at > now() - make_interval(secs => :every)), false) AS recent
      FROM snapshot_runs WHERE checkpoint AND id = (SELECT max(id) FROM snapshot_runs WHERE checkpoint)
    """
)

_KEEP_HISTORY = text(
    """
    INSERT INTO balance_history (run_id, account, ledger, balance, horizon)
    SELECT :run_id, account, ledger, balance, horizon
      FROM balance_snapshots WHERE horizon > CAST(:since AS xid8)
    """
)


async def refresh(conn: AsyncConnection, *, checkpoint_every: float = 3600.0) -> SnapshotRun | None:
    """Bring every snapshot up to the current horizon. None when another process holds the snapshot lock.

    Run it in READ COMMITTED: the lock is taken by the first statement, and every statement after it takes a
    fresh snapshot, so the previous horizon read here is the one the last refresh committed (under REPEATABLE
    READ the snapshot would date from before the lock was granted) and every transaction below the new horizon,
    all finished, is visible to the statements that sum them.

    At most every `checkpoint_every` seconds the run is a checkpoint: the rows changed since the last checkpoint
    are copied to balance_history, where balances at past instants start from.
    """
    if not await locks.try_lock_snapshots(conn):
        return None
    # Every transaction below the horizon started before this clock reading: a run's time bounds its contents.
    now = (
        await conn.execute(
            text("SELECT pg_snapshot_xmin(pg_current_snapshot())::text AS horizon_text, clock_timestamp() AS clock")
        )
    ).one()
    horizon = int(now.horizon_text)
    previous = int(await conn.scalar(text("SELECT coalesce(max(horizon), '0')::text FROM snapshot_runs")) or 0)
    if horizon <= previous:
        return SnapshotRun(horizon=previous, accounts_changed=0, subjects_changed=0)
    params = {"previous": previous, "horizon": horizon}
    accounts_changed = (await conn.execute(_BALANCE_DELTA, params)).rowcount
    subjects_changed = (await conn.execute(_USAGE_DELTA, params)).rowcount
    await conn.execute(_KIND_DELTA, params)
    last = (await conn.execute(_LAST_CHECKPOINT, {"every": checkpoint_every})).one()
    checkpoint = not last.recent
    run_id = await conn.scalar(
        text(
            "INSERT INTO snapshot_runs (horizon, taken_at, accounts_changed, subjects_changed, checkpoint)"
            " VALUES (CAST(:horizon AS xid8), :taken_at, :accounts, :subjects, :checkpoint) RETURNING id"
        ),
        {
            "horizon": horizon,
            "taken_at": now.clock,
            "accounts": accounts_changed,
            "subjects": subjects_changed,
            "checkpoint": checkpoint,
        },
    )
    if checkpoint:
        await conn.execute(_KEEP_HISTORY, {"run_id": run_id, "since": int(last.horizon_text)})
    # Runs are only needed as checkpoints (history) and as the latest horizon: the rest are pruned after a while.
    await conn.execute(
        text(
            "DELETE FROM snapshot_runs WHERE NOT checkpoint AND id < :run_id"
            " AND taken_at < now() - make_interval(secs => :keep)"
        ),
        {"run_id": run_id, "keep": RUN_RETENTION_SECONDS},
    )
    return SnapshotRun(horizon=horizon, accounts_changed=accounts_changed, subjects_changed=subjects_changed)


@dataclass(frozen=True, slots=True)
class Ages:
    snapshot_age_seconds: float
    unsealed_entries: int


async def ages(conn: AsyncConnection) -> Ages:
    """How stale the materialized state is: time since the last refresh, entries not yet sealed."""
    row = (
        await conn.execute(
            text(
                """
                SELECT coalesce(extract(epoch FROM clock_timestamp() - (SELECT max(taken_at) FROM snapshot_runs)), 0)
                           AS age,
                       (SELECT count(*) FROM entries e
                         WHERE (e.txid, e.id) > coalesce((SELECT (last_txid, last_entry) FROM blocks
                                                           ORDER BY id DESC LIMIT 1), ('0'::xid8, 0))) AS unsealed
                """
            )
        )
    ).one()
    return Ages(snapshot_age_seconds=float(row.age), unsealed_entries=int(row.unsealed))
