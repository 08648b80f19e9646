"""External reconciliation and margin rules: provider records against the ledger's charges (no I/O).

Everything is exact: token counts and requests are ints, USD amounts Decimals. The rules, in the order a run
applies them (docs/external.md, "Reconciliation runs"):

1. `resolve_channel`: which ledger channel a provider record is about.
2. `latest_records`: in a time-window scope, the latest upload of an identical record wins.
3. `group_records`: records by (channel, model, bucket_start, bucket_end), the comparison key.
4. `compare`: one key's ledger aggregate against its provider figures, within the tolerances -> a class.
5. `plan_items`: the items of a run, in a fixed order (a resumed run recomputes the same list).
6. `drift`: per channel, ledger totals against provider totals.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any, Literal

from ledger_service.domain import errors

Strategy = Literal["many_to_one", "one_to_one"]
STRATEGIES: tuple[str, ...] = ("many_to_one", "one_to_one")
CLASSES: tuple[str, ...] = ("matched", "differs", "only_provider", "only_ledger")
MILLION = Decimal(1_000_000)
USD_PLACES = Decimal("0.000001")
"""USD figures computed here (estimates, margins, quota in USD) are rounded to 6 places, half to even."""


class UploadNotFound(errors.NotFound):
    code = "upload_not_found"
    title = "Upload not found"


class ReconciliationNotFound(errors.NotFound):
    code = "reconciliation_not_found"
    title = "Reconciliation run not found"


class ItemNotFound(errors.NotFound):
    code = "item_not_found"
    title = "Reconciliation item not found"


def usd(amount: Decimal) -> Decimal:
    return amount.quantize(USD_PLACES, rounding=ROUND_HALF_EVEN)


def usd_text(amount: Decimal | None) -> str | None:
    return None if amount is None else str(usd(amount))


# Inputs ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Tolerance:
    """How far ledger and provider may be apart and still match. A figure matches when the absolute difference
    is at most the absolute tolerance OR at most the percentage of the provider's figure (either suffices).
    Percentages are percent (1 = 1 %). All zero: exact."""

    tokens_pct: Decimal = Decimal(0)
    requests: int = 0
    cost_pct: Decimal = Decimal(0)
    cost_usd: Decimal = Decimal(0)

    def normalised(self) -> dict[str, str]:
        return {
            "tokens_pct": _decimal_text(self.tokens_pct),
            "requests": str(self.requests),
            "cost_pct": _decimal_text(self.cost_pct),
            "cost_usd": _decimal_text(self.cost_usd),
        }


def _decimal_text(value: Decimal) -> str:
    """One text per value: 1, 1.0 and 1E0 are all `1`."""
    normal = value.normalize()
    return format(normal, "f") if normal != 0 else "0"


def fingerprint(
    *,
    upload_id: int | None,
    upload_sha256: bytes | None,
    since: datetime | None,
    until: datetime | None,
    strategy: str,
    tolerance: Tolerance,
) -> tuple[bytes, dict[str, Any]]:
    """SHA-256 of the normalised input (and the upload's own hash): the same input is the same run."""
    params: dict[str, Any] = {
        "upload_id": upload_id,
        "upload_sha256": None if upload_sha256 is None else upload_sha256.hex(),
        "since": _instant(since),
        "until": _instant(until),
        "strategy": strategy,
        "tolerance": tolerance.normalised(),
    }
    canonical = json.dumps(params, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).digest(), params


def _instant(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class ProviderRecord:
    """One provider record, with its upload's source and fallback channel."""

    upload_id: int
    line: int
    source: str
    bucket_start: datetime
    bucket_end: datetime
    api_key_id: str | None = None
    project_id: str | None = None
    channel_id: int | None = None
    model: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    cached_tokens: int | None = None
    requests: int | None = None
    cost_usd: Decimal | None = None
    line_item: str | None = None
    upload_channel_id: int | None = None


@dataclass(frozen=True, slots=True)
class Placed:
    """A record with the channel it was resolved to (None: unresolved, `reason` says why)."""

    record: ProviderRecord
    channel_id: int | None
    reason: str | None = None


def resolve_channel(record: ProviderRecord, channel_map: Mapping[tuple[str, str], int]) -> Placed:
    """The record's own channel_id (CSV); else the map by (source, api key), then (source, project); else the
    upload's channel; else none."""
    if record.channel_id is not None:
        return Placed(record, record.channel_id)
    for key in (record.api_key_id, record.project_id):
        if key is not None and (record.source, key) in channel_map:
            return Placed(record, channel_map[(record.source, key)])
    if record.upload_channel_id is not None:
        return Placed(record, record.upload_channel_id)
    if record.api_key_id is not None:
        return Placed(record, None, f"no channel for api key {record.api_key_id}")
    if record.project_id is not None:
        return Placed(record, None, f"no channel for project {record.project_id}")
    return Placed(record, None, "no channel for a record with neither api key nor project")


def latest_records(records: Iterable[ProviderRecord]) -> list[ProviderRecord]:
    """Of records saying the same thing about the same key and bucket (same source, api key, project, channel,
    model, line item and bucket), keep those of the latest upload (a provider file downloaded again later
    replaces the earlier one's figures rather than doubling them)."""
    latest: dict[tuple[Any, ...], int] = {}
    kept: list[ProviderRecord] = list(records)
    for record in kept:
        identity = _identity(record)
        latest[identity] = max(latest.get(identity, record.upload_id), record.upload_id)
    return [record for record in kept if latest[_identity(record)] == record.upload_id]


def _identity(record: ProviderRecord) -> tuple[Any, ...]:
    return (
        record.source,
        record.api_key_id,
        record.project_id,
        record.channel_id,
        record.model,
        record.line_item,
        record.bucket_start,
        record.bucket_end,
    )


# Figures -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Key:
    channel_id: int | None
    model: str | None
    bucket_start: datetime
    bucket_end: datetime

    def order(self) -> tuple[Any, ...]:
        return (
            self.bucket_start,
            self.bucket_end,
            self.channel_id is None,
            self.channel_id or 0,
            self.model is None,
            self.model or "",
        )


@dataclass(frozen=True, slots=True)
class Price:
    """What a provider charges for a model: USD per million tokens, and per request."""

    input_usd_per_mtok: Decimal
    output_usd_per_mtok: Decimal
    cached_input_usd_per_mtok: Decimal | None = None
    request_usd: Decimal = Decimal(0)

    def cost(self, *, input_tokens: int, output_tokens: int, cached_tokens: int | None, requests: int) -> Decimal:
        """Exact estimate. Input tokens include cached ones; cached tokens are priced at the cached price when
        the model has one (else at the input price); unknown cached tokens count as uncached."""
        cached = cached_tokens or 0
        cached_price = (
            self.input_usd_per_mtok if self.cached_input_usd_per_mtok is None else self.cached_input_usd_per_mtok
        )
        tokens = (
            (input_tokens - cached) * self.input_usd_per_mtok
            + cached * cached_price
            + output_tokens * self.output_usd_per_mtok
        )
        return tokens / MILLION + requests * self.request_usd


@dataclass(frozen=True, slots=True)
class LedgerUsage:
    """The ledger's charges (net of reversals) of one key."""

    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int | None = 0
    """None when an entry of the key did not record cached tokens (unknown)."""
    requests: int = 0
    quota: int = 0

    def estimated_cost(self, price: Price | None) -> Decimal | None:
        if price is None:
            return None
        return usd(
            price.cost(
                input_tokens=self.input_tokens,
                output_tokens=self.output_tokens,
                cached_tokens=self.cached_tokens,
                requests=self.requests,
            )
        )

    def plus(self, other: LedgerUsage) -> LedgerUsage:
        return LedgerUsage(
            input_tokens=self.input_tokens + other.input_tokens,
            output_tokens=self.output_tokens + other.output_tokens,
            cached_tokens=None
            if self.cached_tokens is None or other.cached_tokens is None
            else self.cached_tokens + other.cached_tokens,
            requests=self.requests + other.requests,
            quota=self.quota + other.quota,
        )


@dataclass(frozen=True, slots=True)
class ProviderUsage:
    """Provider records of one key, summed; a figure no record knows is None."""

    input_tokens: int | None = None
    output_tokens: int | None = None
    cached_tokens: int | None = None
    requests: int | None = None
    cost_usd: Decimal | None = None
    records: tuple[tuple[int, int], ...] = ()
    """(upload_id, line) of each record."""
    api_keys: tuple[str, ...] = ()


def _add(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else a + b


def _add_usd(a: Decimal | None, b: Decimal | None) -> Decimal | None:
    return b if a is None else a if b is None else a + b


def provider_usage(records: Sequence[ProviderRecord]) -> ProviderUsage:
    total = ProviderUsage()
    keys: list[str] = []
    for record in records:
        total = ProviderUsage(
            input_tokens=_add(total.input_tokens, record.input_tokens),
            output_tokens=_add(total.output_tokens, record.output_tokens),
            cached_tokens=_add(total.cached_tokens, record.cached_tokens),
            requests=_add(total.requests, record.requests),
            cost_usd=_add_usd(total.cost_usd, record.cost_usd),
            records=(*total.records, (record.upload_id, record.line)),
        )
        if record.api_key_id is not None and record.api_key_id not in keys:
            keys.append(record.api_key_id)
    return ProviderUsage(
        input_tokens=total.input_tokens,
        output_tokens=total.output_tokens,
        cached_tokens=total.cached_tokens,
        requests=total.requests,
        cost_usd=total.cost_usd,
        records=total.records,
        api_keys=tuple(sorted(keys)),
    )


# Classification ----------------------------------------------------------------------------------------------


def within_pct(ledger: int | Decimal, provider: int | Decimal, pct: Decimal) -> bool:
    return abs(Decimal(ledger) - Decimal(provider)) * 100 <= pct * abs(Decimal(provider))


def within(ledger: int | Decimal, provider: int | Decimal, *, pct: Decimal, absolute: Decimal) -> bool:
    return abs(Decimal(ledger) - Decimal(provider)) <= absolute or within_pct(ledger, provider, pct)


@dataclass(frozen=True, slots=True)
class Comparison:
    klass: str
    difference: dict[str, Any]


def compare(
    ledger: LedgerUsage | None,
    provider: ProviderUsage | None,
    *,
    ledger_cost: Decimal | None,
    tolerance: Tolerance,
    channel_reason: str | None = None,
    shared_key: int = 1,
) -> Comparison:
    """One key: the class and the difference (ledger minus provider, per figure both sides know; `reasons`
    names every figure outside its tolerance, or why the item has one side only)."""
    if provider is None and ledger is None:
        raise ValueError("a key has at least one side")
    if provider is None:
        assert ledger is not None
        return Comparison("only_ledger", {"reasons": ["the provider has no record for this usage"]})
    if channel_reason is not None:
        return Comparison("only_provider", {"reasons": [channel_reason]})
    if ledger is None:
        return Comparison("only_provider", {"reasons": ["the ledger has no usage for this record"]})
    difference: dict[str, Any] = {}
    reasons: list[str] = []
    tokens_pct = tolerance.tokens_pct
    for name, ours in (("input_tokens", ledger.input_tokens), ("output_tokens", ledger.output_tokens)):
        theirs = getattr(provider, name)
        if theirs is None:
            continue
        difference[name] = ours - theirs
        if not within_pct(ours, theirs, tokens_pct):
            reasons.append(f"{name} differ by {ours - theirs} (tolerance {_decimal_text(tokens_pct)}%)")
    if ledger.cached_tokens is not None and provider.cached_tokens is not None:
        difference["cached_tokens"] = ledger.cached_tokens - provider.cached_tokens
        if not within_pct(ledger.cached_tokens, provider.cached_tokens, tokens_pct):
            reasons.append(
                f"cached_tokens differ by {ledger.cached_tokens - provider.cached_tokens}"
                f" (tolerance {_decimal_text(tokens_pct)}%)"
            )
    if provider.requests is not None:
        difference["requests"] = ledger.requests - provider.requests
        if abs(ledger.requests - provider.requests) > tolerance.requests:
            reasons.append(f"requests differ by {ledger.requests - provider.requests} (tolerance {tolerance.requests})")
    if provider.cost_usd is not None and ledger_cost is not None:
        delta = ledger_cost - provider.cost_usd
        difference["cost_usd"] = usd_text(delta)
        if not within(ledger_cost, provider.cost_usd, pct=tolerance.cost_pct, absolute=tolerance.cost_usd):
            reasons.append(
                f"estimated cost differs by {usd_text(delta)} USD (tolerance {_decimal_text(tolerance.cost_pct)}%"
                f" or {_decimal_text(tolerance.cost_usd)} USD)"
            )
    if shared_key > 1:
        reasons.append(f"{shared_key} provider records share this channel, model and bucket: use many_to_one")
    difference["reasons"] = reasons
    return Comparison("differs" if reasons else "matched", difference)


# Items -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Item:
    id: int
    klass: str
    key: Key
    ledger: dict[str, Any] | None
    provider: dict[str, Any] | None
    difference: dict[str, Any]


def ledger_document(usage: LedgerUsage, cost: Decimal | None) -> dict[str, Any]:
    return {
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "cached_tokens": usage.cached_tokens,
        "requests": usage.requests,
        "quota": usage.quota,
        "estimated_cost_usd": usd_text(cost),
    }


def provider_document(usage: ProviderUsage) -> dict[str, Any]:
    return {
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "cached_tokens": usage.cached_tokens,
        "requests": usage.requests,
        "cost_usd": None if usage.cost_usd is None else format(usage.cost_usd, "f"),
        "records": [{"upload_id": upload, "line": line} for upload, line in usage.records],
        "api_key_ids": list(usage.api_keys),
    }


@dataclass(frozen=True, slots=True)
class Scope:
    placed: list[Placed]
    """The provider records of the run, with their channels."""
    covered: Mapping[Key, LedgerUsage]
    """The ledger's usage inside each key of a resolved record (absent: no charge there)."""
    uncovered: Mapping[Key, LedgerUsage]
    """The ledger's usage in the scope outside every record's key, per grid bucket."""
    prices: Mapping[str, Price] = field(default_factory=dict)


def record_key(placed: Placed) -> Key:
    record = placed.record
    return Key(placed.channel_id, record.model, record.bucket_start, record.bucket_end)


def plan_items(scope: Scope, *, strategy: str, tolerance: Tolerance) -> list[Item]:
    """Every item of a run, numbered from 1 in a fixed order (bucket, channel, model, then record)."""
    by_key: dict[Key, list[Placed]] = defaultdict(list)
    for placed in scope.placed:
        by_key[record_key(placed)].append(placed)
    rows: list[tuple[tuple[Any, ...], str, Key, dict[str, Any] | None, dict[str, Any] | None, dict[str, Any]]] = []
    for key, group in by_key.items():
        group.sort(key=lambda p: (p.record.upload_id, p.record.line))
        ledger = None if key.channel_id is None else scope.covered.get(key)
        price = None if key.model is None else scope.prices.get(key.model)
        cost = None if ledger is None else ledger.estimated_cost(price)
        ledger_doc = None if ledger is None else ledger_document(ledger, cost)
        if key.channel_id is None:  # unresolved: one item per record, whatever the strategy
            for placed in group:
                usage = provider_usage([placed.record])
                result = compare(None, usage, ledger_cost=None, tolerance=tolerance, channel_reason=placed.reason)
                order = (*key.order(), placed.record.upload_id, placed.record.line)
                rows.append((order, result.klass, key, None, provider_document(usage), result.difference))
        elif strategy == "many_to_one":
            usage = provider_usage([placed.record for placed in group])
            result = compare(ledger, usage, ledger_cost=cost, tolerance=tolerance)
            rows.append((key.order(), result.klass, key, ledger_doc, provider_document(usage), result.difference))
        else:
            for placed in group:
                usage = provider_usage([placed.record])
                result = compare(ledger, usage, ledger_cost=cost, tolerance=tolerance, shared_key=len(group))
                order = (*key.order(), placed.record.upload_id, placed.record.line)
                rows.append((order, result.klass, key, ledger_doc, provider_document(usage), result.difference))
    for key, ledger in scope.uncovered.items():
        price = None if key.model is None else scope.prices.get(key.model)
        cost = ledger.estimated_cost(price)
        result = compare(ledger, None, ledger_cost=cost, tolerance=tolerance)
        rows.append((key.order(), result.klass, key, ledger_document(ledger, cost), None, result.difference))
    rows.sort(key=lambda row: row[0])
    return [
        Item(id=n, klass=klass, key=key, ledger=ledger, provider=provider, difference=difference)
        for n, (_, klass, key, ledger, provider, difference) in enumerate(rows, start=1)
    ]


def counts(items: Iterable[Item]) -> dict[str, int]:
    result = dict.fromkeys(CLASSES, 0)
    for item in items:
        result[item.klass] += 1
    return result


def drift(items: Iterable[Item]) -> list[dict[str, Any]]:
    """Per channel (unresolved records under `channel_id` null): ledger totals, provider totals, difference
    (ledger minus provider). Token and request totals sum what each side knows; cost totals are the ledger's
    estimate and the provider's cost records."""
    sides: dict[int | None, dict[str, dict[str, Any]]] = {}
    names = ("input_tokens", "output_tokens", "requests")
    for item in items:
        channel = sides.setdefault(
            item.key.channel_id,
            {
                "ledger": {**dict.fromkeys(names, 0), "cost_usd": Decimal(0)},
                "provider": {**dict.fromkeys(names, 0), "cost_usd": Decimal(0)},
            },
        )
        for side, document, cost_field in (
            ("ledger", item.ledger, "estimated_cost_usd"),
            ("provider", item.provider, "cost_usd"),
        ):
            if document is None:
                continue
            for name in names:
                channel[side][name] += document[name] or 0
            if document[cost_field] is not None:
                channel[side]["cost_usd"] += Decimal(document[cost_field])
    result: list[dict[str, Any]] = []
    for channel_id in sorted(sides, key=lambda c: (c is None, c or 0)):
        ledger, provider = sides[channel_id]["ledger"], sides[channel_id]["provider"]
        difference = {name: ledger[name] - provider[name] for name in names}
        difference["cost_usd"] = usd_text(ledger["cost_usd"] - provider["cost_usd"])
        result.append(
            {
                "channel_id": channel_id,
                "ledger": {**{name: ledger[name] for name in names}, "cost_usd": usd_text(ledger["cost_usd"])},
                "provider": {**{name: provider[name] for name in names}, "cost_usd": usd_text(provider["cost_usd"])},
                "difference": difference,
            }
        )
    return result


def grid_hours(records: Iterable[ProviderRecord]) -> bool:
    """The grid of only_ledger buckets: hours when every record of the scope is an hour long or shorter, else
    UTC days (also when there are no records)."""
    widths = [(record.bucket_end - record.bucket_start).total_seconds() for record in records]
    return bool(widths) and max(widths) <= 3600


# Margin ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MarginRow:
    channel_id: int | None
    model: str | None
    charged_quota: int
    charged_usd: Decimal
    provider_cost_usd: Decimal | None
    cost_estimated: bool
    margin_usd: Decimal | None


def quota_usd(quota: int, quota_per_usd: int) -> Decimal:
    return usd(Decimal(quota) / Decimal(quota_per_usd))


def margin_row(
    *,
    channel_id: int | None,
    model: str | None,
    usage: LedgerUsage,
    recorded_cost: Decimal | None,
    price: Price | None,
    quota_per_usd: int,
) -> MarginRow:
    """Charged USD = quota / quota_per_usd; the provider's cost from its cost records when any exist, else the
    ledger's usage at provider_prices (estimated), else unknown (null, estimated, no margin)."""
    charged = quota_usd(usage.quota, quota_per_usd)
    if recorded_cost is not None:
        cost: Decimal | None = usd(recorded_cost)
        estimated = False
    else:
        cost = usage.estimated_cost(price)
        estimated = True
    return MarginRow(
        channel_id=channel_id,
        model=model,
        charged_quota=usage.quota,
        charged_usd=charged,
        provider_cost_usd=cost,
        cost_estimated=estimated,
        margin_usd=None if cost is None else charged - cost,
    )
