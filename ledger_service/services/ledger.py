"""The ledger's operations: funding, token allowances, and the request lifecycle.

Rule: an operation decides whether to refuse (raise a LedgerError) before its first write. Batches rely on it: a
refused operation has written nothing, so it needs no savepoint to undo (services/batch.py).

Each public method is one database transaction run by `run_transaction` (committed here, retried whole on
serialization failures and deadlocks). The methods decide with the domain functions and write with the db
modules; they never build SQL and never see HTTP.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import msgspec
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ledger_service.db import journal, locks, requests, tokens
from ledger_service.db.transactions import run_transaction
from ledger_service.domain import accounts, errors
from ledger_service.domain.accounts import SubLedger
from ledger_service.domain.audit import check_reversible
from ledger_service.domain.entries import (
    EntryDraft,
    EntryKind,
    Posting,
    allowance_postings,
    funding_postings,
    reversal_postings,
    without_admin_details,
)
from ledger_service.domain.lifecycle import TokenState, body_of, fingerprint
from ledger_service.domain.operations import Consume, Hold, Operation, Refund, Settle
from ledger_service.domain.pricing import MAX_AMOUNT
from ledger_service.schemas import (
    AdjustmentCommand,
    ChannelView,
    ConsumptionCommand,
    EntryView,
    FundingView,
    HoldCommand,
    HoldDetailView,
    HoldView,
    RefundCommand,
    ReverseCommand,
    SettleCommand,
    TokenCommand,
    TokenView,
    TopupCommand,
    UserView,
)
from ledger_service.services.lifecycle import LifecycleService, hold_view
from ledger_service.settings import Settings

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Outcome(Generic[T]):
    """What an operation produced, and how: new, replayed from an earlier identical call, or already there."""

    value: T
    created: bool = True
    replayed: bool = False


class LedgerService:
    def __init__(self, engine: AsyncEngine, settings: Settings, lifecycle: LifecycleService) -> None:
        self.engine = engine
        self.settings = settings
        self.lifecycle = lifecycle
        """Runs holds, settlements, refunds and consumptions (services/lifecycle.py)."""

    # Funding ---------------------------------------------------------------------------------------------------

    async def topup(self, command: TopupCommand) -> Outcome[FundingView]:
        return await self._fund(EntryKind.TOPUP, command)

    async def adjust(self, command: AdjustmentCommand) -> Outcome[FundingView]:
        return await self._fund(EntryKind.ADJUSTMENT, command)

    async def _fund(self, kind: EntryKind, command: TopupCommand | AdjustmentCommand) -> Outcome[FundingView]:
        digest = fingerprint(str(kind), body_of(command))

        async def work(conn: AsyncConnection) -> Outcome[FundingView]:
            earlier = await _replayed_by_reference(conn, command.reference, digest)
            if earlier is not None:
                user = await self._user(conn, command.user_id)
                return Outcome(FundingView(entry=earlier, user=user), created=False, replayed=True)
            details: dict[str, Any] = {"amount": command.amount}
            if command.note is not None:
                details["note"] = command.note
            draft = EntryDraft(
                kind=kind,
                postings=funding_postings(command.user_id, command.amount),
                user_id=command.user_id,
                reference=command.reference,
                details=details,
            )
            stored = await journal.insert_entry(conn, draft, fingerprint=digest)
            entry_view = await journal.get_entry(conn, stored.id)
            assert entry_view is not None
            return Outcome(FundingView(entry=entry_view, user=await self._user(conn, command.user_id)))

        return await run_transaction(self.engine, work)

    # Tokens ----------------------------------------------------------------------------------------------------

    async def set_token(self, token_id: int, command: TokenCommand) -> Outcome[TokenView]:
        """Register a token or change its allowance, posting the difference to the allowance ledger."""

        async def work(conn: AsyncConnection) -> Outcome[TokenView]:
            await locks.lock_user(conn, command.user_id)
            existing = await tokens.get(conn, token_id)
            if existing is not None and existing.user_id != command.user_id:
                raise errors.TokenUserMismatch(f"token {token_id} belongs to another user")
            current = await journal.balance(conn, accounts.token(token_id), SubLedger.ALLOWANCE)
            target = 0 if command.unlimited else (command.remaining or 0)
            delta = target - current
            if abs(delta) > MAX_AMOUNT:
                raise errors.ValidationFailed(f"the allowance change {delta} exceeds {MAX_AMOUNT}")
            if not await tokens.save(conn, tokens.TokenRow(token_id, command.user_id, command.unlimited)):
                raise errors.TokenUserMismatch(f"token {token_id} belongs to another user")
            if delta:
                draft = EntryDraft(
                    kind=EntryKind.ALLOWANCE,
                    postings=allowance_postings(token_id, delta),
                    user_id=command.user_id,
                    token_id=token_id,
                    details={"previous": current, "remaining": target, "unlimited": command.unlimited},
                )
                await journal.insert_entry(conn, draft)
            view = await self._token(conn, token_id)
            assert view is not None
            return Outcome(view, created=existing is None)

        return await run_transaction(self.engine, work)

    # The request lifecycle -------------------------------------------------------------------------------------

    async def open_hold(self, command: HoldCommand) -> Outcome[HoldView]:
        """Reserve the estimate from the user's quota (and a limited token's allowance), or refuse."""
        return await self._lifecycle(Hold(command))

    async def settle(self, request_id: str, command: SettleCommand) -> Outcome[HoldView]:
        """Charge the real cost: release the hold, credit the channel, give back (or take) the difference."""
        return await self._lifecycle(Settle(request_id, command))

    async def refund(self, request_id: str, command: RefundCommand) -> Outcome[HoldView]:
        """Give the hold back after a failed upstream call."""
        return await self._lifecycle(Refund(request_id, command))

    async def consume(self, command: ConsumptionCommand) -> Outcome[HoldView]:
        """Charge a call that had no hold (post-paid calls, images). No balance check: the usage happened."""
        return await self._lifecycle(Consume(command))

    async def _lifecycle(self, operation: Operation) -> Outcome[HoldView]:
        result = await self.lifecycle.run_one(operation)
        if isinstance(result, errors.LedgerError):
            raise result
        return Outcome(hold_view(result.row), created=result.created, replayed=result.replayed)

    async def reverse(self, entry_id: int, command: ReverseCommand) -> Outcome[EntryView]:
        """Post the exact opposite of an entry (at most once, idempotent by reference)."""
        digest = fingerprint("reversal", {"entry_id": entry_id, **body_of(command)})

        async def work(conn: AsyncConnection) -> Outcome[EntryView]:
            earlier = await _replayed_by_reference(conn, command.reference, digest)
            if earlier is not None:
                return Outcome(earlier, created=False, replayed=True)
            original = await journal.get_entry(conn, entry_id)
            if original is None:
                raise errors.EntryNotFound(f"no entry with id {entry_id}")
            check_reversible(original.kind, (p.account for p in original.postings))
            if await journal.reversal_of(conn, entry_id) is not None:
                raise errors.AlreadyReversed(f"entry {entry_id} is already reversed")
            charged = await journal.charge_of(conn, entry_id)
            details: dict[str, Any] = {"reverses_kind": original.kind}
            if command.note is not None:
                details["note"] = command.note
            if charged is not None:  # a reversed charge takes its usage with it, for the usage report
                details.update(
                    model=original.details.get("model"),
                    prompt_tokens=-int(original.details.get("prompt_tokens", 0)),
                    completion_tokens=-int(original.details.get("completion_tokens", 0)),
                )
                if "cached_tokens" in original.details:
                    details["cached_tokens"] = -int(original.details["cached_tokens"])
            draft = EntryDraft(
                kind=EntryKind.REVERSAL,
                postings=reversal_postings(
                    Posting(SubLedger(p.ledger), p.account, p.amount) for p in original.postings
                ),
                request_id=original.request_id,
                user_id=original.user_id,
                token_id=original.token_id,
                channel_id=original.channel_id,
                reference=command.reference,
                reverses=entry_id,
                details=details,
            )
            stored = await journal.insert_entry(
                conn, draft, charged=None if charged is None else -charged, fingerprint=digest
            )
            created = await journal.get_entry(conn, stored.id)
            assert created is not None
            return Outcome(created)

        return await run_transaction(self.engine, work)

    # Reads -----------------------------------------------------------------------------------------------------

    async def hold(self, request_id: str, *, admin_details: bool = True) -> HoldDetailView:
        """The hold and its request's entries; without admins' free text unless `admin_details` (a relay's view)."""

        async def work(conn: AsyncConnection) -> HoldDetailView:
            row = await requests.get(conn, request_id)
            if row is None:
                raise errors.HoldNotFound(f"no hold with request_id {request_id!r}")
            entries = await journal.entries_of_request(conn, request_id)
            if not admin_details:
                entries = [msgspec.structs.replace(e, details=without_admin_details(e.details)) for e in entries]
            return HoldDetailView(**msgspec.structs.asdict(hold_view(row)), entries=entries)

        return await self._read(work)

    async def entry(self, entry_id: int) -> EntryView:
        async def work(conn: AsyncConnection) -> EntryView:
            found = await journal.get_entry(conn, entry_id)
            if found is None:
                raise errors.EntryNotFound(f"no entry with id {entry_id}")
            return found

        return await self._read(work)

    async def user(self, user_id: int) -> UserView:
        return await self._read(lambda conn: self._user(conn, user_id))

    async def token(self, token_id: int) -> TokenView:
        async def work(conn: AsyncConnection) -> TokenView:
            view = await self._token(conn, token_id)
            if view is None:
                raise errors.TokenNotFound(f"token {token_id} is not registered")
            return view

        return await self._read(work)

    async def channel(self, channel_id: int) -> ChannelView:
        async def work(conn: AsyncConnection) -> ChannelView:
            used, count = await journal.usage(conn, "channel", channel_id)
            return ChannelView(channel_id=channel_id, used=used, request_count=count)

        return await self._read(work)

    async def _read(self, work: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        # Several statements make up one view: read them from one snapshot so the numbers agree.
        return await run_transaction(self.engine, work, isolation_level="REPEATABLE READ")

    async def _user(self, conn: AsyncConnection, user_id: int) -> UserView:
        available = await journal.balance(conn, accounts.user(user_id), SubLedger.QUOTA)
        held = await requests.held_by(conn, user_id=user_id)
        used, count = await journal.usage(conn, "user", user_id)
        return UserView(user_id=user_id, available=available, held=held, used=used, request_count=count)

    async def _token_state(self, conn: AsyncConnection, token_id: int) -> TokenState | None:
        row = await tokens.get(conn, token_id)
        if row is None:
            return None
        remaining = 0 if row.unlimited else await journal.balance(conn, accounts.token(token_id), SubLedger.ALLOWANCE)
        return TokenState(token_id=token_id, user_id=row.user_id, unlimited=row.unlimited, remaining=remaining)

    async def _token(self, conn: AsyncConnection, token_id: int) -> TokenView | None:
        state = await self._token_state(conn, token_id)
        if state is None:
            return None
        held = await requests.held_by(conn, token_id=token_id)
        used, _ = await journal.usage(conn, "token", token_id)
        return TokenView(
            token_id=token_id,
            user_id=state.user_id,
            unlimited=state.unlimited,
            remaining=None if state.unlimited else state.remaining,
            held=held,
            used=used,
        )


async def _replayed_by_reference(conn: AsyncConnection, reference: str, digest: bytes) -> EntryView | None:
    """The entry an earlier call with this idempotency reference posted, if the same call; a conflict if another."""
    existing = await journal.entry_by_reference(conn, reference)
    if existing is None:
        return None
    entry, stored_digest = existing
    if stored_digest != digest:
        raise errors.IdempotencyConflict(f"reference {reference!r} was used for another request")
    return entry
