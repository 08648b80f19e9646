"""Coalescing of single lifecycle calls (services/lifecycle.py, docs/design.md#coalescing-single-calls).

The groups are observed by wrapping `LifecycleService.run`, the one place a group goes to the database; a gate
(an asyncio.Event) holds the first group in flight for as long as a test needs, so nothing depends on timing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import replace

import pytest

from ledger_service.domain import errors
from ledger_service.domain.operations import Hold, Operation
from ledger_service.domain.planning import Planned, Result
from ledger_service.schemas import HoldCommand, TokenCommand, TopupCommand
from ledger_service.services.ledger import LedgerService
from ledger_service.services.lifecycle import LifecycleService


class GatedLifecycle(LifecycleService):
    """Records every group it applies; the first group waits for `gate` before it goes to the database."""

    def __init__(self, base: LifecycleService) -> None:
        super().__init__(base.pool, base.settings, base.seen)
        self.gate = asyncio.Event()
        self.first_group_waiting = asyncio.Event()
        self.groups: list[list[str]] = []
        self.calls = 0
        self.expected_calls = 0
        self.all_called = asyncio.Event()

    async def run_one(self, operation: Operation) -> Result:
        self.calls += 1
        if self.calls == self.expected_calls:
            self.all_called.set()  # this call queues in this same step, before any other task runs
        return await super().run_one(operation)

    async def run(self, operations: Sequence[Operation], *, atomic: bool = False) -> list[Result]:
        self.groups.append([operation.request_id for operation in operations])
        if len(self.groups) == 1:
            self.first_group_waiting.set()
            await self.gate.wait()
        return await super().run(operations, atomic=atomic)


@pytest.fixture
async def funded(service: LedgerService) -> LedgerService:
    """Users 1 to 3, each with an unlimited token of the same id; user 3 has too little quota for any hold."""
    for user_id, amount in ((1, 1_000_000), (2, 1_000_000), (3, 1)):
        await service.topup(TopupCommand(user_id=user_id, amount=amount, reference=f"fund-{user_id}"))
        await service.set_token(user_id, TokenCommand(user_id=user_id, unlimited=True))
    return service


def hold(request_id: str, user_id: int) -> Operation:
    command = HoldCommand(request_id=request_id, user_id=user_id, token_id=user_id, model="gpt-4o", prompt_tokens=10)
    return Hold(command)


def lifecycle_with(service: LedgerService, coalesce_groups: int) -> GatedLifecycle:
    assert service.lifecycle is not None
    base = service.lifecycle
    gated = GatedLifecycle(base)
    gated.settings = replace(base.settings, coalesce_groups=coalesce_groups)
    return gated


async def test_calls_arriving_while_a_group_is_in_flight_form_the_next_group(funded: LedgerService) -> None:
    lifecycle = lifecycle_with(funded, coalesce_groups=1)
    lifecycle.expected_calls = 5
    first = asyncio.create_task(lifecycle.run_one(hold("a", 1)))
    await lifecycle.first_group_waiting.wait()
    later = [asyncio.create_task(lifecycle.run_one(hold(request_id, 2))) for request_id in ("b", "c", "d")]
    refused = asyncio.create_task(lifecycle.run_one(hold("e", 3)))
    await lifecycle.all_called.wait()
    assert lifecycle.groups_in_flight == 1, "no second group while one is in flight"
    lifecycle.gate.set()
    answers = await asyncio.gather(first, *later, refused)
    assert lifecycle.groups == [["a"], ["b", "c", "d", "e"]]
    for answer, request_id in zip(answers[:4], "abcd", strict=True):
        assert isinstance(answer, Planned)
        assert (answer.row.request_id, answer.created) == (request_id, True)
    assert isinstance(answers[4], errors.InsufficientUserQuota), "a refusal in a group is that call's alone"


async def test_more_groups_in_flight_when_configured(funded: LedgerService) -> None:
    lifecycle = lifecycle_with(funded, coalesce_groups=2)
    lifecycle.expected_calls = 2
    first = asyncio.create_task(lifecycle.run_one(hold("a", 1)))
    await lifecycle.first_group_waiting.wait()
    second = asyncio.create_task(lifecycle.run_one(hold("b", 2)))
    await lifecycle.all_called.wait()
    assert lifecycle.groups_in_flight == 2
    assert isinstance(await second, Planned), "a second group goes while the first is held"
    assert lifecycle.groups == [["a"], ["b"]]
    lifecycle.gate.set()
    assert isinstance(await first, Planned)


async def test_the_default_is_one_group_in_flight(funded: LedgerService) -> None:
    assert funded.lifecycle is not None
    assert funded.lifecycle.settings.coalesce_groups == 1
