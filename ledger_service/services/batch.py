"""Batches (contract section 9): many lifecycle operations in one request and one database transaction.

This is the high-throughput path: one commit (one WAL flush) for up to 1000 operations instead of one each.

- Not atomic (the default): a refused operation is answered with its problem, the others stand. No savepoint is
  needed: every lifecycle operation decides whether to refuse before its first write (a rule of
  services/ledger.py, tested), so a refused operation has written nothing. A lost race for a request_id (the one
  failure that comes from a write) re-runs the whole batch, whose operations are all idempotent.
- Atomic: the first refusal rolls the whole transaction back; that operation gets its problem, every other one a
  `batch_aborted` problem naming it.

Either way each result is what the single call would have answered: its status code and body. The users of the
holds and the rows of the settled or refunded requests are locked up front, in ascending order, so that two
batches touching the same users or requests cannot deadlock on each other; a serialization failure or deadlock
still re-runs the whole batch (every operation is idempotent, so a re-run answers the same).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from ledger_service.db import locks, requests
from ledger_service.db.transactions import (
    UNIQUE_VIOLATION,
    RetryTransaction,
    constraint_of,
    run_transaction,
    sqlstate_of,
)
from ledger_service.domain import errors
from ledger_service.schemas import (
    BatchCommand,
    BatchOperation,
    BatchResultView,
    BatchView,
    ConsumptionCommand,
    HoldCommand,
    HoldView,
    ProblemView,
    RefundCommand,
    SettleCommand,
)
from ledger_service.services.ledger import IDEMPOTENCY_CONSTRAINTS, LedgerService, Outcome


class _RollBack(Exception):
    """Raised inside an atomic batch's transaction to roll it back, carrying the results to answer with."""

    def __init__(self, results: list[BatchResultView]) -> None:
        super().__init__("atomic batch aborted")
        self.results = results


@dataclass(frozen=True, slots=True)
class _Prepared:
    """An operation whose body decoded: ready to run. `refusal` is set instead when it did not."""

    operation: BatchOperation
    run: Callable[[AsyncConnection], Awaitable[Outcome[HoldView]]] | None
    user_id: int | None = None
    refusal: errors.LedgerError | None = None


def problem_body(error: errors.LedgerError) -> dict[str, Any]:
    view = ProblemView(
        type=f"urn:ledger:problem:{error.code}",
        title=error.title,
        status=error.status,
        detail=error.detail,
        code=error.code,
    )
    return msgspec.to_builtins(view)  # type: ignore[no-any-return]


def _refused(error: errors.LedgerError) -> BatchResultView:
    return BatchResultView(status=error.status, body=problem_body(error))


def _answered(outcome: Outcome[HoldView], created_status: int) -> BatchResultView:
    status = created_status if outcome.created else 200
    return BatchResultView(status=status, body=msgspec.to_builtins(outcome.value))


class BatchService:
    def __init__(self, ledger: LedgerService) -> None:
        self.ledger = ledger

    def _prepare(self, operation: BatchOperation) -> _Prepared:
        ledger = self.ledger
        body = dict(operation.body)
        try:
            if operation.op in ("hold", "consume"):
                if body.setdefault("request_id", operation.request_id) != operation.request_id:
                    raise errors.ValidationFailed("body.request_id differs from the operation's request_id")
                if operation.op == "hold":
                    hold = msgspec.convert(body, HoldCommand, strict=True)
                    return _Prepared(
                        operation,
                        lambda conn: ledger.open_hold_in(conn, hold, user_locked=True),  # locked up front in run()
                        user_id=hold.user_id,
                    )
                consume = msgspec.convert(body, ConsumptionCommand, strict=True)
                return _Prepared(operation, lambda conn: ledger.consume_in(conn, consume))
            if operation.op == "settle":
                settle = msgspec.convert(body, SettleCommand, strict=True)
                return _Prepared(operation, lambda conn: ledger.settle_in(conn, operation.request_id, settle))
            refund = msgspec.convert(body, RefundCommand, strict=True)
            return _Prepared(operation, lambda conn: ledger.refund_in(conn, operation.request_id, refund))
        except msgspec.ValidationError as error:
            return _Prepared(operation, None, refusal=errors.ValidationFailed(f"body: {error}"))
        except errors.LedgerError as error:
            return _Prepared(operation, None, refusal=error)

    async def run(self, command: BatchCommand) -> BatchView:
        prepared = [self._prepare(operation) for operation in command.operations]
        if command.atomic:
            first_refusal = next((i for i, p in enumerate(prepared) if p.refusal is not None), None)
            if first_refusal is not None:
                return BatchView(results=self._aborted(prepared, first_refusal, prepared[first_refusal].refusal))

        async def work(conn: AsyncConnection) -> list[BatchResultView]:
            await locks.lock_users(conn, (p.user_id for p in prepared if p.user_id is not None))
            await requests.lock_requests(
                conn, (p.operation.request_id for p in prepared if p.operation.op in ("settle", "refund"))
            )
            results: list[BatchResultView] = []
            for index, item in enumerate(prepared):
                if item.refusal is not None:
                    results.append(_refused(item.refusal))
                    continue
                assert item.run is not None
                created_status = 201 if item.operation.op in ("hold", "consume") else 200
                try:
                    results.append(_answered(await item.run(conn), created_status))
                except errors.LedgerError as error:
                    if command.atomic:
                        raise _RollBack(self._aborted(prepared, index, error)) from error
                    results.append(_refused(error))  # refused before writing anything: nothing to undo
                except IntegrityError as error:
                    if sqlstate_of(error) == UNIQUE_VIOLATION and constraint_of(error) in IDEMPOTENCY_CONSTRAINTS:
                        raise RetryTransaction from error  # run the batch again: the winner's row is found then
                    raise
            return results

        try:
            return BatchView(results=await run_transaction(self.ledger.engine, work))
        except _RollBack as rolled_back:
            return BatchView(results=rolled_back.results)

    @staticmethod
    def _aborted(prepared: list[_Prepared], failed: int, error: errors.LedgerError | None) -> list[BatchResultView]:
        assert error is not None
        culprit = prepared[failed].operation
        aborted = errors.BatchAborted(
            f"not applied: operation {failed} ({culprit.op} {culprit.request_id}) was refused with {error.code}"
        )
        return [_refused(error) if i == failed else _refused(aborted) for i in range(len(prepared))]
