"""Planning lifecycle operations: decide every hold, settlement, refund and consumption of a call or a batch.

The planner works on a `Snapshot` (what the database said, read in one statement) and produces a `Plan`: the
requests to create or move, the entries to post, and the premises the decisions rest on (the balances and request
statuses that were read). The database applies a plan only if its premises still hold (see
`ledger_lifecycle_apply` and docs/design.md). Operations are planned in order against a running view of the
balances and requests, so a batch decides exactly as the same calls made one after another would.

Rule: an operation raises its refusal before it changes the planner's state, so a refused operation leaves no
trace in the plan (a non-atomic batch answers it and goes on).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, NamedTuple

from ledger_service.domain import accounts, errors
from ledger_service.domain.accounts import SubLedger
from ledger_service.domain.entries import (
    EntryDraft,
    EntryKind,
    direct_charge_postings,
    hold_postings,
    release_postings,
    settle_postings,
)
from ledger_service.domain.lifecycle import (
    RefundMode,
    RequestKind,
    RequestRow,
    RequestStatus,
    SettleMode,
    TokenState,
    body_of,
    check_token,
    decide_hold,
    fingerprint,
    plan_refund,
    plan_settle,
)
from ledger_service.domain.pricing import AmountOutOfRange, Prices
from ledger_service.schemas import ConsumptionCommand, HoldCommand, RefundCommand, SettleCommand

OperationName = Literal["hold", "settle", "refund", "consume"]
Command = HoldCommand | SettleCommand | RefundCommand | ConsumptionCommand


@dataclass(frozen=True, slots=True)
class Operation:
    """One lifecycle call: what it is, the request it is about, and its decoded body."""

    op: OperationName
    request_id: str
    command: Command


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What the database said about the requests, tokens, balances and prices a set of operations names."""

    now: datetime
    requests: Mapping[str, RequestRow]
    tokens: Mapping[int, tuple[int, bool]]
    """token_id -> (user_id, unlimited)."""
    balances: Mapping[tuple[str, SubLedger], int]
    """The users' quota and the limited tokens' allowances (an unlimited token's allowance is not read)."""
    prices: Callable[[str, str], Prices]
    """(model, group) -> the prices a request is priced with (defaults for unknown models and groups)."""
    seen_at: str | None = None
    """Where in the database's history the balances were read (opaque here): the apply checks a balance premise
    as the balance read plus what was posted since. None for a read inside a transaction, whose plan has no
    balance premises (its users are locked)."""


class Planned(NamedTuple):
    """The answer an operation gets if its plan is applied: the request after it, and how it came about."""

    row: RequestRow
    created: bool
    replayed: bool = False


Result = Planned | errors.LedgerError


@dataclass(frozen=True, slots=True)
class Bounds:
    """A closed range of balances; None is unbounded on that side."""

    low: int | None = None
    high: int | None = None

    def narrowed(self, low: int | None, high: int | None) -> Bounds:
        return Bounds(
            low=low if self.low is None else self.low if low is None else max(self.low, low),
            high=high if self.high is None else self.high if high is None else min(self.high, high),
        )


@dataclass(slots=True)
class Plan:
    """Everything a set of operations writes, and the premises under which it may be written."""

    results: list[Result] = field(default_factory=list)
    lock_users: set[int] = field(default_factory=set)
    balance_bounds: dict[tuple[str, SubLedger], Bounds] = field(default_factory=dict)
    """For each balance a decision rests on: the range its value before the plan may take at apply time for every
    decision of the plan to come out the same (the planner works from the value read)."""
    expect_tokens: dict[int, bool] = field(default_factory=dict)
    expect_requests: dict[str, RequestStatus] = field(default_factory=dict)
    new_requests: dict[str, int | None] = field(default_factory=dict)
    """request_id -> expires_in seconds, for the requests this plan creates."""
    requests: dict[str, RequestRow] = field(default_factory=dict)
    """The final state of every request the plan creates or moves."""
    entries: list[tuple[EntryDraft, int | None]] = field(default_factory=list)
    """Each entry with what it charges (settlements and consumptions)."""
    events: list[tuple[str, str | None]] = field(default_factory=list)
    """Counters to move once the plan is committed: (name, label)."""

    @property
    def writes(self) -> bool:
        return bool(self.entries or self.requests)


def _priced(compute: Callable[..., int], **kwargs: int) -> int:
    try:
        return int(compute(**kwargs))
    except AmountOutOfRange as error:
        raise errors.ValidationFailed(str(error)) from None


def charge_of(prices: Prices, command: SettleCommand | ConsumptionCommand) -> int:
    """What a settlement or consumption charges: its explicit quota, else the priced charge of its tokens."""
    if command.quota is not None:
        return command.quota
    return _priced(prices.charge, prompt_tokens=command.prompt_tokens, completion_tokens=command.completion_tokens)


def wanted(operations: list[Operation]) -> dict[str, list[Any]]:
    """What the snapshot for these operations must contain (the read's arguments)."""
    request_ids: set[str] = set()
    token_ids: set[int] = set()
    accounts_wanted: set[tuple[str, str]] = set()
    models: set[str] = set()
    groups: set[str] = set()
    for operation in operations:
        request_ids.add(operation.request_id)
        command = operation.command
        if isinstance(command, HoldCommand | ConsumptionCommand):
            token_ids.add(command.token_id)
            models.add(command.model)
            groups.add(command.group)
        if isinstance(command, HoldCommand):
            accounts_wanted.add((accounts.user(command.user_id), str(SubLedger.QUOTA)))
            accounts_wanted.add((accounts.token(command.token_id), str(SubLedger.ALLOWANCE)))
    return {
        "request_ids": sorted(request_ids),
        "token_ids": sorted(token_ids),
        "accounts": [{"account": account, "ledger": ledger} for account, ledger in sorted(accounts_wanted)],
        "models": sorted(models),
        "groups": sorted(groups),
    }


def lock_targets(operations: list[Operation]) -> tuple[list[int], list[str]]:
    """The users whose balances or tokens the operations decide on (holds, consumptions), and the requests they may
    move (settle, refund)."""
    users = sorted(
        {op.command.user_id for op in operations if isinstance(op.command, HoldCommand | ConsumptionCommand)}
    )
    moved = sorted({op.request_id for op in operations if op.op in ("settle", "refund")})
    return users, moved


class Planner:
    """Plans operations in order against a running view of the snapshot."""

    def __init__(self, snapshot: Snapshot, *, pre_consumed_quota: int, trust_factor: int, hold_ttl: int) -> None:
        self.snapshot = snapshot
        self.pre_consumed_quota = pre_consumed_quota
        self.trust_factor = trust_factor
        self.hold_ttl = hold_ttl
        self.plan = Plan()
        self._balances = dict(snapshot.balances)

    def plan_all(self, operations: list[Operation], *, atomic: bool) -> Plan:
        """Plan every operation; an atomic plan stops at the first refusal and plans no write at all."""
        for operation in operations:
            try:
                self.plan.results.append(self.plan_one(operation))
            except errors.LedgerError as refusal:
                self.plan.results.append(refusal)
                if atomic:
                    return Plan(results=self.plan.results)
        return self.plan

    def plan_one(self, operation: Operation) -> Planned:
        command = operation.command
        if isinstance(command, HoldCommand):
            return self._hold(command)
        if isinstance(command, SettleCommand):
            return self._settle(operation.request_id, command)
        if isinstance(command, RefundCommand):
            return self._refund(operation.request_id, command)
        return self._consume(command)

    # What the plan has seen and done so far ----------------------------------------------------------------------

    def _request(self, request_id: str) -> RequestRow | None:
        return self.plan.requests.get(request_id) or self.snapshot.requests.get(request_id)

    def _token(self, token_id: int, *, with_remaining: bool) -> TokenState | None:
        found = self.snapshot.tokens.get(token_id)
        if found is None:
            return None
        user_id, unlimited = found
        limited_and_wanted = with_remaining and not unlimited
        remaining = self._balance(accounts.token(token_id), SubLedger.ALLOWANCE) if limited_and_wanted else 0
        return TokenState(token_id=token_id, user_id=user_id, unlimited=unlimited, remaining=remaining)

    def _balance(self, account: str, ledger: SubLedger) -> int:
        """A balance as read plus this plan's postings so far."""
        return self._balances[(account, ledger)]

    def _require(
        self, account: str, ledger: SubLedger, *, at_least: int | None = None, at_most: int | None = None
    ) -> None:
        """A premise: the decision just made stays the same while the running balance stays in [at_least, at_most].

        Stored in terms of the balance before the plan: the running balance is that plus the plan's earlier
        postings, which are the same whatever other calls commit in between.
        """
        key = (account, ledger)
        earlier = self._balances[key] - self.snapshot.balances[key]
        bounds = self.plan.balance_bounds.get(key, Bounds())
        self.plan.balance_bounds[key] = bounds.narrowed(
            None if at_least is None else at_least - earlier, None if at_most is None else at_most - earlier
        )

    def _hold_premises(
        self, command: HoldCommand, token: TokenState, available: int, estimate: int, trusted: bool
    ) -> None:
        """What must still be true of the user's and token's balances for this hold's decision to stand."""
        user = accounts.user(command.user_id)
        allowance = accounts.token(command.token_id)
        self._require(user, SubLedger.QUOTA, at_least=estimate)
        if token.limited:
            self._require(allowance, SubLedger.ALLOWANCE, at_least=estimate)
        if self.trust_factor == 0:
            return
        threshold = self.trust_factor * estimate
        if trusted:  # both parts of the trust rule held, and must keep holding
            self._require(user, SubLedger.QUOTA, at_least=threshold + 1)
            if token.limited:
                self._require(allowance, SubLedger.ALLOWANCE, at_least=threshold + 1)
        elif available <= threshold:  # untrusted: keep the part of the rule that failed failing
            self._require(user, SubLedger.QUOTA, at_most=threshold)
        else:
            self._require(allowance, SubLedger.ALLOWANCE, at_most=threshold)

    def _post(self, draft: EntryDraft, charged: int | None = None) -> None:
        self.plan.entries.append((draft, charged))
        for posting in draft.postings:
            key = (posting.account, posting.ledger)
            if key in self._balances:
                self._balances[key] += posting.amount

    def _move(self, row: RequestRow, **changes: Any) -> RequestRow:
        """Record a lifecycle step of a request; a request that existed before the plan becomes a premise."""
        if row.request_id not in self.plan.new_requests and row.request_id not in self.plan.expect_requests:
            self.plan.expect_requests[row.request_id] = row.status
        moved = row._replace(**changes)
        self.plan.requests[row.request_id] = moved
        return moved

    def _create(
        self,
        command: HoldCommand | ConsumptionCommand,
        kind: RequestKind,
        token: TokenState,
        prices: Prices,
        digest: bytes,
        *,
        expires_in: int | None,
        channel_id: int | None = None,
        charged: int | None = None,
        **fields: Any,
    ) -> RequestRow:
        """Record a request this plan creates (a hold, or a consumption created settled), with its other `fields`."""
        row = RequestRow(
            request_id=command.request_id,
            kind=kind,
            user_id=command.user_id,
            token_id=command.token_id,
            token_limited=token.limited,
            group=command.group,
            model=command.model,
            prompt_tokens=command.prompt_tokens,
            prices=prices,
            request_fingerprint=digest,
            created_at=self.snapshot.now,  # until the database gives the real times (services/lifecycle.py)
            expires_at=None,
            read_at=self.snapshot.now,
            channel_id=channel_id,
            charged=charged,
            late=False,
            settle_fingerprint=None,
            refund_fingerprint=None,
            **fields,
        )
        self.plan.new_requests[command.request_id] = expires_in
        self.plan.requests[command.request_id] = row
        return row

    def _due(self, row: RequestRow) -> bool:
        return row.request_id not in self.plan.new_requests and row.due

    # The operations ------------------------------------------------------------------------------------------

    def _hold(self, command: HoldCommand) -> Planned:
        digest = fingerprint("hold", body_of(command))
        existing = self._request(command.request_id)
        if existing is not None:
            return _replay(existing, RequestKind.HOLD, digest)
        token = check_token(
            self._token(command.token_id, with_remaining=True), token_id=command.token_id, user_id=command.user_id
        )
        prices = self.snapshot.prices(command.model, command.group)
        estimate = (
            command.amount
            if command.amount is not None
            else _priced(
                prices.estimate,
                pre_consumed=self.pre_consumed_quota,
                prompt_tokens=command.prompt_tokens,
                max_tokens=command.max_tokens,
            )
        )
        available = self._balance(accounts.user(command.user_id), SubLedger.QUOTA)
        decision = decide_hold(available=available, token=token, estimate=estimate, trust_factor=self.trust_factor)
        # Decided: from here on the plan changes.
        self._hold_premises(command, token, available, estimate, decision.trusted)
        self.plan.lock_users.add(command.user_id)
        self.plan.expect_tokens[command.token_id] = token.unlimited
        row = self._create(
            command,
            RequestKind.HOLD,
            token,
            prices,
            digest,
            expires_in=command.expires_in or self.hold_ttl,
            status=RequestStatus.OPEN,
            max_tokens=command.max_tokens,
            amount=decision.amount,
            trusted=decision.trusted,
        )
        self.plan.events.append(("holds_opened", "true" if decision.trusted else "false"))
        if decision.amount:
            details = {
                "model": command.model,
                "group": command.group,
                "prompt_tokens": command.prompt_tokens,
                "max_tokens": command.max_tokens,
                "pre_consumed_quota": self.pre_consumed_quota,
                "estimate": estimate,
                "explicit_amount": command.amount is not None,
                **prices.as_details(),
            }
            self._post(
                EntryDraft(
                    kind=EntryKind.HOLD,
                    postings=hold_postings(
                        request_id=command.request_id,
                        user_id=command.user_id,
                        token_id=command.token_id,
                        amount=decision.amount,
                        limited=token.limited,
                    ),
                    request_id=command.request_id,
                    user_id=command.user_id,
                    token_id=command.token_id,
                    details=details,
                )
            )
        return Planned(row, created=True)

    def _existing_hold(self, request_id: str) -> RequestRow:
        row = self._request(request_id)
        if row is None:
            raise errors.HoldNotFound(f"no hold with request_id {request_id!r}")
        if row.kind is RequestKind.CONSUMPTION:
            raise errors.HoldAlreadySettled(f"{request_id!r} is a consumption: it was charged when recorded")
        return row

    def _settle(self, request_id: str, command: SettleCommand) -> Planned:
        digest = fingerprint("settle", body_of(command))
        row = self._existing_hold(request_id)
        mode = plan_settle(
            status=row.status, due=self._due(row), settled_with=row.settle_fingerprint, fingerprint=digest
        )
        if mode is SettleMode.REPLAY:
            return Planned(row, created=False, replayed=True)
        charge = charge_of(row.prices, command)
        if mode is SettleMode.EXPIRE_THEN_LATE:
            self._release(row, EntryKind.EXPIRE, {"reason": "expired"})
            self.plan.events.append(("holds_expired", None))
        late = mode is not SettleMode.SETTLE_HOLD
        self.plan.events.append(("holds_settled", "true" if late else "false"))
        held = 0 if late else row.amount
        if held:
            postings = settle_postings(
                request_id=row.request_id,
                user_id=row.user_id,
                token_id=row.token_id,
                channel_id=command.channel_id,
                held=held,
                charge=charge,
                limited=row.token_limited,
            )
        else:
            postings = direct_charge_postings(
                user_id=row.user_id,
                token_id=row.token_id,
                channel_id=command.channel_id,
                charge=charge,
                limited=row.token_limited,
            )
        details = {
            "model": row.model,
            "group": row.group,
            "prompt_tokens": command.prompt_tokens,
            "completion_tokens": command.completion_tokens,
            "held": held,
            "charged": charge,
            "explicit_quota": command.quota is not None,
            "late": late,
            **row.prices.as_details(),
        }
        self._post(
            EntryDraft(
                kind=EntryKind.SETTLE,
                postings=postings,
                request_id=row.request_id,
                user_id=row.user_id,
                token_id=row.token_id,
                channel_id=command.channel_id,
                details=details,
            ),
            charge,
        )
        settled = self._move(
            row,
            status=RequestStatus.SETTLED,
            channel_id=command.channel_id,
            settled_prompt_tokens=command.prompt_tokens,
            completion_tokens=command.completion_tokens,
            charged=charge,
            late=late,
            settle_fingerprint=digest,
        )
        return Planned(settled, created=False)

    def _refund(self, request_id: str, command: RefundCommand) -> Planned:
        digest = fingerprint("refund", body_of(command))
        row = self._existing_hold(request_id)
        mode = plan_refund(
            status=row.status, due=self._due(row), refunded_with=row.refund_fingerprint, fingerprint=digest
        )
        if mode is RefundMode.REPLAY:
            return Planned(row, created=False, replayed=True)
        if mode is RefundMode.UNCHANGED:
            return Planned(row, created=False)
        if mode is RefundMode.EXPIRE:
            self._release(row, EntryKind.EXPIRE, {"reason": "expired"})
            self.plan.events.append(("holds_expired", None))
            return Planned(self._move(row, status=RequestStatus.EXPIRED), created=False)
        self._release(row, EntryKind.REFUND, {"reason": command.reason})
        self.plan.events.append(("holds_refunded", None))
        return Planned(self._move(row, status=RequestStatus.REFUNDED, refund_fingerprint=digest), created=False)

    def _release(self, row: RequestRow, kind: EntryKind, details: dict[str, Any]) -> None:
        """Post the refund or expiry of whatever the hold holds (nothing for a trusted hold)."""
        if not row.amount:
            return
        self._post(release_draft(row, kind, details))

    def _consume(self, command: ConsumptionCommand) -> Planned:
        digest = fingerprint("consumption", body_of(command))
        existing = self._request(command.request_id)
        if existing is not None:
            return _replay(existing, RequestKind.CONSUMPTION, digest)
        token = check_token(
            self._token(command.token_id, with_remaining=False), token_id=command.token_id, user_id=command.user_id
        )
        prices = self.snapshot.prices(command.model, command.group)
        charge = charge_of(prices, command)
        # The token's kind decides the postings: check it under the user's lock, which token changes take too.
        self.plan.lock_users.add(command.user_id)
        self.plan.expect_tokens[command.token_id] = token.unlimited
        row = self._create(
            command,
            RequestKind.CONSUMPTION,
            token,
            prices,
            digest,
            expires_in=None,
            status=RequestStatus.SETTLED,
            max_tokens=0,
            amount=0,
            trusted=False,
            channel_id=command.channel_id,
            charged=charge,
            settled_prompt_tokens=command.prompt_tokens,
            completion_tokens=command.completion_tokens,
        )
        self._post(
            EntryDraft(
                kind=EntryKind.CONSUME,
                postings=direct_charge_postings(
                    user_id=command.user_id,
                    token_id=command.token_id,
                    channel_id=command.channel_id,
                    charge=charge,
                    limited=token.limited,
                ),
                request_id=command.request_id,
                user_id=command.user_id,
                token_id=command.token_id,
                channel_id=command.channel_id,
                details={
                    "model": command.model,
                    "group": command.group,
                    "prompt_tokens": command.prompt_tokens,
                    "completion_tokens": command.completion_tokens,
                    "charged": charge,
                    "explicit_quota": command.quota is not None,
                    **prices.as_details(),
                },
            ),
            charge,
        )
        self.plan.events.append(("consumptions", None))
        return Planned(row, created=True)


def release_draft(row: RequestRow, kind: EntryKind, details: dict[str, Any]) -> EntryDraft:
    """The refund or expiry entry of a hold that holds something: everything held goes back."""
    return EntryDraft(
        kind=kind,
        postings=release_postings(
            request_id=row.request_id,
            user_id=row.user_id,
            token_id=row.token_id,
            held=row.amount,
            limited=row.token_limited,
        ),
        request_id=row.request_id,
        user_id=row.user_id,
        token_id=row.token_id,
        details={"held": row.amount, **{k: v for k, v in details.items() if v is not None}},
    )


def _replay(existing: RequestRow, kind: RequestKind, digest: bytes) -> Planned:
    """A request_id seen before: the same call gets the request back; anything else is a conflict."""
    if existing.kind is not kind or existing.request_fingerprint != digest:
        raise errors.IdempotencyConflict(f"request_id {existing.request_id!r} was used for another request")
    return Planned(existing, created=False, replayed=True)
