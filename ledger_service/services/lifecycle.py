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
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import TYPE_CHECKING

import asyncpg
import msgspec

from ledger_service import metrics
from ledger_service.db import lifecycle as lifecycle_db
from ledger_service.db.transactions import (
    READ_ONLY_SQL_TRANSACTION,
    Verdict,
    is_connection_sqlstate,
    is_lost_key_race,
    sqlstate_verdict,
    with_retries,
)
from ledger_service.domain.lifecycle import RequestRow
from ledger_service.domain.operations import Expire, Operation
from ledger_service.domain.planning import Event, Plan, Planned, Planner, Result
from ledger_service.schemas import HoldView
from ledger_service.settings import Settings

if TYPE_CHECKING:
    from ledger_service.db.lifecycle import Connection, Pool

log = logging.getLogger(__name__)

_COUNTERS: dict[Event, Callable[[], None]] = {
    Event.HOLD_OPENED: metrics.HOLDS_OPENED.labels(trusted="false").inc,
    Event.HOLD_OPENED_TRUSTED: metrics.HOLDS_OPENED.labels(trusted="true").inc,
    Event.HOLD_SETTLED: metrics.HOLDS_SETTLED.labels(late="false").inc,
    Event.HOLD_SETTLED_LATE: metrics.HOLDS_SETTLED.labels(late="true").inc,
    Event.HOLD_REFUNDED: metrics.HOLDS_REFUNDED.inc,
    Event.HOLD_EXPIRED: metrics.HOLDS_EXPIRED.inc,
    Event.CONSUMED: metrics.CONSUMPTIONS.inc,
}
"""The metric each planned event moves, once its plan has committed."""


def hold_view(row: RequestRow) -> HoldView:
    """A request as the API shows it."""
    return HoldView(
        request_id=row.request_id,
        user_id=row.user_id,
        token_id=row.token_id,
        group=row.group,
        model=row.model,
        status=row.status.value,
        amount=row.amount,
        trusted=row.trusted,
        charged=row.charged,
        channel_id=row.channel_id,
        late=row.late,
        created_at=row.created_at,
        expires_at=row.expires_at,
    )


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

    async def run(self, operations: Sequence[Operation], *, atomic: bool = False) -> list[Result]:
        """Plan and apply the operations; each gets its answer: the request after it, or its refusal."""
        return (await self._run(operations, atomic=atomic)).results

    async def _run(self, operations: Sequence[Operation], *, atomic: bool) -> Plan:
        locked = False

        async def attempt() -> Plan:
            nonlocal locked
            try:
                async with self._connection() as conn:
                    if not locked:
                        return await self._plan_and_apply(conn, operations, atomic=atomic, locked=False)
                    async with conn.transaction(isolation="read_committed"):
                        return await self._plan_and_apply(conn, operations, atomic=atomic, locked=True)
            except _Stale:
                metrics.STALE_PLANS.inc()
                locked = True  # plan again under locks: that plan cannot go stale
                raise

        plan = await with_retries(attempt, self._judge)
        self._count(plan, len(operations))
        return plan

    async def expire_due_holds(self, *, batch: int = 200) -> int:
        """Expire the open holds past expires_at, `batch` at a time; returns how many were expired.

        Each batch is planned and applied like other operations, so a hold expires the same way whether the
        sweeper or a late settle or refund finds it due. Sweepers of several processes share the work: each locks
        the due holds no other has locked (SKIP LOCKED) and plans their expiry under those locks.
        """
        total = 0
        while True:
            plan, due = await with_retries(lambda: self._expire_batch(batch), self._judge)
            self._count(plan, due)
            total += plan.events.count(Event.HOLD_EXPIRED)
            if due < batch:
                return total

    async def _expire_batch(self, batch: int) -> tuple[Plan, int]:
        """One transaction of the sweeper: the plan that expired the due holds it locked, and how many it locked."""
        async with self._connection() as conn, conn.transaction(isolation="read_committed"):
            due = await lifecycle_db.lock_due_holds(conn, limit=batch)
            if not due:
                return Plan(), 0
            operations = [Expire(request_id) for request_id in due]
            return await self._plan_and_apply(conn, operations, atomic=False, locked=True), len(due)

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[Connection]:
        """A connection of the pool (503 after POOL_WAIT_SECONDS); one that broke is closed, never reused."""
        async with self.pool.acquire(timeout=POOL_WAIT_SECONDS) as conn:
            try:
                yield conn
            except BaseException as error:
                if _connection_lost(error):
                    conn.terminate()
                if getattr(error, "sqlstate", None) == READ_ONLY_SQL_TRANSACTION:
                    # The server is no longer the primary, for the pool's other connections to it too: each is
                    # closed when next acquired or released, and replaced by one to the primary
                    # (target_session_attrs=read-write).
                    await self.pool.expire_connections()
                raise

    def _judge(self, error: Exception) -> Verdict:
        """The retry policy's verdict (db/transactions.py) on an error of a lifecycle attempt."""
        verdict = _verdict(error)
        if verdict in (Verdict.RECONNECT, Verdict.UNAVAILABLE):
            self.seen.forget()  # the database may come back restored or failed over
        return verdict

    @staticmethod
    def _count(plan: Plan, operations: int) -> None:
        """Move the counters of a committed plan."""
        for event in plan.events:
            _COUNTERS[event]()
        metrics.LIFECYCLE_GROUP_SIZE.observe(operations)

    async def _plan_and_apply(
        self, conn: Connection, operations: Sequence[Operation], *, atomic: bool, locked: bool
    ) -> Plan:
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


def _verdict(error: Exception) -> Verdict:
    if isinstance(error, _Stale) or is_lost_key_race(error):
        return Verdict.RETRY_NOW
    if isinstance(error, asyncpg.PostgresError):
        return sqlstate_verdict(error.sqlstate)
    if isinstance(error, _CONNECTION_FAILURES):
        return Verdict.RECONNECT
    return Verdict.RAISE


def _with_times(result: Result, created: dict[str, tuple[datetime, datetime | None]]) -> Result:
    """Give the requests this plan created the creation and expiry times the database assigned."""
    if not isinstance(result, Planned) or result.row.request_id not in created:
        return result
    created_at, expires_at = created[result.row.request_id]
    row = msgspec.structs.replace(result.row, created_at=created_at, expires_at=expires_at)
    return Planned(row, result.created, result.replayed)
