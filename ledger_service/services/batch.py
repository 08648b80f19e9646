"""Batches (contract section 9): many lifecycle operations in one request and one database transaction.

This is the high-throughput path: the whole batch is planned from one read and applied by one statement, so a batch
of 100 operations costs about as many round trips as a single call, and one commit (services/lifecycle.py).

- Not atomic (the default): a refused operation is answered with its problem, the others stand. A refused
  operation changes nothing in the plan (a rule of domain/planning.py, tested), so it needs nothing undone.
- Atomic: the first refusal means nothing is applied; that operation gets its problem, every other one a
  `batch_aborted` problem naming it.

Either way each result is what the single call would have answered: its status code and body. Operations are
planned in order, so a settlement may follow its hold in the same batch. The users and requests a batch locks are
locked in ascending order, so two batches touching the same users or requests cannot deadlock on each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from ledger_service.domain import errors
from ledger_service.domain.operations import CREATES_A_REQUEST, Consume, Hold, Operation, Refund, Settle
from ledger_service.domain.planning import Planned
from ledger_service.schemas import (
    BatchCommand,
    BatchOperation,
    BatchResultView,
    BatchView,
    ConsumptionCommand,
    HoldCommand,
    ProblemView,
    RefundCommand,
    SettleCommand,
)
from ledger_service.services.lifecycle import LifecycleService, hold_view


def _decoded(operation: BatchOperation) -> Operation:
    """A batch operation as the single call would have received it."""
    body = dict(operation.body)
    if operation.op in ("hold", "consume"):
        if body.setdefault("request_id", operation.request_id) != operation.request_id:
            raise errors.ValidationFailed("body.request_id differs from the operation's request_id")
        if operation.op == "hold":
            return Hold(msgspec.convert(body, HoldCommand, strict=True))
        return Consume(msgspec.convert(body, ConsumptionCommand, strict=True))
    if operation.op == "settle":
        return Settle(operation.request_id, msgspec.convert(body, SettleCommand, strict=True))
    return Refund(operation.request_id, msgspec.convert(body, RefundCommand, strict=True))


@dataclass(frozen=True, slots=True)
class _Prepared:
    """An operation whose body decoded: ready to run. `refusal` is set instead when it did not."""

    operation: BatchOperation
    run: Operation | None
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


def _answered(planned: Planned, operation: Operation) -> BatchResultView:
    status = 201 if planned.created and isinstance(operation, CREATES_A_REQUEST) else 200
    return BatchResultView(status=status, body=msgspec.to_builtins(hold_view(planned.row)))


class BatchService:
    def __init__(self, lifecycle: LifecycleService) -> None:
        self.lifecycle = lifecycle

    @staticmethod
    def _prepare(operation: BatchOperation) -> _Prepared:
        try:
            return _Prepared(operation, _decoded(operation))
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
        runnable = [p.run for p in prepared if p.run is not None]
        outcomes = iter(await self.lifecycle.run(runnable, atomic=command.atomic) if runnable else [])
        results: list[BatchResultView] = []
        for index, item in enumerate(prepared):
            if item.refusal is not None:
                results.append(_refused(item.refusal))
                continue
            outcome = next(outcomes, None)
            if outcome is None:  # an atomic batch stopped planning at an earlier refusal
                break
            if isinstance(outcome, errors.LedgerError):
                if command.atomic:
                    return BatchView(results=self._aborted(prepared, index, outcome))
                results.append(_refused(outcome))
                continue
            assert item.run is not None
            results.append(_answered(outcome, item.run))
        return BatchView(results=results)

    @staticmethod
    def _aborted(prepared: list[_Prepared], failed: int, error: errors.LedgerError | None) -> list[BatchResultView]:
        assert error is not None
        culprit = prepared[failed].operation
        aborted = errors.BatchAborted(
            f"not applied: operation {failed} ({culprit.op} {culprit.request_id}) was refused with {error.code}"
        )
        return [_refused(error) if i == failed else _refused(aborted) for i in range(len(prepared))]
