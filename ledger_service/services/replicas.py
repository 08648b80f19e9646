"""A primary and its replicas: the position every write answers with, and audit reads on a replica.

Consistency (docs/operations.md, Reading from a replica): a successful write answers `Ledger-Position: <LSN>`, a WAL
position taken after its commit. An audit read given `min_position` is served by the replica once it has replayed
that far (waiting up to REPLICA_WAIT_SECONDS), else by the primary: it always shows the write. Without
`min_position` a replica read may be a little behind the primary, never inconsistent (one snapshot per answer).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeAlias, TypeVar

import asyncpg
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ledger_service import metrics
from ledger_service.db import replication
from ledger_service.db.engine import hosts_of
from ledger_service.db.transactions import DatabaseUnavailable, run_transaction
from ledger_service.settings import Settings, SettingsError

if TYPE_CHECKING:
    Pool: TypeAlias = asyncpg.Pool[asyncpg.Record]

T = TypeVar("T")
log = logging.getLogger(__name__)

REPLICA_WAIT_SECONDS = 2.0
"""How long a read with `min_position` waits for the replica to replay that far before the primary serves it."""

REPLICA_POLL_SECONDS = 0.01

POSITION_TIMEOUT_SECONDS = 1.0
"""A write's answer never waits longer than this for its position: without one, it goes without the header."""


class AsynchronousReplication(SettingsError):
    """The database is a cluster whose commits do not wait for a standby, and LEDGER_ALLOW_ASYNC_REPLICATION is
    not set: an acknowledged write could be lost in a failover."""


async def check_replication(engine: AsyncEngine, settings: Settings) -> None:
    """At start: refuse a cluster whose commits are not synchronous (or, when allowed, say so loudly); one server
    without replicas is fine. Sets `ledger_replication_synchronous`."""
    state = await replication.replication_state(engine)
    problem = replication.asynchronous_cluster(state, hosts=len(hosts_of(settings.database_url or "")))
    metrics.REPLICATION_SYNCHRONOUS.set(0 if problem else 1)
    if problem is None:
        return
    if not settings.allow_async_replication:
        log.error("refusing to start: %s", problem)
        raise AsynchronousReplication(f"refusing to start: {problem}")
    log.error("LEDGER_ALLOW_ASYNC_REPLICATION=true, starting anyway: %s", problem)


class Positions:
    """The WAL position of the primary after a commit, for the `Ledger-Position` header of writes.

    One query answers every call that arrived before it was sent: under load, one round trip per burst of writes,
    not one per write. A call waits for a query sent after it started, so the position is past its commit."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self._next: asyncio.Future[str | None] | None = None
        self._task: asyncio.Task[None] | None = None

    async def after_commit(self) -> str | None:
        """A position at or past every commit that returned before this call; None if the primary did not say in
        time (the write stands; only the header is missing)."""
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
            if self._task is None or self._task.done():
                self._task = asyncio.create_task(self._serve())
        try:
            return await asyncio.wait_for(asyncio.shield(self._next), POSITION_TIMEOUT_SECONDS)
        except TimeoutError:
            return None

    async def _serve(self) -> None:
        while self._next is not None:
            answered, self._next = self._next, None  # calls from now on wait for the next query
            try:
                async with self.pool.acquire(timeout=POSITION_TIMEOUT_SECONDS) as conn:
                    position: str | None = await replication.current_position(conn)
            except Exception as error:  # the database went away after the commit: no header, no error
                log.info("no write position: %s", error)
                position = None
            answered.set_result(position)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


class ReplicaBehind(Exception):
    """The replica had not replayed the asked position within REPLICA_WAIT_SECONDS."""


async def read_routed(
    replica: AsyncEngine | None,
    primary: AsyncEngine,
    work: Callable[[AsyncConnection], Awaitable[T]],
    *,
    min_position: str | None,
    isolation_level: str,
) -> T:
    """Run the read `work` on the replica (when there is one), else or as a fallback on the primary.

    The primary serves it when the replica has not replayed `min_position` in time, or cannot be reached."""
    if replica is not None:
        try:
            return await run_transaction(
                replica, work, isolation_level=isolation_level, before=_waiting_for(min_position)
            )
        except ReplicaBehind:
            reason = "behind"
        except DatabaseUnavailable as error:
            log.warning("the read replica is unavailable, reading from the primary: %s", error)
            reason = "unavailable"
        metrics.REPLICA_FALLBACKS.labels(reason).inc()
    return await run_transaction(primary, work, isolation_level=isolation_level)


def _waiting_for(position: str | None) -> Callable[[AsyncConnection], Awaitable[None]] | None:
    if position is None:
        return None

    async def wait(conn: AsyncConnection) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + REPLICA_WAIT_SECONDS
        while not await replication.replayed(conn, position):
            if loop.time() >= deadline:
                raise ReplicaBehind(position)
            await asyncio.sleep(REPLICA_POLL_SECONDS)

    return wait
