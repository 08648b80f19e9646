"""The lifecycle's rules as tables: one row per rule and the result it gives, without a database.

The tables, each next to its test:

- SETTLE_MODES, REFUND_MODES: `settle_mode` / `refund_mode` for every status x due x same body.
- HOLD_DECISIONS: `decide_hold` at the trust rule's boundaries (E-1, E, F x E, F x E + 1).
- HOLDS, SETTLES, REFUNDS, CONSUMES, EXPIRES: one operation planned on the in-memory world below, and what the
  plan then holds: the result, the entries and events in order, and the premises (expect_requests, lock_users,
  expect_tokens).
- PREMISES: the balance bounds (`Plan.balance_bounds`) the hold decisions of a plan rest on.
- REFUSALS: a refused operation, planned after a successful one, leaves the plan as it was.

How to read a row: the test id is the row, givens on the left of `->`, expected results on the right. Every
expected value is a literal, never computed with the rule under test. A result is `<status> <how>`, where how is
`created`, `moved` (the request changed), `unchanged` or `replayed` (and a settled hold says `late` if it is), or
else the refusal's error code. Entry kinds and events are spelled by value, in order, separated by spaces.

The world: user 1 has 1000 available and owns token 7 (limited, 500 remaining) and token 8 (unlimited); token 9
belongs to user 2; token 99 is not registered. Every price ratio is 1 and the pre-consumed quota 0, so a hold's
estimate is prompt_tokens + max_tokens (100 + 200 = 300) and a charge prompt + completion tokens (100 + 50 = 150).
The trust factor is 100 unless a row says otherwise. The existing requests are listed in REQUESTS.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, NamedTuple

import pytest

from ledger_service.domain.accounts import SubLedger
from ledger_service.domain.entries import EntryKind
from ledger_service.domain.errors import LedgerError
from ledger_service.domain.lifecycle import (
    RefundMode,
    RequestKind,
    RequestRow,
    RequestStatus,
    SettleMode,
    TokenState,
    body_of,
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
from ledger_service.domain.planning import Bounds, Event, Plan, Planned, Planner, Snapshot
from ledger_service.domain.pricing import Prices

OPEN, SETTLED = RequestStatus.OPEN, RequestStatus.SETTLED
REFUNDED, EXPIRED = RequestStatus.REFUNDED, RequestStatus.EXPIRED
LIMITED, UNLIMITED = False, True
"""Values of `Plan.expect_tokens` (token_id -> unlimited)."""
Q, A = SubLedger.QUOTA, SubLedger.ALLOWANCE
NOW = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)

# Builders ----------------------------------------------------------------------------------------------------------


def hold(
    request_id: str,
    *,
    user_id: int = 1,
    token_id: int = 7,
    amount: int | None = None,
    prompt_tokens: int = 100,
    max_tokens: int = 200,
) -> Hold:
    return Hold(
        HoldCommand(
            request_id=request_id,
            user_id=user_id,
            token_id=token_id,
            model="m",
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens,
            amount=amount,
        )
    )


SETTLE_BODY = SettleCommand(channel_id=4, prompt_tokens=100, completion_tokens=50)
OTHER_SETTLE_BODY = SettleCommand(channel_id=4, prompt_tokens=100, completion_tokens=51)
HUGE_SETTLE_BODY = SettleCommand(channel_id=4, prompt_tokens=10**15, completion_tokens=1)
"""Charges 10^15 + 1, above the largest amount."""
REFUND_BODY = RefundCommand(reason="upstream 502")
OTHER_REFUND_BODY = RefundCommand(reason="timeout")


def settle(request_id: str, body: SettleCommand = SETTLE_BODY) -> Settle:
    return Settle(request_id, body)


def refund(request_id: str, body: RefundCommand = REFUND_BODY) -> Refund:
    return Refund(request_id, body)


def consume(request_id: str, *, token_id: int = 7, quota: int | None = None) -> Consume:
    command = ConsumptionCommand(
        request_id=request_id,
        user_id=1,
        token_id=token_id,
        channel_id=4,
        model="m",
        prompt_tokens=100,
        completion_tokens=50,
        quota=quota,
    )
    return Consume(command)


def digest(operation: str, command: Any) -> bytes:
    return fingerprint(operation, body_of(command))


def row(
    request_id: str,
    status: RequestStatus = OPEN,
    *,
    expires_in: int = 60,
    amount: int = 300,
    kind: RequestKind = RequestKind.HOLD,
) -> RequestRow:
    """A request of user 1 on token 7, made by `hold(request_id)` (or `consume(request_id)` for a consumption);
    settled with SETTLE_BODY, refunded with REFUND_BODY; a hold expires `expires_in` seconds after NOW."""
    is_hold = kind is RequestKind.HOLD
    settled = status is SETTLED
    made = digest("hold", hold(request_id).command) if is_hold else digest("consumption", consume(request_id).command)
    return RequestRow(
        request_id=request_id,
        kind=kind,
        status=status,
        user_id=1,
        token_id=7,
        token_limited=True,
        group="default",
        model="m",
        prompt_tokens=100,
        max_tokens=200 if is_hold else 0,
        amount=amount if is_hold else 0,
        trusted=is_hold and amount == 0,
        model_ratio=Decimal(1),
        completion_ratio=Decimal(1),
        group_ratio=Decimal(1),
        model_price=None,
        channel_id=4 if settled else None,
        settled_prompt_tokens=100 if settled else None,
        completion_tokens=50 if settled else None,
        charged=150 if settled else None,
        request_fingerprint=made,
        settle_fingerprint=digest("settle", SETTLE_BODY) if settled and is_hold else None,
        refund_fingerprint=digest("refund", REFUND_BODY) if status is REFUNDED else None,
        created_at=NOW - timedelta(seconds=120),
        expires_at=NOW + timedelta(seconds=expires_in) if is_hold else None,
    )


REQUESTS = {
    r.request_id: r
    for r in (
        row("open"),  # holds 300, expires in 60 s
        row("due", expires_in=-1),  # open, expired a second ago (the sweeper has not run)
        row("due-now", expires_in=0),  # open, expires_at == now
        row("trusted", amount=0),
        row("trusted-due", amount=0, expires_in=-1),
        row("expired", EXPIRED, expires_in=-60),
        row("settled", SETTLED),
        row("refunded", REFUNDED),
        row("consumed", SETTLED, kind=RequestKind.CONSUMPTION),
    )
}


def prices(model: str, group: str) -> Prices:
    return Prices(model_ratio=Decimal(1), completion_ratio=Decimal(1), group_ratio=Decimal(1))


def snapshot(*, available: int = 1000, remaining: int = 500, requests: Mapping[str, RequestRow] = REQUESTS) -> Snapshot:
    return Snapshot(
        now=NOW,
        requests=requests,
        tokens={7: (1, LIMITED), 8: (1, UNLIMITED), 9: (2, LIMITED)},
        balances={("user:1", Q): available, ("token:7", A): remaining, ("user:2", Q): 1000, ("token:9", A): 1000},
        prices=prices,
        seen_at="x",
    )


def planner(*, factor: int = 100, available: int = 1000, remaining: int = 500) -> Planner:
    world = snapshot(available=available, remaining=remaining)
    return Planner(world, pre_consumed_quota=0, trust_factor=factor, hold_ttl=600)


# 1. settle_mode and refund_mode ------------------------------------------------------------------------------------

DUE, NOT_DUE = True, False
SAME, OTHER = True, False


class ModeRow(NamedTuple):
    status: RequestStatus
    due: bool
    same_body: bool
    expected: SettleMode | RefundMode | str
    """The mode, or the refusal's error code."""

    def __str__(self) -> str:
        result = self.expected if isinstance(self.expected, str) else self.expected.name
        due = "due" if self.due else "not due"
        body = "same body" if self.same_body else "other body"
        return f"{self.status}|{due}|{body} -> {result}"


def mode_of(decide: Any, case: ModeRow, with_keyword: str) -> SettleMode | RefundMode | str:
    recorded = b"this body" if case.same_body else b"another body"
    try:
        mode: SettleMode | RefundMode = decide(
            status=case.status, due=case.due, fingerprint=b"this body", **{with_keyword: recorded}
        )
    except LedgerError as refusal:
        return refusal.code
    return mode


# fmt: off
SETTLE_MODES = [
    ModeRow(OPEN,     NOT_DUE, SAME,  SettleMode.SETTLE_HOLD),
    ModeRow(OPEN,     NOT_DUE, OTHER, SettleMode.SETTLE_HOLD),
    ModeRow(OPEN,     DUE,     SAME,  SettleMode.EXPIRE_THEN_LATE),
    ModeRow(OPEN,     DUE,     OTHER, SettleMode.EXPIRE_THEN_LATE),
    ModeRow(SETTLED,  NOT_DUE, SAME,  SettleMode.REPLAY),
    ModeRow(SETTLED,  NOT_DUE, OTHER, "hold_already_settled"),
    ModeRow(SETTLED,  DUE,     SAME,  SettleMode.REPLAY),
    ModeRow(SETTLED,  DUE,     OTHER, "hold_already_settled"),
    ModeRow(REFUNDED, NOT_DUE, SAME,  "hold_already_refunded"),
    ModeRow(REFUNDED, NOT_DUE, OTHER, "hold_already_refunded"),
    ModeRow(REFUNDED, DUE,     SAME,  "hold_already_refunded"),
    ModeRow(REFUNDED, DUE,     OTHER, "hold_already_refunded"),
    ModeRow(EXPIRED,  NOT_DUE, SAME,  SettleMode.LATE),
    ModeRow(EXPIRED,  NOT_DUE, OTHER, SettleMode.LATE),
    ModeRow(EXPIRED,  DUE,     SAME,  SettleMode.LATE),
    ModeRow(EXPIRED,  DUE,     OTHER, SettleMode.LATE),
]
# fmt: on


@pytest.mark.parametrize("case", SETTLE_MODES, ids=str)
def test_settle_mode(case: ModeRow) -> None:
    assert mode_of(settle_mode, case, "settled_with") == case.expected


# fmt: off
REFUND_MODES = [
    ModeRow(OPEN,     NOT_DUE, SAME,  RefundMode.REFUND),
    ModeRow(OPEN,     NOT_DUE, OTHER, RefundMode.REFUND),
    ModeRow(OPEN,     DUE,     SAME,  RefundMode.EXPIRE),
    ModeRow(OPEN,     DUE,     OTHER, RefundMode.EXPIRE),
    ModeRow(SETTLED,  NOT_DUE, SAME,  "hold_already_settled"),
    ModeRow(SETTLED,  NOT_DUE, OTHER, "hold_already_settled"),
    ModeRow(SETTLED,  DUE,     SAME,  "hold_already_settled"),
    ModeRow(SETTLED,  DUE,     OTHER, "hold_already_settled"),
    ModeRow(REFUNDED, NOT_DUE, SAME,  RefundMode.REPLAY),
    ModeRow(REFUNDED, NOT_DUE, OTHER, "idempotency_conflict"),
    ModeRow(REFUNDED, DUE,     SAME,  RefundMode.REPLAY),
    ModeRow(REFUNDED, DUE,     OTHER, "idempotency_conflict"),
    ModeRow(EXPIRED,  NOT_DUE, SAME,  RefundMode.UNCHANGED),
    ModeRow(EXPIRED,  NOT_DUE, OTHER, RefundMode.UNCHANGED),
    ModeRow(EXPIRED,  DUE,     SAME,  RefundMode.UNCHANGED),
    ModeRow(EXPIRED,  DUE,     OTHER, RefundMode.UNCHANGED),
]
# fmt: on


@pytest.mark.parametrize("case", REFUND_MODES, ids=str)
def test_refund_mode(case: ModeRow) -> None:
    assert mode_of(refund_mode, case, "refunded_with") == case.expected


# 2. decide_hold: the trust rule's boundaries -----------------------------------------------------------------------


class HoldDecisionRow(NamedTuple):
    note: str
    factor: int
    estimate: int
    available: int
    remaining: int | None
    """The token's remaining allowance; None for an unlimited token."""
    expected: tuple[int, bool] | str
    """(amount held, trusted), or the refusal's error code."""

    def __str__(self) -> str:
        token = "unlimited" if self.remaining is None else f"remaining={self.remaining}"
        result = self.expected if isinstance(self.expected, str) else "held {}, trusted={}".format(*self.expected)
        return f"{self.note}|F={self.factor} E={self.estimate} available={self.available} {token} -> {result}"


# F = 100, E = 10: the threshold F x E is 1000.
# fmt: off
HOLD_DECISIONS = [
    #               note                        F    E  available remaining  (held, trusted) or refusal
    HoldDecisionRow("user at E-1",              100, 10,    9,   None, "insufficient_user_quota"),
    HoldDecisionRow("user at E",                100, 10,   10,   None, (10, False)),
    HoldDecisionRow("user at FxE",              100, 10, 1000,   None, (10, False)),
    HoldDecisionRow("user at FxE+1",            100, 10, 1001,   None, (0, True)),
    HoldDecisionRow("token at E-1",             100, 10, 1001,      9, "insufficient_token_quota"),
    HoldDecisionRow("token at E",               100, 10, 1001,     10, (10, False)),
    HoldDecisionRow("token at FxE",             100, 10, 1001,   1000, (10, False)),
    HoldDecisionRow("token at FxE+1",           100, 10, 1001,   1001, (0, True)),
    HoldDecisionRow("user at FxE, token above", 100, 10, 1000,   1001, (10, False)),
    HoldDecisionRow("both short: user first",   100, 10,    9,      9, "insufficient_user_quota"),
    HoldDecisionRow("factor 0, unlimited",        0, 10, 10**9,  None, (10, False)),
    HoldDecisionRow("factor 0, limited",          0, 10, 10**9, 10**9, (10, False)),
    HoldDecisionRow("factor 0, user at E-1",      0, 10,    9,   None, "insufficient_user_quota"),
    HoldDecisionRow("estimate 0, user at 0",    100,  0,    0,   None, (0, False)),
    HoldDecisionRow("estimate 0, user at 1",    100,  0,    1,   None, (0, True)),
    HoldDecisionRow("estimate 0, user at -1",   100,  0,   -1,   None, "insufficient_user_quota"),
]
# fmt: on


@pytest.mark.parametrize("case", HOLD_DECISIONS, ids=str)
def test_decide_hold(case: HoldDecisionRow) -> None:
    remaining = 0 if case.remaining is None else case.remaining
    token = TokenState(token_id=7, user_id=1, unlimited=case.remaining is None, remaining=remaining)
    result: tuple[int, bool] | str
    try:
        decision = decide_hold(available=case.available, token=token, estimate=case.estimate, trust_factor=case.factor)
        result = (decision.amount, decision.trusted)
    except LedgerError as refusal:
        result = refusal.code
    assert result == case.expected


# 3. The planner, one operation at a time ---------------------------------------------------------------------------


class Case(NamedTuple):
    """One operation planned on the world (after `first`, if any), and what the plan holds afterwards."""

    name: str
    op: Operation
    result: str
    entries: str
    events: str
    expect_requests: dict[str, RequestStatus]
    lock_users: set[int]
    expect_tokens: dict[int, bool]
    first: Operation | None = None
    """An operation planned before `op`, in the same plan."""

    def __str__(self) -> str:
        first = "" if self.first is None else f" (after {type(self.first).__name__.lower()})"
        return f"{type(self.op).__name__.lower()}|{self.name}{first} -> {self.result}"


def result_of(planned: Planned, before: RequestRow | None) -> str:
    """`<status> [late] <how>`: how the request came to be as the operation answers it."""
    if planned.created:
        how = "created"
    elif planned.replayed:
        how = "replayed"
    elif planned.row != before:
        how = "moved"
    else:
        how = "unchanged"
    late = " late" if planned.row.late else ""
    return f"{planned.row.status}{late} {how}"


def check_case(case: Case) -> None:
    plans = planner()
    if case.first is not None:
        plans.plan_one(case.first)
    request_id = case.op.request_id
    before = plans.plan.requests.get(request_id) or plans.snapshot.requests.get(request_id)
    try:
        result = result_of(plans.plan_one(case.op), before)
    except LedgerError as refusal:
        result = refusal.code
    plan = plans.plan
    assert (
        result,
        tuple(draft.kind for draft, _ in plan.entries),
        tuple(plan.events),
        plan.expect_requests,
        plan.lock_users,
        plan.expect_tokens,
    ) == (
        case.result,
        tuple(EntryKind(kind) for kind in case.entries.split()),
        tuple(Event(event) for event in case.events.split()),
        case.expect_requests,
        case.lock_users,
        case.expect_tokens,
    )


# Columns: name, operation, result, entries, events, expect_requests, lock_users, expect_tokens[, first].
# The trust threshold of a hold of 300 is 30000: user 1 (1000 available) is never trusted for it.
# fmt: off
HOLDS = [
    Case("new, untrusted",            hold("new"),             "open created", "hold", "hold_opened",
         {}, {1}, {7: LIMITED}),
    Case("new, unlimited token",      hold("new", token_id=8), "open created", "hold", "hold_opened",
         {}, {1}, {8: UNLIMITED}),
    Case("new, trusted (amount 1)",   hold("new", amount=1),   "open created", "",     "hold_opened_trusted",
         {}, {1}, {7: LIMITED}),
    Case("same id, same body",        hold("open"),            "open replayed",    "", "", {}, set(), {}),
    Case("same id of a settled hold", hold("settled"),         "settled replayed", "", "", {}, set(), {}),
    Case("same id, other body",       hold("open", amount=5),  "idempotency_conflict",     "", "", {}, set(), {}),
    Case("id of a consumption",       hold("consumed"),        "idempotency_conflict",     "", "", {}, set(), {}),
    Case("unknown token",             hold("new", token_id=99), "token_not_found",         "", "", {}, set(), {}),
    Case("token of another user",     hold("new", token_id=9), "token_user_mismatch",      "", "", {}, set(), {}),
    Case("estimate above available",  hold("new", token_id=8, amount=1001), "insufficient_user_quota",
         "", "", {}, set(), {}),
    Case("estimate above remaining",  hold("new", amount=501), "insufficient_token_quota", "", "", {}, set(), {}),
    Case("estimate beyond 10^15",     hold("new", prompt_tokens=10**15), "validation_error",
         "", "", {}, set(), {}),
]
# fmt: on


@pytest.mark.parametrize("case", HOLDS, ids=str)
def test_hold(case: Case) -> None:
    check_case(case)


# fmt: off
SETTLES = [
    Case("open, not due",        settle("open"),        "settled moved", "settle", "hold_settled", {"open": OPEN},
         set(), {}),
    Case("open, due",            settle("due"),         "settled late moved", "expire settle",
         "hold_expired hold_settled_late", {"due": OPEN}, set(), {}),
    Case("open, due at now",     settle("due-now"),     "settled late moved", "expire settle",
         "hold_expired hold_settled_late", {"due-now": OPEN}, set(), {}),
    Case("open, trusted",        settle("trusted"),     "settled moved", "settle", "hold_settled", {"trusted": OPEN},
         set(), {}),
    Case("open, trusted, due",   settle("trusted-due"), "settled late moved", "settle",
         "hold_expired hold_settled_late", {"trusted-due": OPEN}, set(), {}),
    Case("expired",              settle("expired"),     "settled late moved", "settle", "hold_settled_late",
         {"expired": EXPIRED}, set(), {}),
    Case("settled, same body",   settle("settled"),     "settled replayed", "", "", {}, set(), {}),
    Case("settled, other body",  settle("settled", OTHER_SETTLE_BODY), "hold_already_settled", "", "", {}, set(), {}),
    Case("refunded",             settle("refunded"),    "hold_already_refunded", "", "", {}, set(), {}),
    Case("a consumption",        settle("consumed"),    "hold_already_settled",  "", "", {}, set(), {}),
    Case("unknown",              settle("nope"),        "hold_not_found",        "", "", {}, set(), {}),
    Case("held in this plan",    settle("new"),         "settled moved", "hold settle", "hold_opened hold_settled",
         {}, {1}, {7: LIMITED}, first=hold("new")),
]
# fmt: on


@pytest.mark.parametrize("case", SETTLES, ids=str)
def test_settle(case: Case) -> None:
    check_case(case)


# fmt: off
REFUNDS = [
    Case("open, not due",        refund("open"),        "refunded moved", "refund", "hold_refunded", {"open": OPEN},
         set(), {}),
    Case("open, due",            refund("due"),         "expired moved",  "expire", "hold_expired",  {"due": OPEN},
         set(), {}),
    Case("open, trusted",        refund("trusted"),     "refunded moved", "",       "hold_refunded",
         {"trusted": OPEN}, set(), {}),
    Case("expired",              refund("expired"),     "expired unchanged",  "", "", {}, set(), {}),
    Case("settled",              refund("settled"),     "hold_already_settled", "", "", {}, set(), {}),
    Case("refunded, same body",  refund("refunded"),    "refunded replayed",  "", "", {}, set(), {}),
    Case("refunded, other body", refund("refunded", OTHER_REFUND_BODY), "idempotency_conflict", "", "", {}, set(), {}),
    Case("a consumption",        refund("consumed"),    "hold_already_settled", "", "", {}, set(), {}),
    Case("unknown",              refund("nope"),        "hold_not_found",       "", "", {}, set(), {}),
    Case("held in this plan",    refund("new"),         "refunded moved", "hold refund", "hold_opened hold_refunded",
         {}, {1}, {7: LIMITED}, first=hold("new")),
]
# fmt: on


@pytest.mark.parametrize("case", REFUNDS, ids=str)
def test_refund(case: Case) -> None:
    check_case(case)


# fmt: off
CONSUMES = [
    Case("new, limited token",        consume("new"),             "settled created", "consume", "consumed",
         {}, {1}, {7: LIMITED}),
    Case("new, unlimited token",      consume("new", token_id=8), "settled created", "consume", "consumed",
         {}, {1}, {8: UNLIMITED}),
    Case("new, charge above available", consume("new", quota=10**6), "settled created", "consume", "consumed",
         {}, {1}, {7: LIMITED}),
    Case("same id, same body",        consume("consumed"),          "settled replayed",     "", "", {}, set(), {}),
    Case("same id, other body",       consume("consumed", quota=1), "idempotency_conflict", "", "", {}, set(), {}),
    Case("id of a hold",              consume("open"),              "idempotency_conflict", "", "", {}, set(), {}),
    Case("unknown token",             consume("new", token_id=99),  "token_not_found",      "", "", {}, set(), {}),
    Case("token of another user",     consume("new", token_id=9),   "token_user_mismatch",  "", "", {}, set(), {}),
]
# fmt: on


@pytest.mark.parametrize("case", CONSUMES, ids=str)
def test_consume(case: Case) -> None:
    check_case(case)


# fmt: off
EXPIRES = [
    Case("open, due",          Expire("due"),         "expired moved", "expire", "hold_expired", {"due": OPEN},
         set(), {}),
    Case("open, due at now",   Expire("due-now"),     "expired moved", "expire", "hold_expired", {"due-now": OPEN},
         set(), {}),
    Case("open, trusted, due", Expire("trusted-due"), "expired moved", "",       "hold_expired",
         {"trusted-due": OPEN}, set(), {}),
    Case("open, not due",      Expire("open"),        "open unchanged",     "", "", {}, set(), {}),
    Case("expired",            Expire("expired"),     "expired unchanged",  "", "", {}, set(), {}),
    Case("settled",            Expire("settled"),     "settled unchanged",  "", "", {}, set(), {}),
    Case("refunded",           Expire("refunded"),    "refunded unchanged", "", "", {}, set(), {}),
    Case("a consumption",      Expire("consumed"),    "hold_already_settled", "", "", {}, set(), {}),
    Case("unknown",            Expire("nope"),        "hold_not_found",       "", "", {}, set(), {}),
    Case("held in this plan",  Expire("new"),         "open unchanged", "hold", "hold_opened", {}, {1}, {7: LIMITED},
         first=hold("new")),
]
# fmt: on


@pytest.mark.parametrize("case", EXPIRES, ids=str)
def test_expire(case: Case) -> None:
    check_case(case)


# 4. The premises of hold decisions ---------------------------------------------------------------------------------


class PremiseRow(NamedTuple):
    factor: int
    available: int
    remaining: int | None
    """Token 7's remaining allowance; None: the holds use the unlimited token 8 instead."""
    estimates: tuple[int, ...]
    """The holds planned in order (explicit amounts), all of user 1."""
    user: Bounds | None
    """The bounds on user:1's quota, or None for no premise on it."""
    allowance: Bounds | None
    """The bounds on token:7's allowance."""

    def __str__(self) -> str:
        token = "unlimited" if self.remaining is None else f"remaining={self.remaining}"
        holds = "+".join(map(str, self.estimates))
        bounds = f"user {show(self.user)}, allowance {show(self.allowance)}"
        return f"F={self.factor} available={self.available} {token} holds {holds} -> {bounds}"


def show(bounds: Bounds | None) -> str:
    if bounds is None:
        return "free"
    return f"[{'-inf' if bounds.low is None else bounds.low}, {'inf' if bounds.high is None else bounds.high}]"


def plan_holds(factor: int, available: int, remaining: int | None, estimates: tuple[int, ...]) -> Plan:
    token_id = 8 if remaining is None else 7
    holds = [hold(f"h{i}", token_id=token_id, amount=estimate) for i, estimate in enumerate(estimates)]
    return planner(factor=factor, available=available, remaining=remaining or 0).plan_all(holds, atomic=False)


# fmt: off
PREMISES = [
    #          F  available remaining holds  user:1 quota     token:7 allowance
    # one hold of E = 10, F = 100 (threshold 1000)
    PremiseRow(100,    10,   None, (10,),  Bounds(10, 1000),   None),              # untrusted: user at or below FxE
    PremiseRow(100,  1000,   None, (10,),  Bounds(10, 1000),   None),
    PremiseRow(100,  1000,   5000, (10,),  Bounds(10, 1000),   Bounds(10, None)),
    PremiseRow(100,  1000,   1000, (10,),  Bounds(10, 1000),   Bounds(10, None)),  # both fail: the user's is kept
    PremiseRow(100,  1001,   None, (10,),  Bounds(1001, None), None),              # trusted
    PremiseRow(100,  1001,   1001, (10,),  Bounds(1001, None), Bounds(1001, None)),
    PremiseRow(100,  1001,   1000, (10,),  Bounds(10, None),   Bounds(10, 1000)),  # untrusted: token at or below FxE
    PremiseRow(100,  5000,     10, (10,),  Bounds(10, None),   Bounds(10, 1000)),
    PremiseRow(  0, 10**6,   None, (10,),  Bounds(10, None),   None),              # factor 0: only "enough"
    PremiseRow(  0, 10**6,  10**6, (10,),  Bounds(10, None),   Bounds(10, None)),
    PremiseRow(100,     9,   None, (10,),  None,               None),              # refused: no premise
    # a second hold: its premises are shifted by the first hold's postings
    PremiseRow(100,  1000,   None, (10, 10), Bounds(20, 1000),   None),
    PremiseRow(100,  1000,   1000, (10, 10), Bounds(20, 1000),   Bounds(20, None)),
    PremiseRow(100,  2000,   None, (10, 10), Bounds(1001, None), None),            # trusted twice: nothing held
    PremiseRow( 10,   100,   None, (10, 5),  Bounds(61, 100),    None),            # untrusted, then trusted at 90
    PremiseRow( 10,  1000,    100, (10, 5),  Bounds(61, None),   Bounds(61, 100)),
    PremiseRow(100,    15,   None, (10, 10), Bounds(10, 1000),   None),            # the second refused: no premise
]
# fmt: on


@pytest.mark.parametrize("case", PREMISES, ids=str)
def test_hold_premises(case: PremiseRow) -> None:
    plan = plan_holds(case.factor, case.available, case.remaining, case.estimates)
    expected = {("user:1", Q): case.user, ("token:7", A): case.allowance}
    assert plan.balance_bounds == {key: bounds for key, bounds in expected.items() if bounds is not None}


def decisions(plan: Plan) -> list[str | None]:
    """What each hold decided: held and trusted, or None for a refusal."""
    return [
        None if isinstance(result, LedgerError) else f"held {result.row.amount}, trusted={result.row.trusted}"
        for result in plan.results
    ]


@pytest.mark.parametrize("case", PREMISES, ids=str)
def test_the_holds_decide_the_same_at_each_end_of_their_bounds(case: PremiseRow) -> None:
    """A check of the table itself, by planning again: a balance at either end of its bounds gives every hold that
    was decided the same decision. (Refusals have no premise: the last row's second hold is accepted at 1000.)"""
    read = decisions(plan_holds(case.factor, case.available, case.remaining, case.estimates))
    for bounds, at in ((case.user, "user"), (case.allowance, "allowance")):
        for end in () if bounds is None else (bounds.low, bounds.high):
            if end is None:
                continue
            available, remaining = (end, case.remaining) if at == "user" else (case.available, end)
            again = decisions(plan_holds(case.factor, available, remaining, case.estimates))
            assert [a if r else None for r, a in zip(read, again, strict=True)] == read, (at, end)


# 5. Refusals leave no trace ----------------------------------------------------------------------------------------


class RefusalRow(NamedTuple):
    name: str
    op: Operation
    code: str

    def __str__(self) -> str:
        return f"{self.name} -> {self.code}"


def trace(plan: Plan) -> tuple[Any, ...]:
    """Everything a plan holds but its results, copied."""
    return (
        list(plan.entries),
        dict(plan.requests),
        list(plan.events),
        dict(plan.balance_bounds),
        set(plan.lock_users),
        dict(plan.expect_tokens),
        dict(plan.expect_requests),
        dict(plan.expires_in),
    )


FIRST = hold("first")
"""Untrusted: holds 300, leaving user 1 with 700 available and token 7 with 200 remaining."""
PROBE = hold("probe", amount=100)
"""Planned after the refusal: it sees the balances as the first hold left them."""

# fmt: off
REFUSALS = [
    RefusalRow("hold, unknown token",                     hold("r", token_id=99),          "token_not_found"),
    RefusalRow("hold, token of another user",             hold("r", token_id=9),           "token_user_mismatch"),
    RefusalRow("hold of 701 with 700 left after the first", hold("r", token_id=8, amount=701),
               "insufficient_user_quota"),
    RefusalRow("hold of 201 with 200 left after the first", hold("r", amount=201),         "insufficient_token_quota"),
    RefusalRow("hold of user 2, beyond their 1000",       hold("r", user_id=2, token_id=9, amount=1001),
               "insufficient_user_quota"),
    RefusalRow("hold, estimate beyond 10^15",             hold("r", prompt_tokens=10**15), "validation_error"),
    RefusalRow("hold, the first's id with another body",  hold("first", amount=5),         "idempotency_conflict"),
    RefusalRow("consume, the first's id",                 consume("first"),                "idempotency_conflict"),
    RefusalRow("consume, unknown token",                  consume("r", token_id=99),       "token_not_found"),
    RefusalRow("settle, unknown",                         settle("nope"),                  "hold_not_found"),
    RefusalRow("settle, a consumption",                   settle("consumed"),              "hold_already_settled"),
    RefusalRow("settle, settled with another body",       settle("settled", OTHER_SETTLE_BODY), "hold_already_settled"),
    RefusalRow("settle, refunded",                        settle("refunded"),              "hold_already_refunded"),
    RefusalRow("settle a due hold, charge beyond 10^15",  settle("due", HUGE_SETTLE_BODY), "validation_error"),
    RefusalRow("refund, settled",                         refund("settled"),               "hold_already_settled"),
    RefusalRow("refund, refunded with another body",      refund("refunded", OTHER_REFUND_BODY),
               "idempotency_conflict"),
    RefusalRow("expire, unknown",                         Expire("nope"),                  "hold_not_found"),
]
# fmt: on


@pytest.mark.parametrize("case", REFUSALS, ids=str)
def test_a_refusal_leaves_no_trace(case: RefusalRow) -> None:
    plans = planner()
    plans.plan_one(FIRST)
    before = trace(plans.plan)
    with pytest.raises(LedgerError) as refusal:
        plans.plan_one(case.op)
    assert refusal.value.code == case.code
    assert trace(plans.plan) == before
    # Nor in the running balances: what comes next is planned as if the refused operation had never been.
    plans.plan_one(PROBE)
    without = planner()
    without.plan_one(FIRST)
    without.plan_one(PROBE)
    assert trace(plans.plan) == trace(without.plan)
