"""What the service asks PostgreSQL about replication: whether commits are synchronous, and WAL positions.

A position is a WAL location (`pg_lsn`, written `16/B374D848`). Every successful write answers with one taken after
its commit (`Ledger-Position`); a replica that has replayed that far shows the write (docs/operations.md, Reading
from a replica).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

import asyncpg
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

if TYPE_CHECKING:
    Connection: TypeAlias = asyncpg.Connection[asyncpg.Record] | asyncpg.pool.PoolConnectionProxy[asyncpg.Record]

POSITION = re.compile(r"\A[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}\Z")
"""A `pg_lsn` as PostgreSQL writes it."""

NOT_DURABLE_COMMITS = frozenset({"off", "local"})
"""synchronous_commit values under which a commit returns before any standby has the WAL."""


@dataclass(frozen=True, slots=True)
class ReplicationState:
    """What the primary says about its replication, as the service's own sessions see it."""

    synchronous_commit: str
    synchronous_standby_names: str
    replicas: int
    """Standbys streaming from it now (pg_stat_replication, backups left out)."""


async def replication_state(engine: AsyncEngine) -> ReplicationState:
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                text(
                    "SELECT current_setting('synchronous_commit') AS synchronous_commit,"
                    " current_setting('synchronous_standby_names') AS synchronous_standby_names,"
                    " (SELECT count(*) FROM pg_stat_replication WHERE state IS DISTINCT FROM 'backup') AS replicas"
                )
            )
        ).one()
    return ReplicationState(str(row.synchronous_commit), str(row.synchronous_standby_names), int(row.replicas))


def asynchronous_cluster(state: ReplicationState, *, hosts: int) -> str | None:
    """Why a write acknowledged by this cluster could be lost with its primary; None when it could not (commits
    wait for a synchronous standby, or there is no cluster: one server, no replica)."""
    if state.replicas == 0 and hosts <= 1:
        return None
    faults = []
    if not state.synchronous_standby_names.strip():
        faults.append("synchronous_standby_names is empty")
    if state.synchronous_commit in NOT_DURABLE_COMMITS:
        faults.append(f"synchronous_commit is {state.synchronous_commit}")
    if not faults:
        return None
    members = f"the URL names {hosts} hosts" if hosts > 1 else f"{state.replicas} replica(s) stream from the primary"
    if hosts > 1 and state.replicas:
        members += f" and {state.replicas} replica(s) stream from the primary"
    return (
        f"the database is a cluster ({members}) whose commits are not synchronous ({'; '.join(faults)}): a write"
        " the ledger acknowledged could be lost with the primary. With Patroni, set `synchronous_mode: true` and"
        " `synchronous_mode_strict: true`, and `synchronous_commit: on` (or `remote_apply`) under"
        " postgresql.parameters; without it, set synchronous_standby_names and synchronous_commit = on on the"
        " primary. Or set LEDGER_ALLOW_ASYNC_REPLICATION=true to run with asynchronous replication anyway"
        " (docs/operations.md, Synchronous replication)"
    )


async def current_position(conn: Connection) -> str:
    """A WAL position at or past every commit that returned before this call (on the primary)."""
    return str(await conn.fetchval("SELECT pg_current_wal_insert_lsn()::text"))


async def replayed(conn: AsyncConnection, position: str) -> bool:
    """Whether the server this connection reached shows everything up to `position` (a standby that has replayed
    that far, or a primary whose WAL is past it)."""
    found = await conn.scalar(
        text(
            "SELECT coalesce(CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn()"
            " END >= CAST(CAST(:position AS text) AS pg_lsn), false)"
        ),
        {"position": position},
    )
    return bool(found)
