"""Comparing a relay's own bills with the ledger's during the shadow period: the rules, without I/O.

During the shadow period the relay bills itself (its `logs`, `users.quota`, `tokens.remain_quota`) and also posts
each call to the ledger (a hold then a settlement, or a consumption, with the relay's request id). `compare-relay`
reads both sides over a window and classifies:

Per consume log (relay `logs.type = 2`) and per ledger charge (a `settle` or `consume` entry, not reversed):
- `matched`: a relay log and a ledger charge pair up and their amounts differ by at most the amount tolerance;
- `amount_differs`: they pair up but the amounts differ by more (both amounts are reported);
- `only_in_relay`: a relay log no ledger charge pairs with;
- `only_in_ledger`: a ledger charge no relay log pairs with.

Pairing:
- one-api: by request id (`logs.request_id` = the ledger's `request_id`). A one-api log without a request id
  (one-api before 2025-01 did not record it) falls back on the composite key below.
- new-api: by the composite key (token_id, channel_id, model, prompt_tokens, completion_tokens), plus the user
  (implied by the token). The quota is compared, not keyed, so `amount_differs` exists; of several candidates the
  nearest in time wins (then the lowest ledger entry id).
- Either way a log and a charge pair only when their times are at most the time tolerance apart: the relay writes
  its log when it settles, so within seconds of the ledger's entry.

Window edges: both sides are read over [since - tolerance, until + tolerance), and an outcome is reported only when
its own time lies in [since, until) (a pair: when either side's does). A log just inside the window whose charge
landed just outside is therefore `matched`, not reported as missing; items outside the window pair with items
inside but are otherwise never reported.

Streaming: `LogMatcher` takes both sides' items merged in time order and decides each one as soon as no later
item can change the decision (a relay log once the stream has passed its time + tolerance; a ledger charge once no
pending or later relay log can claim it). What it holds is the items within about two tolerances of the stream's
position, so memory does not grow with the window.

Balance drift (at the time of the run, not over the window): each relay user that is not soft-deleted, its
`quota` against the ledger user's `available`; each relay token that is not soft-deleted, its `unlimited_quota` /
`remain_quota` against the ledger token's unlimited flag / remaining allowance (a token the ledger does not know
drifts). Both sides exclude what is in flight: the relay has already taken its pre-consumption off `quota` and
`remain_quota`, the ledger has its holds in `held`, outside `available` and the token's remaining. So while traffic
flows, calls in flight can show as transient drift; the balance tolerance absorbs them.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass
from typing import Any

from ledger_service.domain.relays import LOG_CONSUME, RelayKind, RelayLog, RelayToken, RelayUser


class Outcome(enum.StrEnum):
    MATCHED = "matched"
    AMOUNT_DIFFERS = "amount_differs"
    ONLY_IN_RELAY = "only_in_relay"
    ONLY_IN_LEDGER = "only_in_ledger"


@dataclass(frozen=True, slots=True)
class Tolerances:
    time_seconds: float = 60.0
    """How far apart a relay log and a ledger charge may be and still pair."""
    amount: int = 0
    """Quota by which a pair's amounts may differ and still be `matched`."""
    balance: int = 0
    """Quota by which a balance may differ without drifting."""


@dataclass(frozen=True, slots=True)
class LedgerCharge:
    """A charge the ledger booked: a `settle` or `consume` entry with its request's usage."""

    entry_id: int
    request_id: str
    at: float
    """Unix seconds (the entry's created_at)."""
    user_id: int
    token_id: int
    channel_id: int
    model: str
    prompt_tokens: int
    completion_tokens: int
    charged: int


@dataclass(frozen=True, slots=True)
class LogComparison:
    outcome: Outcome
    relay: RelayLog | None
    ledger: LedgerCharge | None

    @property
    def at(self) -> float:
        """The time the comparison is filed under: the relay log's, else the ledger charge's."""
        if self.relay is not None:
            return float(self.relay.created_at)
        assert self.ledger is not None
        return self.ledger.at

    @property
    def difference(self) -> int | None:
        """Ledger minus relay, for a pair."""
        if self.relay is None or self.ledger is None:
            return None
        return self.ledger.charged - self.relay.quota


_Key = tuple[int, int, str, int, int]


def _relay_key(log: RelayLog) -> _Key:
    return (log.user_id, log.channel_id, log.model_name, log.prompt_tokens, log.completion_tokens)


def _ledger_key(charge: LedgerCharge) -> _Key:
    return (charge.user_id, charge.channel_id, charge.model, charge.prompt_tokens, charge.completion_tokens)


class LogMatcher:
    """Pairs relay consume logs with ledger charges, fed both streams merged in time order (see the module doc).

    Feed with `relay(log)` and `ledger(charge)`, each item's time at or after every earlier item's (of either
    side); each call returns the comparisons decided by it; `finish()` returns the rest. Logs of other types
    than consume (2) are ignored.
    """

    def __init__(self, kind: RelayKind, since: float, until: float, tolerances: Tolerances) -> None:
        self.by_request_id = kind is RelayKind.ONE_API
        self.since = since
        self.until = until
        self.tolerances = tolerances
        self._now = float("-inf")
        self._relay: deque[RelayLog] = deque()
        self._ledger: deque[LedgerCharge] = deque()
        self._open: dict[int, LedgerCharge] = {}
        """Unclaimed ledger charges by entry id (the deque keeps their order; claimed ones are skipped there)."""
        self._by_request: dict[str, int] = {}
        self._by_key: dict[_Key, list[int]] = {}

    @property
    def pending(self) -> int:
        """Items held, undecided: bounded by what arrives within about two time tolerances."""
        return len(self._relay) + len(self._open)

    def relay(self, log: RelayLog) -> list[LogComparison]:
        decided = self._advance(float(log.created_at))
        if log.type == LOG_CONSUME:
            self._relay.append(log)
        return decided

    def ledger(self, charge: LedgerCharge) -> list[LogComparison]:
        decided = self._advance(charge.at)
        self._ledger.append(charge)
        self._open[charge.entry_id] = charge
        self._by_request.setdefault(charge.request_id, charge.entry_id)
        self._by_key.setdefault(_ledger_key(charge), []).append(charge.entry_id)
        return decided

    def finish(self) -> list[LogComparison]:
        return self._advance(float("inf"))

    def _advance(self, now: float) -> list[LogComparison]:
        if now < self._now:
            raise ValueError(f"items out of time order: {now} after {self._now}")
        self._now = now
        tolerance = self.tolerances.time_seconds
        decided: list[LogComparison] = []
        # A relay log is decided once every charge that could pair with it (up to its time + tolerance) is in.
        while self._relay and self._relay[0].created_at + tolerance < now:
            decided.extend(self._decide_relay(self._relay.popleft()))
        # A charge is decided once no pending or later relay log can claim it.
        horizon = self._relay[0].created_at if self._relay else now
        while self._ledger and self._ledger[0].at + tolerance < horizon:
            charge = self._ledger.popleft()
            if self._open.pop(charge.entry_id, None) is not None:
                self._forget(charge)
                if self.since <= charge.at < self.until:
                    decided.append(LogComparison(Outcome.ONLY_IN_LEDGER, None, charge))
        return decided

    def _forget(self, charge: LedgerCharge) -> None:
        if self._by_request.get(charge.request_id) == charge.entry_id:
            del self._by_request[charge.request_id]
        key = _ledger_key(charge)
        ids = self._by_key.get(key)
        if ids is not None:
            ids.remove(charge.entry_id)
            if not ids:
                del self._by_key[key]

    def _candidates(self, log: RelayLog) -> list[LedgerCharge]:
        if self.by_request_id and log.request_id:
            entry_id = self._by_request.get(log.request_id)
            return [] if entry_id is None else [self._open[entry_id]]
        found = (self._open[i] for i in self._by_key.get(_relay_key(log), ()))
        return [c for c in found if log.token_id is None or c.token_id == log.token_id]

    def _decide_relay(self, log: RelayLog) -> list[LogComparison]:
        tolerance = self.tolerances.time_seconds
        near = [c for c in self._candidates(log) if abs(c.at - log.created_at) <= tolerance]
        in_window = self.since <= log.created_at < self.until
        if not near:
            return [LogComparison(Outcome.ONLY_IN_RELAY, log, None)] if in_window else []
        charge = min(near, key=lambda c: (abs(c.at - log.created_at), c.entry_id))
        del self._open[charge.entry_id]
        self._forget(charge)
        if not (in_window or self.since <= charge.at < self.until):
            return []
        same = abs(charge.charged - log.quota) <= self.tolerances.amount
        return [LogComparison(Outcome.MATCHED if same else Outcome.AMOUNT_DIFFERS, log, charge)]


# Balance drift ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LedgerToken:
    token_id: int
    unlimited: bool
    remaining: int
    """The token's allowance balance (0 and meaningless when unlimited)."""


@dataclass(frozen=True, slots=True)
class BalanceComparison:
    subject: str
    """`user` or `token`."""
    id: int
    drifted: bool
    relay: int
    """The relay's `users.quota` / `tokens.remain_quota`."""
    ledger: int | None
    """The ledger's `available` / remaining allowance; None for a token the ledger does not know."""
    relay_unlimited: bool | None = None
    ledger_unlimited: bool | None = None
    reason: str = ""

    @property
    def difference(self) -> int | None:
        return None if self.ledger is None else self.ledger - self.relay


def compare_user(user: RelayUser, available: int, tolerance: int) -> BalanceComparison | None:
    """A relay user against the ledger's `available`; None for a soft-deleted user (not compared)."""
    if user.deleted:
        return None
    drifted = abs(available - user.quota) > tolerance
    reason = f"quota {user.quota} vs available {available}" if drifted else ""
    return BalanceComparison("user", user.id, drifted, user.quota, available, reason=reason)


def compare_token(token: RelayToken, ledger: LedgerToken | None, tolerance: int) -> BalanceComparison | None:
    """A relay token against the ledger's; None for a token import-relay does not bring over either (soft-deleted,
    or its user missing or deleted in the relay): not compared."""
    if token.deleted or not token.user_known:
        return None
    if ledger is None:
        return BalanceComparison(
            "token", token.id, True, token.remain_quota, None, token.unlimited, None, "token not in the ledger"
        )
    if token.unlimited != ledger.unlimited:
        drifted, reason = True, f"unlimited {token.unlimited} vs {ledger.unlimited}"
    elif token.unlimited:
        drifted, reason = False, ""
    else:
        drifted = abs(ledger.remaining - token.remain_quota) > tolerance
        reason = f"remain_quota {token.remain_quota} vs remaining {ledger.remaining}" if drifted else ""
    remaining = None if ledger.unlimited else ledger.remaining
    return BalanceComparison(
        "token", token.id, drifted, token.remain_quota, remaining, token.unlimited, ledger.unlimited, reason
    )


# The tally ----------------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Tally:
    """Counts per class, for the summary and the exit status."""

    logs: dict[str, int]
    users_compared: int = 0
    users_drifted: int = 0
    tokens_compared: int = 0
    tokens_drifted: int = 0

    @classmethod
    def empty(cls) -> Tally:
        return cls(logs={outcome.value: 0 for outcome in Outcome})

    def add_log(self, comparison: LogComparison) -> None:
        self.logs[comparison.outcome.value] += 1

    def add_balance(self, comparison: BalanceComparison) -> None:
        if comparison.subject == "user":
            self.users_compared += 1
            self.users_drifted += comparison.drifted
        else:
            self.tokens_compared += 1
            self.tokens_drifted += comparison.drifted

    @property
    def differences(self) -> int:
        mismatched = sum(n for outcome, n in self.logs.items() if outcome != Outcome.MATCHED.value)
        return mismatched + self.users_drifted + self.tokens_drifted

    @property
    def ok(self) -> bool:
        return self.differences == 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "logs": dict(self.logs),
            "users": {"compared": self.users_compared, "drifted": self.users_drifted},
            "tokens": {"compared": self.tokens_compared, "drifted": self.tokens_drifted},
            "differences": self.differences,
            "ok": self.ok,
        }
