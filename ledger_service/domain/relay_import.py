"""Bringing a relay's books into the ledger: what one import run posts for each user, token and price.

The rules (docs/integration.md has the operator's view):
- A user seen for the first time under a source gets an `opening` entry that brings the ledger's user balance
  (available + held) to the relay's `quota`. A negative quota is a debt and is imported as it is.
- On later runs, what counts is how far the relay's balance moved since the last run saw it, not what the ledger
  did in between (holds and charges the relay also posted are the ledger's own business): one `adjustment` of the
  difference, nothing when it did not move.
- Tokens follow the same rule on the allowance ledger: registered and set to `remain_quota` (or unlimited) when
  first seen, moved by the relay's difference afterwards.
- Prices are the ratios an admin stored in the relay's `options`, digits exactly as written. Keys the ledger
  cannot hold (`model(channelType)`, unusable names or values) are listed, never dropped silently.

Everything here is pure: the service (services/relay_import.py) reads both sides and writes what this decides.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from ledger_service.domain.entries import EntryDraft, EntryKind, allowance_postings, funding_postings
from ledger_service.domain.operations import INVISIBLE
from ledger_service.domain.pricing import DEFAULT_COMPLETION_RATIO, DEFAULT_MODEL_RATIO, MAX_AMOUNT, check_ratio
from ledger_service.domain.relays import RelayKind, RelayToken, RelayUser

SOURCE_ID = re.compile(r"\A[A-Za-z0-9._-]{1,64}\Z")
"""A source id goes into entry references (`import:<source-id>:user:<id>`), whose characters are limited."""

_NAME = re.compile(rf"\A[^{INVISIBLE}]{{1,200}}\Z")
_PER_CHANNEL_TYPE = re.compile(r"\A.+\([0-9]+\)\Z")
"""one-api looks up `model(channelType)` before `model`: a price for one kind of channel, which the ledger,
pricing by model and group only, cannot hold."""

MODEL_OPTIONS = {"ModelRatio": "model_ratio", "CompletionRatio": "completion_ratio", "ModelPrice": "model_price"}
GROUP_OPTION = "GroupRatio"
PRE_CONSUMED_OPTION = "PreConsumedQuota"
_PRICE_LIKE = re.compile(r"(Ratio|Price)s?\Z")


def check_source_id(source_id: str) -> str:
    if not SOURCE_ID.match(source_id):
        raise ValueError("a source id is 1-64 characters of A-Z a-z 0-9 . _ -")
    return source_id


def opening_reference(source_id: str, subject: str, relay_id: int) -> str:
    """The reference of what a user's or token's first import posts: one per source and subject, ever."""
    return f"import:{source_id}:{subject}:{relay_id}"


def moved_reference(source_id: str, run_id: int, subject: str, relay_id: int) -> str:
    """The reference of a later run's correction: it names the run, so each run moves a balance at most once."""
    return f"import:{source_id}:run:{run_id}:{subject}:{relay_id}"


@dataclass(frozen=True, slots=True)
class Listed:
    """Something the import did not bring over, or brought over with a caveat, and why."""

    subject: str
    """user, token, model, group or option."""
    key: str
    reason: str


# Users -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UserMove:
    """What a run does for one user: post `amount` (possibly 0) and remember `relay_quota` as seen."""

    user_id: int
    kind: EntryKind
    """OPENING the first time the source's user is seen, ADJUSTMENT afterwards."""
    amount: int
    relay_quota: int
    before: int
    """The ledger's balance before an opening, or the relay quota the previous run saw before an adjustment."""

    def draft(self, source_id: str, run_id: int, relay: RelayKind) -> EntryDraft:
        opening = self.kind is EntryKind.OPENING
        details: dict[str, Any] = {
            "source": source_id,
            "relay": str(relay),
            "run": run_id,
            "relay_quota": self.relay_quota,
            ("balance_before" if opening else "previous_relay_quota"): self.before,
        }
        return EntryDraft(
            kind=self.kind,
            postings=funding_postings(self.user_id, self.amount),
            user_id=self.user_id,
            reference=(
                opening_reference(source_id, "user", self.user_id)
                if opening
                else moved_reference(source_id, run_id, "user", self.user_id)
            ),
            details=details,
        )


def plan_user(user: RelayUser, seen: int | None, ledger_total: int) -> UserMove | Listed | None:
    """The move for one relay user; None when nothing moved since the last run.

    `seen` is the quota the last run saw (None: never imported from this source); `ledger_total` the ledger's
    available + held for the user now.
    """
    if user.deleted:
        return Listed("user", str(user.id), "soft-deleted in the relay: not imported")
    if not -MAX_AMOUNT <= user.quota <= MAX_AMOUNT:
        return Listed("user", str(user.id), f"quota {user.quota} is beyond the ledger's limit of {MAX_AMOUNT}")
    if seen == user.quota:
        return None
    if seen is None:
        move = UserMove(user.id, EntryKind.OPENING, user.quota - ledger_total, user.quota, ledger_total)
    else:
        move = UserMove(user.id, EntryKind.ADJUSTMENT, user.quota - seen, user.quota, seen)
    if abs(move.amount) > MAX_AMOUNT:
        return Listed("user", str(user.id), f"the {move.kind} of {move.amount} is beyond the ledger's {MAX_AMOUNT}")
    return move


# Tokens ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SeenToken:
    remain_quota: int
    unlimited: bool


@dataclass(frozen=True, slots=True)
class LedgerToken:
    user_id: int
    unlimited: bool
    allowance: int
    """The token's balance on the allowance ledger (0 for an unlimited token)."""


@dataclass(frozen=True, slots=True)
class TokenMove:
    """What a run does for one token: register it, post `delta` to its allowance, remember what it saw."""

    token_id: int
    user_id: int
    unlimited: bool
    remain_quota: int
    delta: int
    first: bool
    allowance_before: int

    def draft(self, source_id: str, run_id: int, relay: RelayKind) -> EntryDraft:
        return EntryDraft(
            kind=EntryKind.ALLOWANCE,
            postings=allowance_postings(self.token_id, self.delta),
            user_id=self.user_id,
            token_id=self.token_id,
            reference=(
                opening_reference(source_id, "token", self.token_id)
                if self.first
                else moved_reference(source_id, run_id, "token", self.token_id)
            ),
            details={
                "source": source_id,
                "relay": str(relay),
                "run": run_id,
                "previous": self.allowance_before,
                "remaining": self.allowance_before + self.delta,
                "unlimited": self.unlimited,
                "relay_remain_quota": self.remain_quota,
            },
        )


def plan_token(token: RelayToken, seen: SeenToken | None, ledger: LedgerToken | None) -> TokenMove | Listed | None:
    """The move for one relay token; None when nothing moved since the last run."""
    if token.deleted:
        return Listed("token", str(token.id), "soft-deleted in the relay: not imported")
    if not token.user_known or token.user_id < 1:
        return Listed("token", str(token.id), f"its user {token.user_id} is missing or deleted in the relay")
    if ledger is not None and ledger.user_id != token.user_id:
        return Listed("token", str(token.id), f"registered to user {ledger.user_id} in the ledger, not {token.user_id}")
    if not -MAX_AMOUNT <= token.remain_quota <= MAX_AMOUNT:
        return Listed("token", str(token.id), f"remain_quota {token.remain_quota} is beyond {MAX_AMOUNT}")
    if seen == SeenToken(token.remain_quota, token.unlimited):
        return None
    allowance = 0 if ledger is None else ledger.allowance
    if token.unlimited:
        delta = -allowance  # an unlimited token has no allowance postings: back to zero
    elif seen is None or seen.unlimited or ledger is None or ledger.unlimited:
        delta = token.remain_quota - allowance
    else:
        delta = token.remain_quota - seen.remain_quota
    if abs(delta) > MAX_AMOUNT:
        return Listed("token", str(token.id), f"the allowance change {delta} is beyond {MAX_AMOUNT}")
    return TokenMove(
        token_id=token.id,
        user_id=token.user_id,
        unlimited=token.unlimited,
        remain_quota=token.remain_quota,
        delta=delta,
        first=seen is None,
        allowance_before=allowance,
    )


# Prices ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModelPrices:
    model_ratio: Decimal
    completion_ratio: Decimal
    model_price: Decimal | None


@dataclass(slots=True)
class PricePlan:
    models: dict[str, ModelPrices] = field(default_factory=dict)
    """Models whose prices change (or are new), with every field as it will be."""
    groups: dict[str, Decimal] = field(default_factory=dict)
    unchanged: int = 0
    listed: list[Listed] = field(default_factory=list)
    stored: int = 0
    """Models and groups with a usable price in the relay's options."""


def parse_option_map(option: str, text: str, listed: list[Listed]) -> dict[str, Decimal]:
    """A relay's JSON map of name -> number, each number with its digits as written; bad entries are listed."""
    try:
        document = json.loads(text, parse_float=Decimal, parse_int=Decimal)
    except ValueError as error:
        listed.append(Listed("option", option, f"not valid JSON ({error.args[0].split(':')[0]}): nothing imported"))
        return {}
    if not isinstance(document, dict):
        listed.append(Listed("option", option, "not a JSON object: nothing imported"))
        return {}
    ratios: dict[str, Decimal] = {}
    for name, value in document.items():
        reason = _unusable(name, value)
        if reason is None:
            ratios[name] = value
        else:
            listed.append(Listed("model" if option != GROUP_OPTION else "group", name, f"{option}: {reason}"))
    return ratios


def _unusable(name: str, value: object) -> str | None:
    if _PER_CHANNEL_TYPE.match(name):
        return "a price for one channel type (model(channelType)), which the ledger cannot hold"
    if not _NAME.match(name):
        return "the name is empty, longer than 200 characters or has control characters"
    if not isinstance(value, Decimal):
        return f"{json.dumps(value, default=str)} is not a number"
    try:
        check_ratio(value, "the value")
    except ValueError as error:
        return str(error)
    return None


def plan_prices(
    options: Mapping[str, str], models: Mapping[str, ModelPrices], groups: Mapping[str, Decimal]
) -> PricePlan:
    """The price changes that make the ledger show every price stored in the relay's options.

    A field the relay did not store for a model keeps the ledger's value (or the ledger's default for a model it
    does not know), and is listed: the relay applies its compiled default there, which its database does not say.
    """
    plan = PricePlan()
    stored: dict[str, dict[str, Decimal]] = {}
    for option, field_name in MODEL_OPTIONS.items():
        if option in options:
            ratios = parse_option_map(option, options[option], plan.listed)
            stored[field_name] = ratios
    names = sorted({name for ratios in stored.values() for name in ratios})
    for name in names:
        current = models.get(name)
        wanted = _wanted_prices(name, stored, current, plan.listed)
        if current is not None and _same(current, wanted):
            plan.unchanged += 1
        else:
            plan.models[name] = wanted
    plan.stored = len(names)
    if GROUP_OPTION in options:
        for name, ratio in parse_option_map(GROUP_OPTION, options[GROUP_OPTION], plan.listed).items():
            plan.stored += 1
            if name in groups and str(groups[name]) == str(ratio):
                plan.unchanged += 1
            else:
                plan.groups[name] = ratio
    for option in sorted(options):
        if _PRICE_LIKE.search(option) and option not in MODEL_OPTIONS and option != GROUP_OPTION:
            plan.listed.append(Listed("option", option, "a pricing option the ledger has no counterpart for"))
    return plan


def _wanted_prices(
    name: str, stored: Mapping[str, Mapping[str, Decimal]], current: ModelPrices | None, listed: list[Listed]
) -> ModelPrices:
    def pick(field_name: str, default: Decimal) -> Decimal:
        value = stored.get(field_name, {}).get(name)
        if value is not None:
            return value
        kept = default if current is None else getattr(current, field_name)
        listed.append(
            Listed(
                "model",
                name,
                f"{field_name} not stored in the relay (its compiled default applies there); the ledger keeps {kept}",
            )
        )
        return kept

    model_price = stored.get("model_price", {}).get(name)
    if model_price is None and "model_price" not in stored and current is not None:
        model_price = current.model_price  # the relay has no per-call prices at all: leave the ledger's alone
    per_call = model_price is not None
    # A model priced per call uses neither ratio: when the relay stored none, the ledger's stay, unremarked.
    model_ratio = (
        (DEFAULT_MODEL_RATIO if current is None else current.model_ratio)
        if per_call and name not in stored.get("model_ratio", {})
        else pick("model_ratio", DEFAULT_MODEL_RATIO)
    )
    completion_ratio = (
        (DEFAULT_COMPLETION_RATIO if current is None else current.completion_ratio)
        if per_call and name not in stored.get("completion_ratio", {})
        else pick("completion_ratio", DEFAULT_COMPLETION_RATIO)
    )
    return ModelPrices(model_ratio=model_ratio, completion_ratio=completion_ratio, model_price=model_price)


def _same(a: ModelPrices, b: ModelPrices) -> bool:
    """Equal with the same digits: 2.50 in the relay is shown as 2.50, so 2.5 in the ledger is a change."""
    return (str(a.model_ratio), str(a.completion_ratio), str(a.model_price)) == (
        str(b.model_ratio),
        str(b.completion_ratio),
        str(b.model_price),
    )


def pre_consumed_note(options: Mapping[str, str], ledger_setting: int) -> Listed | None:
    """The relay's PreConsumedQuota, when it stored one that differs from LEDGER_PRE_CONSUMED_QUOTA."""
    text = options.get(PRE_CONSUMED_OPTION)
    if text is None:
        return None
    try:
        relay_value = int(Decimal(text.strip()))
    except ArithmeticError:
        return Listed("option", PRE_CONSUMED_OPTION, f"{text!r} is not a number")
    if relay_value == ledger_setting:
        return None
    return Listed(
        "option",
        PRE_CONSUMED_OPTION,
        f"the relay pre-consumes {relay_value}, the ledger {ledger_setting}:"
        f" set LEDGER_PRE_CONSUMED_QUOTA={relay_value} so that both estimate the same holds",
    )
