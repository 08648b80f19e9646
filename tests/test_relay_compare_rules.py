"""domain/relay_compare.py: the pairing and drift rules, one table row per rule, no database."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from ledger_service.domain.relay_compare import (
    LedgerCharge,
    LedgerToken,
    LogComparison,
    LogMatcher,
    Outcome,
    Tally,
    Tolerances,
    compare_token,
    compare_user,
)
from ledger_service.domain.relays import LOG_CONSUME, LOG_REFUND, RelayKind, RelayLog, RelayToken, RelayUser

ONE, NEW = RelayKind.ONE_API, RelayKind.NEW_API
M, D, R, L = Outcome.MATCHED, Outcome.AMOUNT_DIFFERS, Outcome.ONLY_IN_RELAY, Outcome.ONLY_IN_LEDGER
SINCE, UNTIL = 1000, 2000


def log(
    id_: int,
    at: int,
    quota: int = 100,
    *,
    rid: str | None = None,
    token: int | None = 7,
    model: str = "gpt-4",
    type_: int = LOG_CONSUME,
    prompt: int = 10,
) -> RelayLog:
    return RelayLog(id_, type_, at, 1, token, f"token-{token}", 3, model, quota, prompt, 5, rid)


def charge(
    id_: int, at: float, charged: int = 100, *, rid: str = "", token: int = 7, model: str = "gpt-4", prompt: int = 10
) -> LedgerCharge:
    return LedgerCharge(id_, rid or f"req-{id_}", at, 1, token, 3, model, prompt, 5, charged)


@dataclass(frozen=True)
class Case:
    rule: str
    kind: RelayKind
    logs: list[RelayLog]
    charges: list[LedgerCharge]
    expected: list[tuple[Outcome, int | None, int | None]]
    """(outcome, relay log id, ledger entry id), in any order."""
    tolerances: Tolerances = field(default_factory=Tolerances)


CASES = [
    Case("one-api pairs by request id", ONE, [log(1, 1500, rid="a")], [charge(10, 1500.4, rid="a")], [(M, 1, 10)]),
    Case(
        "amounts differing is amount_differs",
        ONE,
        [log(1, 1500, 100, rid="a")],
        [charge(10, 1501, 101, rid="a")],
        [(D, 1, 10)],
    ),
    Case(
        "within the amount tolerance is matched",
        ONE,
        [log(1, 1500, 100, rid="a")],
        [charge(10, 1501, 103, rid="a")],
        [(M, 1, 10)],
        Tolerances(amount=3),
    ),
    Case("a log without a charge is only_in_relay", ONE, [log(1, 1500, rid="a")], [], [(R, 1, None)]),
    Case("a charge without a log is only_in_ledger", ONE, [], [charge(10, 1500, rid="a")], [(L, None, 10)]),
    Case(
        "one-api: another request id does not pair, however alike",
        ONE,
        [log(1, 1500, rid="a")],
        [charge(10, 1500, rid="b")],
        [(R, 1, None), (L, None, 10)],
    ),
    Case(
        "one-api: a log without request id falls back on the composite key",
        ONE,
        [log(1, 1500, rid=None, token=None)],
        [charge(10, 1502)],
        [(M, 1, 10)],
    ),
    Case(
        "the same request id too far apart in time does not pair",
        ONE,
        [log(1, 1500, rid="a")],
        [charge(10, 1561, rid="a")],
        [(R, 1, None), (L, None, 10)],
    ),
    Case(
        "exactly the time tolerance apart still pairs",
        ONE,
        [log(1, 1500, rid="a")],
        [charge(10, 1560, rid="a")],
        [(M, 1, 10)],
    ),
    Case(
        "new-api pairs by the composite key, whatever the request ids",
        NEW,
        [log(1, 1500, rid="relay-own-id")],
        [charge(10, 1499.5, rid="ledger-id")],
        [(M, 1, 10)],
    ),
    Case(
        "new-api: the quota is compared, not keyed",
        NEW,
        [log(1, 1500, 100)],
        [charge(10, 1500, 250)],
        [(D, 1, 10)],
    ),
    Case(
        "new-api: another token does not pair",
        NEW,
        [log(1, 1500, token=7)],
        [charge(10, 1500, token=8)],
        [(R, 1, None), (L, None, 10)],
    ),
    Case(
        "new-api: another model does not pair",
        NEW,
        [log(1, 1500, model="gpt-4")],
        [charge(10, 1500, model="gpt-4o")],
        [(R, 1, None), (L, None, 10)],
    ),
    Case(
        "new-api: other token counts do not pair",
        NEW,
        [log(1, 1500, prompt=10)],
        [charge(10, 1500, prompt=11)],
        [(R, 1, None), (L, None, 10)],
    ),
    Case(
        "new-api: of several candidates the nearest in time wins",
        NEW,
        [log(1, 1500)],
        [charge(10, 1490), charge(11, 1503), charge(12, 1530)],
        [(M, 1, 11), (L, None, 10), (L, None, 12)],
    ),
    Case(
        "new-api: equally near, the lower entry id wins",
        NEW,
        [log(1, 1500)],
        [charge(11, 1498), charge(10, 1502)],
        [(M, 1, 10), (L, None, 11)],
    ),
    Case(
        "new-api: repeated identical calls pair one to one, each with its nearest",
        NEW,
        [log(1, 1500), log(2, 1520), log(3, 1540)],
        [charge(10, 1501), charge(11, 1521), charge(12, 1541)],
        [(M, 1, 10), (M, 2, 11), (M, 3, 12)],
    ),
    Case(
        "refund logs are not compared",
        NEW,
        [log(1, 1500, type_=LOG_REFUND)],
        [],
        [],
    ),
    Case(
        "a log inside the window pairs with a charge just before it: matched, not missing",
        ONE,
        [log(1, SINCE, rid="a")],
        [charge(10, SINCE - 0.5, rid="a")],
        [(M, 1, 10)],
    ),
    Case(
        "a log just before the window pairs with a charge inside it: matched, not missing",
        NEW,
        [log(1, SINCE - 1)],
        [charge(10, SINCE + 0.5)],
        [(M, 1, 10)],
    ),
    Case(
        "a log at the window's end pairs with a charge after it",
        ONE,
        [log(1, UNTIL - 1, rid="a")],
        [charge(10, UNTIL + 5, rid="a")],
        [(M, 1, 10)],
    ),
    Case(
        "unpaired items outside the window are not reported",
        ONE,
        [log(1, SINCE - 30, rid="a"), log(2, UNTIL, rid="b")],
        [charge(10, SINCE - 0.001, rid="c"), charge(11, UNTIL + 1, rid="d")],
        [],
    ),
    Case(
        "a pair entirely outside the window is not reported",
        ONE,
        [log(1, SINCE - 10, rid="a")],
        [charge(10, SINCE - 9, rid="a")],
        [],
    ),
]


def run(case: Case) -> list[LogComparison]:
    matcher = LogMatcher(case.kind, SINCE, UNTIL, case.tolerances)
    events: list[tuple[float, int, RelayLog | LedgerCharge]] = [(g.created_at, 0, g) for g in case.logs]
    events += [(c.at, 1, c) for c in case.charges]
    decided: list[LogComparison] = []
    for _, _, item in sorted(events, key=lambda e: (e[0], e[1])):
        decided += matcher.relay(item) if isinstance(item, RelayLog) else matcher.ledger(item)
    decided += matcher.finish()
    assert matcher.pending == 0
    return decided


@pytest.mark.parametrize("case", [pytest.param(c, id=c.rule) for c in CASES])
def test_pairing_rule(case: Case) -> None:
    got = [(c.outcome, c.relay.id if c.relay else None, c.ledger.entry_id if c.ledger else None) for c in run(case)]
    assert sorted(got, key=str) == sorted(case.expected, key=str)


def test_items_must_come_in_time_order() -> None:
    matcher = LogMatcher(ONE, SINCE, UNTIL, Tolerances())
    matcher.ledger(charge(10, 1500))
    with pytest.raises(ValueError, match="out of time order"):
        matcher.relay(log(1, 1499))


def test_the_window_held_is_bounded_by_the_tolerance() -> None:
    """A day of one call a second, every one matched: the matcher never holds more than ~2 tolerances of items."""
    matcher = LogMatcher(NEW, 0, 86_400, Tolerances(time_seconds=10))
    peak = 0
    decided = 0
    for second in range(86_400):
        decided += len(matcher.ledger(charge(second + 1, second + 0.2, prompt=second)))
        decided += len(matcher.relay(log(second + 1, second + 1, prompt=second)))
        peak = max(peak, matcher.pending)
    decided += len(matcher.finish())
    assert decided == 86_400
    assert peak <= 2 * 12


USER = RelayUser(1, 1000)
TOKEN = RelayToken(1, 1, 500, False, 1)
UNLIMITED = RelayToken(1, 1, 0, True, 1)


@pytest.mark.parametrize(
    ("rule", "user", "available", "tolerance", "drifted"),
    [
        ("equal balances do not drift", USER, 1000, 0, False),
        ("a debt equal on both sides does not drift", RelayUser(1, -50), -50, 0, False),
        ("any difference drifts at tolerance 0", USER, 999, 0, True),
        ("within the balance tolerance does not drift", USER, 1005, 5, False),
        ("beyond the balance tolerance drifts", USER, 1006, 5, True),
        ("a soft-deleted user is not compared", RelayUser(1, 1000, deleted=True), 0, 0, None),
    ],
)
def test_user_drift_rule(rule: str, user: RelayUser, available: int, tolerance: int, drifted: bool | None) -> None:
    result = compare_user(user, available, tolerance)
    assert (None if result is None else result.drifted) is drifted, rule


@pytest.mark.parametrize(
    ("rule", "token", "ledger", "tolerance", "drifted"),
    [
        ("equal remaining does not drift", TOKEN, LedgerToken(1, False, 500), 0, False),
        ("remaining differing drifts", TOKEN, LedgerToken(1, False, 499), 0, True),
        ("remaining within tolerance does not drift", TOKEN, LedgerToken(1, False, 499), 1, False),
        ("unlimited on both sides: remaining is not compared", UNLIMITED, LedgerToken(1, True, 0), 0, False),
        ("unlimited on one side only drifts", UNLIMITED, LedgerToken(1, False, 0), 0, True),
        ("limited in the relay, unlimited in the ledger drifts", TOKEN, LedgerToken(1, True, 0), 1000, True),
        ("a token the ledger does not know drifts", TOKEN, None, 1000, True),
        ("a soft-deleted token is not compared", RelayToken(1, 1, 5, False, 1, deleted=True), None, 0, None),
        ("a token whose user is gone is not compared", RelayToken(1, 9, 5, False, 1, user_known=False), None, 0, None),
    ],
)
def test_token_drift_rule(
    rule: str, token: RelayToken, ledger: LedgerToken | None, tolerance: int, drifted: bool | None
) -> None:
    result = compare_token(token, ledger, tolerance)
    assert (None if result is None else result.drifted) is drifted, rule


def test_the_tally_is_ok_only_without_differences() -> None:
    tally = Tally.empty()
    tally.add_log(LogComparison(M, log(1, 1500), charge(1, 1500)))
    result = compare_user(USER, 1000, 0)
    assert result is not None
    tally.add_balance(result)
    assert tally.ok
    tally.add_log(LogComparison(L, None, charge(2, 1500)))
    assert not tally.ok
    assert tally.differences == 1
    assert tally.as_dict()["logs"] == {"matched": 1, "amount_differs": 0, "only_in_relay": 0, "only_in_ledger": 1}
