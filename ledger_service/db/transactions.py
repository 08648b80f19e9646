"""Running a unit of work in one transaction, committed explicitly, retried whole on transient conflicts.

The callable receives a connection inside BEGIN; `run_transaction` commits after it returns, so a failed commit
raises here, inside the service, and can never reach a client as success.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

T = TypeVar("T")

log = logging.getLogger(__name__)

SERIALIZATION_FAILURE = "40001"
DEADLOCK_DETECTED = "40P01"
UNIQUE_VIOLATION = "23505"
RETRYABLE_SQLSTATES = frozenset({SERIALIZATION_FAILURE, DEADLOCK_DETECTED})

MAX_ATTEMPTS = 10
DEFAULT_ISOLATION = "READ COMMITTED"


class DatabaseUnavailable(Exception):
    """The database cannot be reached or refused the connection; the operation may be retried later."""


class DatabaseBusy(DatabaseUnavailable):
    """The transaction kept losing to concurrent ones (serialization failures, deadlocks); retry later."""


class RetryTransaction(Exception):
    """Raised inside a unit of work to run it again from the start (e.g. lost an idempotency-key race)."""


def sqlstate_of(error: BaseException) -> str | None:
    orig = getattr(error, "orig", None)
    state = getattr(orig, "sqlstate", None) or getattr(error, "sqlstate", None)
    return state if isinstance(state, str) else None


def constraint_of(error: BaseException) -> str | None:
    """The constraint a database error names, if any (asyncpg reports it on the original exception)."""
    orig = getattr(error, "orig", None)
    for candidate in (orig, getattr(orig, "__cause__", None)):
        name = getattr(candidate, "constraint_name", None)
        if isinstance(name, str):
            return name
    return None


def is_connection_sqlstate(state: object) -> bool:
    """SQLSTATEs that mean the connection, not the statement, failed: class 08, shutdowns, too many connections."""
    return isinstance(state, str) and (state.startswith("08") or state in {"57P01", "57P02", "57P03", "53300"})


def is_connection_error(error: BaseException) -> bool:
    """True for failures of the connection itself rather than of the statement."""
    if isinstance(error, OSError | ConnectionError | PoolTimeoutError | InterfaceError):
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
        return isinstance(cause, OSError | ConnectionError)
    return False


_after_commit: contextvars.ContextVar[list[Callable[[], None]]] = contextvars.ContextVar("ledger_after_commit")


def after_commit(conn: AsyncConnection, callback: Callable[[], None]) -> None:
    """Run `callback` once the transaction `conn` is in has committed (never if it rolls back or is retried).

    The callbacks live in a context variable of the running attempt, not on the connection: a connection that
    broke must not be touched again (SQLAlchemy would try to reconnect it from there).
    """
    _after_commit.get().append(callback)


async def run_transaction(
    engine: AsyncEngine,
    work: Callable[[AsyncConnection], Awaitable[T]],
    *,
    isolation_level: str = DEFAULT_ISOLATION,
    attempts: int = MAX_ATTEMPTS,
) -> T:
    """Run `work` in a transaction and commit it; retry the whole of it on 40001, 40P01 or RetryTransaction.

    Connection failures become DatabaseUnavailable. Any other error rolls back and propagates.
    """
    for attempt in range(1, attempts + 1):
        try:
            callbacks: list[Callable[[], None]] = []
            token = _after_commit.set(callbacks)
            try:
                async with engine.connect() as conn:
                    if isolation_level != DEFAULT_ISOLATION:  # the engine's own level needs no statement
                        await conn.execution_options(isolation_level=isolation_level)
                    async with conn.begin():
                        result = await work(conn)
            finally:
                _after_commit.reset(token)
            # Leaving `begin()` committed; a failing COMMIT raised above and nothing was acknowledged.
            for callback in callbacks:
                callback()
            return result
        except RetryTransaction as error:
            if attempt == attempts:
                raise DatabaseBusy(f"gave up after {attempts} attempts") from error
        except DBAPIError as error:
            if is_connection_error(error):
                # A pooled connection that died while idle (the database restarted): try once on a fresh one.
                # Safe even if the lost connection had committed: every write of the ledger is idempotent.
                if error.connection_invalidated and attempt == 1:
                    continue
                raise DatabaseUnavailable(str(error.orig)) from error
            if sqlstate_of(error) not in RETRYABLE_SQLSTATES:
                raise
            if attempt == attempts:
                raise DatabaseBusy(f"gave up after {attempts} attempts: {sqlstate_of(error)}") from error
            log.info("retrying transaction after %s (attempt %d)", sqlstate_of(error), attempt)
        except (OSError, ConnectionError, PoolTimeoutError) as error:
            raise DatabaseUnavailable(str(error)) from error
        # Jittered backoff so that the transactions that collided do not collide again in lockstep.
        await asyncio.sleep(random.uniform(0, 0.002 * 2**attempt))
    raise AssertionError("unreachable")
