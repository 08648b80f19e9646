"""Running a unit of work in one transaction, committed explicitly, retried whole on transient conflicts.

The callable receives a connection inside BEGIN; `run_transaction` commits after it returns, so a failed commit
raises here, inside the service, and can never reach a client as success. The retry policy (`with_retries` and its
`Verdict`s) is the one the lifecycle's asyncpg path uses too (services/lifecycle.py): each driver only judges its
own errors.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import logging
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

from asyncpg.exceptions import TargetServerAttributeNotMatched
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

T = TypeVar("T")

log = logging.getLogger(__name__)

SERIALIZATION_FAILURE = "40001"
DEADLOCK_DETECTED = "40P01"
UNIQUE_VIOLATION = "23505"
READ_ONLY_SQL_TRANSACTION = "25006"
"""A write refused because the server is (now) read-only: it was the primary and has been demoted, or made
read-only by its operator. The connection is as useless as a lost one (docs/operations.md, High availability)."""
RETRYABLE_SQLSTATES = frozenset({SERIALIZATION_FAILURE, DEADLOCK_DETECTED})

IDEMPOTENCY_CONSTRAINTS = frozenset({"requests_pkey", "entries_reference_key", "entries_reverses_key"})
"""Unique keys two concurrent first attempts can race for; the loser runs again and finds the winner's row."""

MAX_ATTEMPTS = 10
DEFAULT_ISOLATION = "READ COMMITTED"


class DatabaseUnavailable(Exception):
    """The database cannot be reached or refused the connection; the operation may be retried later."""


class DatabaseBusy(DatabaseUnavailable):
    """The transaction kept losing to concurrent ones (serialization failures, deadlocks); retry later."""


class RetryTransaction(Exception):
    """Raised inside a unit of work to run it again from the start (e.g. lost an idempotency-key race)."""


NoPrimary = TargetServerAttributeNotMatched
"""asyncpg's error when none of a URL's hosts is what target_session_attrs asks (no primary: during a failover)."""


def sqlstate_of(error: BaseException) -> str | None:
    orig = getattr(error, "orig", None)
    state = getattr(orig, "sqlstate", None) or getattr(error, "sqlstate", None)
    return state if isinstance(state, str) else None


def constraint_of(error: BaseException) -> str | None:
    """The constraint a database error names, if any (asyncpg reports it on the error itself, or on the original
    exception under SQLAlchemy's)."""
    orig = getattr(error, "orig", None)
    for candidate in (error, orig, getattr(orig, "__cause__", None)):
        name = getattr(candidate, "constraint_name", None)
        if isinstance(name, str):
            return name
    return None


def is_connection_sqlstate(state: object) -> bool:
    """SQLSTATEs that mean the connection, not the statement, failed: class 08, shutdowns, too many connections, and
    a write refused by a server that is no longer the primary (25006)."""
    return isinstance(state, str) and (
        state.startswith("08") or state in {"57P01", "57P02", "57P03", "53300", READ_ONLY_SQL_TRANSACTION}
    )


def is_connection_error(error: BaseException) -> bool:
    """True for failures of the connection itself rather than of the statement."""
    if isinstance(error, OSError | ConnectionError | PoolTimeoutError | InterfaceError | NoPrimary):
        return True
    if isinstance(error, DBAPIError):
        if error.connection_invalidated:
            return True
        state = sqlstate_of(error)
        if is_connection_sqlstate(state):
            return True
        if state is None and isinstance(error, OperationalError | InterfaceError):
            return True
        cause = getattr(error.orig, "__cause__", None)
        return isinstance(cause, OSError | ConnectionError | NoPrimary)
    return False


_after_commit: contextvars.ContextVar[list[Callable[[], None]]] = contextvars.ContextVar("ledger_after_commit")


def after_commit(conn: AsyncConnection, callback: Callable[[], None]) -> None:
    """Run `callback` once the transaction `conn` is in has committed (never if it rolls back or is retried).

    The callbacks live in a context variable of the running attempt, not on the connection: a connection that
    broke must not be touched again (SQLAlchemy would try to reconnect it from there).
    """
    _after_commit.get().append(callback)


class Verdict(enum.Enum):
    """What to do about an error that ended an attempt: the retry policy of both drivers (`with_retries`)."""

    RETRY_NOW = "retry now"
    """The attempt saw a state that has since moved on (a lost race for an idempotency key, a stale plan): the next
    attempt finds the new state, so there is nothing to wait for."""
    RETRY_LATER = "retry later"
    """It collided with a concurrent transaction (40001, 40P01): again after a jittered backoff."""
    RECONNECT = "reconnect"
    """Its connection died: once more on a fresh connection (a pooled one may have died idle in a restart), and
    unavailable if that fails too. Safe even if the lost statement committed: every write of the ledger is
    idempotent."""
    UNAVAILABLE = "unavailable"
    RAISE = "raise"
    """Not the database's doing: the error is the answer."""


def sqlstate_verdict(state: str | None) -> Verdict:
    """The verdict on a database error by its SQLSTATE alone."""
    if state in RETRYABLE_SQLSTATES:
        return Verdict.RETRY_LATER
    if state == READ_ONLY_SQL_TRANSACTION:  # once more, on a new connection: to the new primary, if there is one
        return Verdict.RECONNECT
    if is_connection_sqlstate(state):
        return Verdict.UNAVAILABLE
    return Verdict.RAISE


async def with_retries(
    attempt: Callable[[], Awaitable[T]], judge: Callable[[Exception], Verdict], *, attempts: int = MAX_ATTEMPTS
) -> T:
    """Run `attempt` until it returns, doing what `judge` says of each error; DatabaseBusy after `attempts`."""
    for number in range(1, attempts + 1):
        try:
            return await attempt()
        except Exception as error:
            verdict = judge(error)
            if verdict is Verdict.RAISE:
                raise
            if verdict is Verdict.UNAVAILABLE or (verdict is Verdict.RECONNECT and number > 1):
                raise DatabaseUnavailable(str(getattr(error, "orig", None) or error)) from error
            if verdict is Verdict.RETRY_LATER:
                log.info("retrying after %s (attempt %d)", sqlstate_of(error), number)
                # Jittered backoff so that the transactions that collided do not collide again in lockstep.
                await asyncio.sleep(random.uniform(0, 0.002 * 2**number))
    raise DatabaseBusy(f"gave up after {attempts} attempts")


def _judge(error: Exception) -> Verdict:
    """The retry policy's verdict on an error of a SQLAlchemy transaction."""
    if isinstance(error, RetryTransaction) or is_lost_key_race(error):
        return Verdict.RETRY_NOW
    if isinstance(error, DBAPIError):
        if is_connection_error(error):
            return Verdict.RECONNECT if error.connection_invalidated else Verdict.UNAVAILABLE
        return sqlstate_verdict(sqlstate_of(error))
    if isinstance(error, OSError | ConnectionError | PoolTimeoutError | NoPrimary):
        return Verdict.UNAVAILABLE
    return Verdict.RAISE


def is_lost_key_race(error: BaseException) -> bool:
    """A unique violation of an idempotency key: a concurrent first attempt took it, and the next finds its row."""
    return sqlstate_of(error) == UNIQUE_VIOLATION and constraint_of(error) in IDEMPOTENCY_CONSTRAINTS


async def run_transaction(
    engine: AsyncEngine,
    work: Callable[[AsyncConnection], Awaitable[T]],
    *,
    isolation_level: str = DEFAULT_ISOLATION,
    attempts: int = MAX_ATTEMPTS,
    before: Callable[[AsyncConnection], Awaitable[None]] | None = None,
) -> T:
    """Run `work` in a transaction and commit it, retried whole as `with_retries` and `_judge` say.

    Connection failures become DatabaseUnavailable. Any other error rolls back and propagates. `before` runs on
    the same connection first, in a transaction of its own (rolled back): what it waits for is in `work`'s snapshot.
    """

    async def attempt() -> T:
        callbacks: list[Callable[[], None]] = []
        token = _after_commit.set(callbacks)
        try:
            async with engine.connect() as conn:
                if isolation_level != DEFAULT_ISOLATION:  # the engine's own level needs no statement
                    await conn.execution_options(isolation_level=isolation_level)
                if before is not None:
                    await before(conn)
                    await conn.rollback()
                async with conn.begin():
                    result = await work(conn)
        finally:
            _after_commit.reset(token)
        # Leaving `begin()` committed; a failing COMMIT raised above and nothing was acknowledged.
        for callback in callbacks:
            callback()
        return result

    return await with_retries(attempt, _judge, attempts=attempts)
