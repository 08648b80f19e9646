"""Running lifecycle operations (holds, settlements, refunds, consumptions): one call or a batch, plan then apply.

A first attempt is optimistic and costs two round trips and no explicit transaction: read a snapshot, plan in
Python, then apply the plan in one statement that checks its premises under the users' locks. If a premise no
longer holds (another operation on the same user or request committed in between), nothing was written, and the
operations are planned again pessimistically: in one transaction that locks the users and requests first, so the
second plan cannot go stale. A lost race for a request_id re-runs the operations, which then find the winner's row.
Serialization failures and deadlocks re-run the whole attempt; the connection's loss is a 503.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING

import asyncpg

from ledger_service import metrics
from ledger_service.db import lifecycle as lifecycle_db
from ledger_service.db.transactions import (
    MAX_ATTEMPTS,
    RETRYABLE_SQLSTATES,
    UNIQUE_VIOLATION,
    DatabaseBusy,
    DatabaseUnavailable,
    is_connection_sqlstate,
)
from ledger_service.domain.planning import Operation, Plan, Planned, Planner, Result
from ledger_service.services.ledger import IDEMPOTENCY_CONSTRAINTS
from ledger_service.settings import Settings

if TYPE_CHECKING:
    from ledger_service.db.lifecycle import Connection, Pool

log = logging.getLogger(__name__)

_COUNTERS: dict[str, Callable[[str | None], None]] = {
    "holds_opened": lambda label: metrics.HOLDS_OPENED.labels(trusted=label).inc(),
    "holds_settled": lambda label: metrics.HOLDS_SETTLED.labels(late=label).inc(),
    "holds_expired": lambda _: metrics.HOLDS_EXPIRED.inc(),
    "holds_refunded": lambda _: metrics.HOLDS_REFUNDED.inc(),
    "consumptions": lambda _: metrics.CONSUMPTIONS.inc(),
}


class _Stale(Exception):
    """A plan's premise no longer held when it was applied; nothing was written."""


_CONNECTION_FAILURES = (OSError, ConnectionError, TimeoutError, asyncpg.InterfaceError, asyncpg.InternalClientError)
"""Failures of the connection itself, or of its protocol state after one (asyncpg's InternalClientError)."""


def _connection_lost(error: BaseException) -> bool:
    return isinstance(error, _CONNECTION_FAILURES) or is_connection_sqlstate(getattr(error, "sqlstate", None))


POOL_WAIT_SECONDS = 10
"""How long a call waits for a connection of the lifecycle pool before it is answered 503 (as for the engine)."""

MAX_GROUP = 100
"""The most single calls coalesced into one group (one plan, one commit)."""


class LifecycleService:
    def __init__(self, pool: Pool, settings: Settings, seen: lifecycle_db.SeenBalances | None = None) -> None:
        self.pool = pool
        self.settings = settings
        self.seen = seen or lifecycle_db.SeenBalances()
        """Pass the one whose `forget` the pool calls for each new connection (create_pool's on_connect)."""
        self._waiting: list[tuple[Operation, asyncio.Future[Result]]] = []
        self._groups_in_flight = 0
        self._group_tasks: set[asyncio.Task[None]] = set()

    @property
    def groups_in_flight(self) -> int:
        """How many groups of single calls this process is applying now (at most `coalesce_groups`)."""
        return self._groups_in_flight

    async def run_one(self, operation: Operation) -> Result:
        """One single call. With coalescing on, it joins the calls waiting while the process already has
        `coalesce_groups` groups in flight, and is planned and committed with them; alone, it goes at once."""
        if self.settings.coalesce_groups == 0:
            [result] = await self.run([operation])
            return result
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._waiting.append((operation, future))
        if self._groups_in_flight < self.settings.coalesce_groups:
            self._groups_in_flight += 1
            task = asyncio.create_task(self._apply_groups())
            self._group_tasks.add(task)
            task.add_done_callback(self._group_tasks.discard)
        return await future

    async def _apply_groups(self) -> None:
        """Take the waiting calls, a group at a time, until none is left. Each call gets its own answer; an error
        of the group's transaction (the database unreachable) is every call's error, and nothing was written."""
        try:
            while self._waiting:
                group = self._waiting[:MAX_GROUP]
                del self._waiting[:MAX_GROUP]
                try:
                    results = await self.run([operation for operation, _ in group])
                except BaseException as error:
                    for _, future in group:
                        if not future.done():
                            future.set_exception(error)
                    if not isinstance(error, Exception):  # cancelled (shutdown): tell every waiting call too
                        waiting, self._waiting = self._waiting, []
                        for _, future in waiting:
                            if not future.done():
                                future.set_exception(error)
                        raise
                    continue
                for (_, future), result in zip(group, results, strict=True):
                    if not future.done():
                        future.set_result(result)
        finally:
            self._groups_in_flight -= 1

    async def run(self, operations: list[Operation], *, atomic: bool = False) -> list[Result]:
        """Plan and apply the operations; each gets its answer: the request after it, or its refusal."""
        pessimistic = False
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                async with self.pool.acquire(timeout=POOL_WAIT_SECONDS) as conn:
                    try:
                        if pessimistic:
                            async with conn.transaction(isolation="read_committed"):
                                plan = await self._attempt(conn, operations, atomic=atomic, locked=True)
                        else:
                            plan = await self._attempt(conn, operations, atomic=atomic, locked=False)
                    except BaseException as error:
                        if _connection_lost(error):
                            conn.terminate()  # never hand a broken connection to the next caller
                            self.seen.forget()  # the database may come back restored or failed over
                        raise
                for name, label in plan.events:
                    _COUNTERS[name](label)
                metrics.LIFECYCLE_GROUP_SIZE.observe(len(operations))
                return plan.results
            except _Stale:
                metrics.STALE_PLANS.inc()
                pessimistic = True
                continue
            except asyncpg.PostgresError as error:
                if error.sqlstate == UNIQUE_VIOLATION and getattr(error, "constraint_name", None) in (
                    IDEMPOTENCY_CONSTRAINTS
                ):
                    continue  # another call took a request_id first: the next attempt finds its row
                if error.sqlstate in RETRYABLE_SQLSTATES:
                    log.info("retrying lifecycle operations after %s (attempt %d)", error.sqlstate, attempt)
                    await asyncio.sleep(random.uniform(0, 0.002 * 2**attempt))
                    continue
                if _connection_lost(error):
                    raise DatabaseUnavailable(str(error)) from error
                raise
            except _CONNECTION_FAILURES as error:
                self.seen.forget()
                # A pooled connection that died while idle (the database restarted): one more try on a fresh
                # one. Safe even if the lost statement had committed: every lifecycle operation is idempotent.
                if attempt == 1:
                    continue
                raise DatabaseUnavailable(str(error)) from error
        raise DatabaseBusy(f"gave up after {MAX_ATTEMPTS} attempts")

    async def _attempt(self, conn: Connection, operations: list[Operation], *, atomic: bool, locked: bool) -> Plan:
        snapshot = await lifecycle_db.read(conn, operations, lock=locked, seen=self.seen)
        settings = self.settings
        plan = Planner(
            snapshot,
            pre_consumed_quota=settings.pre_consumed_quota,
            trust_factor=settings.trust_factor,
            hold_ttl=settings.hold_ttl_seconds,
        ).plan_all(operations, atomic=atomic)
        if not plan.writes:
            return plan
        created = await lifecycle_db.apply(conn, plan, snapshot, with_premises=not locked)
        if created is None:
            raise _Stale
        plan.results = [_with_times(result, created) for result in plan.results]
        return plan


def _with_times(result: Result, created: dict[str, tuple[datetime, datetime | None]]) -> Result:
    """Give the requests this plan created the creation and expiry times the database assigned."""
    if not isinstance(result, Planned) or result.row.request_id not in created:
        return result
    created_at, expires_at = created[result.row.request_id]
    return Planned(result.row._replace(created_at=created_at, expires_at=expires_at), result.created, result.replayed)
