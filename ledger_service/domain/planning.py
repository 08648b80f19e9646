"""Planning lifecycle operations: decide every hold, settlement, refund, consumption and expiry of a call, a batch
or a round of the sweeper.

The planner works on a `Snapshot` (what the database said, read in one statement) and produces a `Plan`: the
requests to create or move, the entries to post, and the premises the decisions rest on (the balances and request
statuses that were read). The database applies a plan only if its premises still hold (see
`ledger_lifecycle_apply` and docs/design.md). Operations are planned in order against a running view of the
balances and requests, so a batch decides exactly as the same calls made one after another would.

Rule: an operation raises its refusal before it changes the planner's state, so a refused operation leaves no
trace in the plan (a non-atomic batch answers it and goes on).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

import msgspec

from ledger_service.domain import accounts, errors
from ledger_service.domain.accounts import SubLedger
from ledger_service.domain.entries import (
    EntryDraft,
    EntryKind,
    Posting,
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
    refund_mode,
    settle_mode,
)
from ledger_service.domain.operations import (
    Consume,
    ConsumptionCommand,
    Expire,
    Hold,
    HoldCommand,
    Operation,
    Refund,
    RefundCommand,
    Settle,
    SettleCommand,
)
from ledger_service.domain.pricing import AmountOutOfRange, Prices


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


class Event(enum.Enum):
    """What a plan did that the metrics count, once the plan is committed."""

    HOLD_OPENED = "hold_opened"
    HOLD_OPENED_TRUSTED = "hold_opened_trusted"
    HOLD_SETTLED = "hold_settled"
    HOLD_SETTLED_LATE = "hold_settled_late"
    HOLD_REFUNDED = "hold_refunded"
    HOLD_EXPIRED = "hold_expired"
    CONSUMED = "consumed"


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
    expires_in: dict[str, int | None] = field(default_factory=dict)
    """request_id -> seconds until it expires (None: never), for each request this plan creates."""
    requests: dict[str, RequestRow] = field(default_factory=dict)
    """The final state of every request the plan creates or moves."""
    entries: list[tuple[EntryDraft, int | None]] = field(default_factory=list)
    """Each entry with what it charges (settlements and consumptions)."""
    events: list[Event] = field(default_factory=list)

    @property
    def writes(self) -> bool:
        return bool(self.entries or self.requests)

    def creates(self, request_id: str) -> bool:
        return request_id in self.expires_in


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


@dataclass(slots=True)
class Wanted:
    """What a snapshot for some operations must hold, and, for a plan made under locks, what to lock first."""

    request_ids: set[str] = field(default_factory=set)
    token_ids: set[int] = field(default_factory=set)
    balances: set[tuple[str, SubLedger]] = field(default_factory=set)
    models: set[str] = field(default_factory=set)
    groups: set[str] = field(default_factory=set)
    lock_users: set[int] = field(default_factory=set)
    """The users whose balances or tokens the operations decide on (holds, consumptions)."""
    lock_requests: set[str] = field(default_factory=set)
    """The requests the operations may move (settle, refund, expire)."""


def wanted(operations: Sequence[Operation]) -> Wanted:
    """What the planner will ask of the snapshot for these operations."""
    want = Wanted()
    for operation in operations:
        want.request_ids.add(operation.request_id)
        if isinstance(operation, Hold | Consume):
            command = operation.command
            want.token_ids.add(command.token_id)
            want.models.add(command.model)
            want.groups.add(command.group)
            want.lock_users.add(command.user_id)
            if isinstance(command, HoldCommand):
                want.balances.add((accounts.user(command.user_id), SubLedger.QUOTA))
                want.balances.add((accounts.token(command.token_id), SubLedger.ALLOWANCE))
        else:
            want.lock_requests.add(operation.request_id)
    return want


class Planner:
    """Plans operations in order against a running view of the snapshot."""

    def __init__(self, snapshot: Snapshot, *, pre_consumed_quota: int, trust_factor: int, hold_ttl: int) -> None:
        self.snapshot = snapshot
        self.pre_consumed_quota = pre_consumed_quota
        self.trust_factor = trust_factor
        self.hold_ttl = hold_ttl
        self.plan = Plan()
        self._balances = dict(snapshot.balances)

    def plan_all(self, operations: Sequence[Operation], *, atomic: bool) -> Plan:
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
        match operation:
            case Hold(command):
                return self._hold(command)
            case Settle(request_id, command):
                return self._settle(request_id, command)
            case Refund(request_id, command):
                return self._refund(request_id, command)
            case Consume(command):
                return self._consume(command)
            case Expire(request_id):
                return self._expire_if_due(request_id)

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

    def _post(
        self,
        row: RequestRow,
        kind: EntryKind,
        postings: tuple[Posting, ...],
        details: dict[str, Any],
        *,
        charged: int | None = None,
    ) -> None:
        """Post an entry about `row` (its request, user, token and channel) and follow its postings."""
        draft = EntryDraft(
            kind=kind,
            postings=postings,
            request_id=row.request_id,
            user_id=row.user_id,
            token_id=row.token_id,
            channel_id=row.channel_id,
            details=details,
        )
        self.plan.entries.append((draft, charged))
        for posting in draft.postings:
            key = (posting.account, posting.ledger)
            if key in self._balances:
                self._balances[key] += posting.amount

    def _move(self, row: RequestRow, **changes: Any) -> RequestRow:
        """Record a lifecycle step of a request; a request that existed before the plan becomes a premise."""
        if not self.plan.creates(row.request_id) and row.request_id not in self.plan.expect_requests:
            self.plan.expect_requests[row.request_id] = row.status
        moved = msgspec.structs.replace(row, **changes)
        self.plan.requests[row.request_id] = moved
        return moved

    def _create(
        self,
        command: HoldCommand | ConsumptionCommand,
        token: TokenState,
        prices: Prices,
        *,
        expires_in: int | None,
        **fields: Any,
    ) -> RequestRow:
        """Record a request this plan creates (a hold, or a consumption created settled), with its other `fields`.

        Its user's lock is taken, and the token's kind (which decides the postings) becomes a premise."""
        self.plan.lock_users.add(command.user_id)
        self.plan.expect_tokens[command.token_id] = token.unlimited
        row = RequestRow(
            request_id=command.request_id,
            user_id=command.user_id,
            token_id=command.token_id,
            token_limited=token.limited,
            group=command.group,
            model=command.model,
            prompt_tokens=command.prompt_tokens,
            model_ratio=prices.model_ratio,
            completion_ratio=prices.completion_ratio,
            group_ratio=prices.group_ratio,
            model_price=prices.model_price,
            created_at=self.snapshot.now,  # until the database gives the real times (services/lifecycle.py)
            **fields,
        )
        self.plan.expires_in[command.request_id] = expires_in
        self.plan.requests[command.request_id] = row
        return row

    def _due(self, row: RequestRow) -> bool:
        """Judged by the read's clock. A request this plan created is never due: the database has not yet given
        it an expiry."""
        return row.is_due(self.snapshot.now)

    def _existing_hold(self, request_id: str) -> RequestRow:
        row = self._request(request_id)
        if row is None:
            raise errors.HoldNotFound(f"no hold with request_id {request_id!r}")
        if row.kind is RequestKind.CONSUMPTION:
            raise errors.HoldAlreadySettled(f"{request_id!r} is a consumption: it was charged when recorded")
        return row

    def _expire(self, row: RequestRow) -> RequestRow:
        """The one way a hold expires: whatever it holds goes back (entry kind `expire`; nothing for a trusted
        hold), and it is expired."""
        self._release(row, EntryKind.EXPIRE, {"reason": "expired"})
        self.plan.events.append(Event.HOLD_EXPIRED)
        return self._move(row, status=RequestStatus.EXPIRED)

    def _release(self, row: RequestRow, kind: EntryKind, details: dict[str, Any]) -> None:
        """Post the refund or expiry of whatever the hold holds (nothing for a trusted hold)."""
        if row.amount:
            postings = release_postings(
                request_id=row.request_id,
                user_id=row.user_id,
                token_id=row.token_id,
                held=row.amount,
                limited=row.token_limited,
            )
            self._post(row, kind, postings, {"held": row.amount, **{k: v for k, v in details.items() if v is not None}})

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
        estimate = command.amount
        if estimate is None:
            estimate = _priced(
                prices.estimate,
                pre_consumed=self.pre_consumed_quota,
                prompt_tokens=command.prompt_tokens,
                max_tokens=command.max_tokens,
            )
        available = self._balance(accounts.user(command.user_id), SubLedger.QUOTA)
        decision = decide_hold(available=available, token=token, estimate=estimate, trust_factor=self.trust_factor)
        # Decided: from here on the plan changes.
        self._hold_premises(command, token, available, estimate, decision.trusted)
        row = self._create(
            command,
            token,
            prices,
            expires_in=command.expires_in or self.hold_ttl,
            kind=RequestKind.HOLD,
            status=RequestStatus.OPEN,
            max_tokens=command.max_tokens,
            amount=decision.amount,
            trusted=decision.trusted,
            request_fingerprint=digest,
        )
        self.plan.events.append(Event.HOLD_OPENED_TRUSTED if decision.trusted else Event.HOLD_OPENED)
        if decision.amount:
            postings = hold_postings(
                request_id=row.request_id,
                user_id=row.user_id,
                token_id=row.token_id,
                amount=decision.amount,
                limited=token.limited,
            )
            details = _usage_details(
                row,
                prompt_tokens=command.prompt_tokens,
                max_tokens=command.max_tokens,
                pre_consumed_quota=self.pre_consumed_quota,
                estimate=estimate,
                explicit_amount=command.amount is not None,
            )
            self._post(row, EntryKind.HOLD, postings, details)
        return Planned(row, created=True)

    def _settle(self, request_id: str, command: SettleCommand) -> Planned:
        digest = fingerprint("settle", body_of(command))
        row = self._existing_hold(request_id)
        mode = settle_mode(
            status=row.status, due=self._due(row), settled_with=row.settle_fingerprint, fingerprint=digest
        )
        if mode is SettleMode.REPLAY:
            return Planned(row, created=False, replayed=True)
        charge = charge_of(row.prices, command)
        if mode is SettleMode.EXPIRE_THEN_LATE:
            row = self._expire(row)
        late = mode is not SettleMode.SETTLE_HOLD
        held = 0 if late else row.amount
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
        self.plan.events.append(Event.HOLD_SETTLED_LATE if late else Event.HOLD_SETTLED)
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
            postings = _direct_charge(settled, charge)
        details = _usage_details(settled, held=held, late=late, **_charge_details(command, charge))
        self._post(settled, EntryKind.SETTLE, postings, details, charged=charge)
        return Planned(settled, created=False)

    def _refund(self, request_id: str, command: RefundCommand) -> Planned:
        digest = fingerprint("refund", body_of(command))
        row = self._existing_hold(request_id)
        mode = refund_mode(
            status=row.status, due=self._due(row), refunded_with=row.refund_fingerprint, fingerprint=digest
        )
        if mode is RefundMode.REPLAY:
            return Planned(row, created=False, replayed=True)
        if mode is RefundMode.UNCHANGED:
            return Planned(row, created=False)
        if mode is RefundMode.EXPIRE:
            return Planned(self._expire(row), created=False)
        self._release(row, EntryKind.REFUND, {"reason": command.reason})
        self.plan.events.append(Event.HOLD_REFUNDED)
        return Planned(self._move(row, status=RequestStatus.REFUNDED, refund_fingerprint=digest), created=False)

    def _expire_if_due(self, request_id: str) -> Planned:
        """The sweeper's expiry: a hold still open and due expires; any other request is answered as it is."""
        row = self._existing_hold(request_id)
        if not self._due(row):
            return Planned(row, created=False)
        return Planned(self._expire(row), created=False)

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
        row = self._create(
            command,
            token,
            prices,
            expires_in=None,
            kind=RequestKind.CONSUMPTION,
            status=RequestStatus.SETTLED,
            max_tokens=0,
            amount=0,
            trusted=False,
            request_fingerprint=digest,
            channel_id=command.channel_id,
            charged=charge,
            settled_prompt_tokens=command.prompt_tokens,
            completion_tokens=command.completion_tokens,
        )
        details = _usage_details(row, **_charge_details(command, charge))
        self._post(row, EntryKind.CONSUME, _direct_charge(row, charge), details, charged=charge)
        self.plan.events.append(Event.CONSUMED)
        return Planned(row, created=True)


def _usage_details(row: RequestRow, **usage: Any) -> dict[str, Any]:
    """What a hold, settlement or consumption entry records of its call: model and group, the `usage` the caller
    names, and the prices."""
    return {"model": row.model, "group": row.group, **usage, **row.prices.as_details()}


def _charge_details(command: SettleCommand | ConsumptionCommand, charge: int) -> dict[str, Any]:
    """What a charge records: the tokens it was reported with, what it charged, and whether the relay named it."""
    details: dict[str, Any] = {
        "prompt_tokens": command.prompt_tokens,
        "completion_tokens": command.completion_tokens,
        "charged": charge,
        "explicit_quota": command.quota is not None,
    }
    if command.cached_tokens is not None:  # recorded only when the relay knows it: absent means unknown
        details["cached_tokens"] = command.cached_tokens
    return details


def _direct_charge(row: RequestRow, charge: int) -> tuple[Posting, ...]:
    """The postings of a charge with nothing held: a consumption, or a late settlement (to `row`'s channel)."""
    assert row.channel_id is not None
    return direct_charge_postings(
        user_id=row.user_id,
        token_id=row.token_id,
        channel_id=row.channel_id,
        charge=charge,
        limited=row.token_limited,
    )


def _replay(existing: RequestRow, kind: RequestKind, digest: bytes) -> Planned:
    """A request_id seen before: the same call gets the request back; anything else is a conflict."""
    if existing.kind is not kind or existing.request_fingerprint != digest:
        raise errors.IdempotencyConflict(f"request_id {existing.request_id!r} was used for another request")
    return Planned(existing, created=False, replayed=True)
