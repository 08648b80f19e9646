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
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import msgspec
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ledger_service import metrics
from ledger_service.db import journal, locks, requests, tokens
from ledger_service.db.transactions import (
    UNIQUE_VIOLATION,
    RetryTransaction,
    after_commit,
    constraint_of,
    run_transaction,
    sqlstate_of,
)
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
)
from ledger_service.domain.lifecycle import RequestRow, RequestStatus, TokenState, body_of, fingerprint
from ledger_service.domain.planning import Operation, release_draft
from ledger_service.domain.pricing import MAX_AMOUNT, Prices
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
from ledger_service.settings import Settings

if TYPE_CHECKING:
    from ledger_service.services.lifecycle import LifecycleService

T = TypeVar("T")

IDEMPOTENCY_CONSTRAINTS = frozenset({"requests_pkey", "entries_reference_key", "entries_reverses_key"})
"""Unique keys two concurrent first attempts can race for; the loser re-runs and finds the winner's row."""


@dataclass(frozen=True, slots=True)
class Outcome(Generic[T]):
    """What an operation produced, and how: new, replayed from an earlier identical call, or already there."""

    value: T
    created: bool = True
    replayed: bool = False


class LedgerService:
    def __init__(self, engine: AsyncEngine, settings: Settings, lifecycle: LifecycleService | None = None) -> None:
        self.engine = engine
        self.settings = settings
        self.lifecycle = lifecycle
        """Runs holds, settlements, refunds and consumptions (services/lifecycle.py)."""

    async def _transaction(self, work: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        """Run a write in one transaction; a lost race for an idempotency key re-runs it to find the winner."""

        async def guarded(conn: AsyncConnection) -> T:
            try:
                return await work(conn)
            except IntegrityError as error:
                if sqlstate_of(error) == UNIQUE_VIOLATION and constraint_of(error) in IDEMPOTENCY_CONSTRAINTS:
                    raise RetryTransaction from error
                raise

        return await run_transaction(self.engine, guarded)

    # Funding ---------------------------------------------------------------------------------------------------

    async def topup(self, command: TopupCommand) -> Outcome[FundingView]:
        return await self._fund(EntryKind.TOPUP, command)

    async def adjust(self, command: AdjustmentCommand) -> Outcome[FundingView]:
        return await self._fund(EntryKind.ADJUSTMENT, command)

    async def _fund(self, kind: EntryKind, command: TopupCommand | AdjustmentCommand) -> Outcome[FundingView]:
        digest = fingerprint(str(kind), body_of(command))

        async def work(conn: AsyncConnection) -> Outcome[FundingView]:
            existing = await journal.entry_by_reference(conn, command.reference)
            if existing is not None:
                entry, stored_digest = existing
                if stored_digest != digest:
                    raise errors.IdempotencyConflict(f"reference {command.reference!r} was used for another request")
                user = await self._user(conn, command.user_id)
                return Outcome(FundingView(entry=entry, user=user), created=False, replayed=True)
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

        return await self._transaction(work)

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

        return await self._transaction(work)

    # The request lifecycle -------------------------------------------------------------------------------------

    async def open_hold(self, command: HoldCommand) -> Outcome[HoldView]:
        """Reserve the estimate from the user's quota (and a limited token's allowance), or refuse."""
        return await self._lifecycle(Operation("hold", command.request_id, command))

    async def settle(self, request_id: str, command: SettleCommand) -> Outcome[HoldView]:
        """Charge the real cost: release the hold, credit the channel, give back (or take) the difference."""
        return await self._lifecycle(Operation("settle", request_id, command))

    async def refund(self, request_id: str, command: RefundCommand) -> Outcome[HoldView]:
        """Give the hold back after a failed upstream call."""
        return await self._lifecycle(Operation("refund", request_id, command))

    async def consume(self, command: ConsumptionCommand) -> Outcome[HoldView]:
        """Charge a call that had no hold (post-paid calls, images). No balance check: the usage happened."""
        return await self._lifecycle(Operation("consume", command.request_id, command))

    async def _lifecycle(self, operation: Operation) -> Outcome[HoldView]:
        if self.lifecycle is None:
            raise RuntimeError("this LedgerService was built without a lifecycle pool")
        result = await self.lifecycle.run_one(operation)
        if isinstance(result, errors.LedgerError):
            raise result
        return Outcome(result.row.view(), created=result.created, replayed=result.replayed)

    async def reverse(self, entry_id: int, command: ReverseCommand) -> Outcome[EntryView]:
        """Post the exact opposite of an entry (at most once, idempotent by reference)."""
        digest = fingerprint("reversal", {"entry_id": entry_id, **body_of(command)})

        async def work(conn: AsyncConnection) -> Outcome[EntryView]:
            existing = await journal.entry_by_reference(conn, command.reference)
            if existing is not None:
                entry, stored_digest = existing
                if stored_digest != digest:
                    raise errors.IdempotencyConflict(f"reference {command.reference!r} was used for another request")
                return Outcome(entry, created=False, replayed=True)
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

        return await self._transaction(work)

    async def expire_due_holds(self, *, batch: int = 200) -> int:
        """Expire (refund, entry kind `expire`) open holds past expires_at; returns how many were expired.

        Rows are locked with SKIP LOCKED, so several processes share the work and never expire a hold twice; a
        hold being settled or refunded at this moment is skipped and resolved by that call instead.
        """

        async def work(conn: AsyncConnection) -> int:
            due = await requests.lock_due_holds(conn, limit=batch)
            for row in due:
                await self._release(conn, row, EntryKind.EXPIRE, {"reason": "expired"})
                await requests.resolve(conn, row.request_id, status=RequestStatus.EXPIRED.value)
            if due:
                after_commit(conn, lambda: metrics.HOLDS_EXPIRED.inc(len(due)))
            return len(due)

        total = 0
        while True:
            expired: int = await self._transaction(work)
            total += expired
            if expired < batch:
                return total

    async def _release(self, conn: AsyncConnection, row: RequestRow, kind: EntryKind, details: dict[str, Any]) -> None:
        """Post the refund or expiry of whatever the hold holds (nothing for a trusted hold)."""
        if row.amount:
            await journal.insert_entry(conn, release_draft(row, kind, details))

    # Reads -----------------------------------------------------------------------------------------------------

    async def hold(self, request_id: str) -> HoldDetailView:
        async def work(conn: AsyncConnection) -> HoldDetailView:
            row = await requests.get(conn, request_id)
            if row is None:
                raise errors.HoldNotFound(f"no hold with request_id {request_id!r}")
            entries = await journal.entries_of_request(conn, request_id)
            return HoldDetailView(**msgspec.structs.asdict(row.view()), entries=entries)

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


__all__ = ["LedgerService", "Outcome", "Prices"]
