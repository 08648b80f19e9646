"""domain/external_matching.py: channel resolution, record selection, classification, items, drift and margin
rows, one table row per rule and result, no database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest

from ledger_service.domain.external_matching import (
    Key,
    LedgerUsage,
    Price,
    ProviderRecord,
    ProviderUsage,
    Scope,
    Tolerance,
    compare,
    counts,
    drift,
    fingerprint,
    grid_hours,
    latest_records,
    margin_row,
    plan_items,
    provider_usage,
    resolve_channel,
)

DAY = datetime(2026, 11, 5, tzinfo=UTC)
NEXT = DAY + timedelta(days=1)


def rec(line: int = 1, upload: int = 1, **fields: Any) -> ProviderRecord:
    values: dict[str, Any] = {
        "source": "openai_usage",
        "bucket_start": DAY,
        "bucket_end": NEXT,
        "model": "gpt-4o",
        "input_tokens": 100,
        "output_tokens": 50,
        "requests": 2,
    }
    values.update(fields)
    return ProviderRecord(upload_id=upload, line=line, **values)


MAP = {("openai_usage", "key-a"): 1, ("openai_usage", "proj-p"): 2, ("openai_costs", "key-a"): 9}


@pytest.mark.parametrize(
    ("record", "channel", "reason"),
    [
        (rec(channel_id=5, api_key_id="key-a"), 5, None),  # a CSV record's own channel wins
        (rec(api_key_id="key-a", project_id="proj-p"), 1, None),  # api key before project
        (rec(api_key_id="key-x", project_id="proj-p"), 2, None),  # then project
        (rec(source="openai_costs", api_key_id="key-a"), 9, None),  # the map is per source
        (rec(api_key_id="key-x", upload_channel_id=7), 7, None),  # then the upload's channel
        (rec(api_key_id="key-x"), None, "no channel for api key key-x"),
        (rec(project_id="proj-x"), None, "no channel for project proj-x"),
        (rec(), None, "no channel for a record with neither api key nor project"),
    ],
)
def test_resolve_channel(record: ProviderRecord, channel: int | None, reason: str | None) -> None:
    placed = resolve_channel(record, MAP)
    assert (placed.channel_id, placed.reason) == (channel, reason)


@pytest.mark.parametrize(
    ("records", "kept"),
    [
        ([rec(1, 1), rec(1, 2)], [(2, 1)]),  # the same record in a later upload replaces the earlier
        ([rec(1, 1, api_key_id="a"), rec(1, 2, api_key_id="b")], [(1, 1), (2, 1)]),  # different keys: both
        ([rec(1, 1), rec(1, 2, bucket_start=NEXT, bucket_end=NEXT + timedelta(days=1))], [(1, 1), (2, 1)]),
        ([rec(1, 1, line_item="input"), rec(2, 1, line_item="output")], [(1, 1), (1, 2)]),  # line items add up
        ([rec(1, 3), rec(1, 2)], [(3, 1)]),  # whatever the order they come in
    ],
)
def test_latest_records(records: list[ProviderRecord], kept: list[tuple[int, int]]) -> None:
    assert [(r.upload_id, r.line) for r in latest_records(records)] == kept


LEDGER = LedgerUsage(input_tokens=100, output_tokens=50, cached_tokens=None, requests=2, quota=900)
PROVIDER = ProviderUsage(input_tokens=100, output_tokens=50, requests=2)
EXACT = Tolerance()


@pytest.mark.parametrize(
    ("ledger", "provider", "ledger_cost", "tolerance", "klass", "difference"),
    [
        (LEDGER, PROVIDER, None, EXACT, "matched", {"input_tokens": 0, "output_tokens": 0, "requests": 0}),
        (
            LEDGER,
            ProviderUsage(input_tokens=98, output_tokens=50, requests=2),
            None,
            EXACT,
            "differs",
            {"input_tokens": 2, "output_tokens": 0, "requests": 0},
        ),
        # 2 of 98 is 2.04 %: within 2.5 %, not within 2 %
        (LEDGER, ProviderUsage(input_tokens=98), None, Tolerance(tokens_pct=Decimal("2.5")), "matched", None),
        (LEDGER, ProviderUsage(input_tokens=98), None, Tolerance(tokens_pct=Decimal(2)), "differs", None),
        (LEDGER, ProviderUsage(requests=3), None, EXACT, "differs", {"requests": -1}),
        (LEDGER, ProviderUsage(requests=3), None, Tolerance(requests=1), "matched", {"requests": -1}),
        # cached tokens: compared only when both sides know them
        (LEDGER, ProviderUsage(cached_tokens=40), None, EXACT, "matched", {}),
        (
            LedgerUsage(input_tokens=100, cached_tokens=30),
            ProviderUsage(input_tokens=100, cached_tokens=40),
            None,
            EXACT,
            "differs",
            {"input_tokens": 0, "cached_tokens": -10},
        ),
        # cost: compared only when the provider has a cost and the ledger an estimate
        (LEDGER, ProviderUsage(cost_usd=Decimal("0.5")), None, EXACT, "matched", {}),
        (LEDGER, ProviderUsage(cost_usd=Decimal("0.5")), Decimal("0.4"), EXACT, "differs", {"cost_usd": "-0.100000"}),
        (
            LEDGER,
            ProviderUsage(cost_usd=Decimal("0.5")),
            Decimal("0.4"),
            Tolerance(cost_usd=Decimal("0.1")),
            "matched",
            None,
        ),
        (
            LEDGER,
            ProviderUsage(cost_usd=Decimal("0.5")),
            Decimal("0.4"),
            Tolerance(cost_pct=Decimal(20)),
            "matched",
            None,
        ),
        (
            LEDGER,
            ProviderUsage(cost_usd=Decimal("0.5")),
            Decimal("0.4"),
            Tolerance(cost_pct=Decimal(19)),
            "differs",
            None,
        ),
        # one side only
        (None, PROVIDER, None, EXACT, "only_provider", {}),
        (LEDGER, None, None, EXACT, "only_ledger", {}),
    ],
)
def test_compare(
    ledger: LedgerUsage | None,
    provider: ProviderUsage | None,
    ledger_cost: Decimal | None,
    tolerance: Tolerance,
    klass: str,
    difference: dict[str, Any] | None,
) -> None:
    result = compare(ledger, provider, ledger_cost=ledger_cost, tolerance=tolerance)
    assert result.klass == klass
    assert bool(result.difference["reasons"]) == (klass != "matched")
    if difference is not None:
        assert {k: v for k, v in result.difference.items() if k != "reasons"} == difference


def test_compare_unresolved_channel_and_shared_key() -> None:
    unresolved = compare(None, PROVIDER, ledger_cost=None, tolerance=EXACT, channel_reason="no channel for api key k")
    assert (unresolved.klass, unresolved.difference["reasons"]) == ("only_provider", ["no channel for api key k"])
    shared = compare(LEDGER, PROVIDER, ledger_cost=None, tolerance=EXACT, shared_key=2)
    assert shared.klass == "differs"
    assert "use many_to_one" in shared.difference["reasons"][0]


@pytest.mark.parametrize(
    ("records", "expected"),
    [
        ([rec(input_tokens=1), rec(input_tokens=2)], (3, 100, None, 4, None)),
        (
            [rec(), rec(input_tokens=None, output_tokens=None, requests=None, cost_usd=Decimal("1.5"))],
            (100, 50, None, 2, Decimal("1.5")),
        ),
        ([rec(cached_tokens=5), rec(cached_tokens=None)], (200, 100, 5, 4, None)),
    ],
)
def test_provider_usage_sums_what_records_know(records: list[ProviderRecord], expected: tuple[Any, ...]) -> None:
    usage = provider_usage(records)
    assert (usage.input_tokens, usage.output_tokens, usage.cached_tokens, usage.requests, usage.cost_usd) == expected


PRICE = Price(
    input_usd_per_mtok=Decimal("2.5"), output_usd_per_mtok=Decimal(10), cached_input_usd_per_mtok=Decimal("1.25")
)


@pytest.mark.parametrize(
    ("price", "usage", "cost"),
    [
        (PRICE, LedgerUsage(input_tokens=1_000_000, output_tokens=0, cached_tokens=0), Decimal("2.5")),
        (PRICE, LedgerUsage(input_tokens=1_000_000, cached_tokens=400_000), Decimal("2.0")),  # 0.6x2.5 + 0.4x1.25
        (PRICE, LedgerUsage(input_tokens=1_000_000, cached_tokens=None), Decimal("2.5")),  # unknown: uncached
        (PRICE, LedgerUsage(output_tokens=3), Decimal("0.00003")),
        (
            Price(Decimal(1), Decimal(1), None, Decimal("0.04")),
            LedgerUsage(cached_tokens=7, input_tokens=7, requests=3),
            Decimal("0.120007"),
        ),
        (None, LedgerUsage(input_tokens=1), None),
    ],
)
def test_estimated_cost(price: Price | None, usage: LedgerUsage, cost: Decimal | None) -> None:
    assert usage.estimated_cost(price) == cost


def test_fingerprint_normalises_its_input() -> None:
    one, params = fingerprint(
        upload_id=None,
        upload_sha256=None,
        since=DAY,
        until=NEXT,
        strategy="many_to_one",
        tolerance=Tolerance(tokens_pct=Decimal("1.0")),
    )
    plus_one = datetime(2026, 11, 5, 1, tzinfo=timezone(timedelta(hours=1)))  # 00:00 UTC
    same, _ = fingerprint(
        upload_id=None,
        upload_sha256=None,
        since=plus_one,
        until=NEXT,
        strategy="many_to_one",
        tolerance=Tolerance(tokens_pct=Decimal("1")),
    )
    other, _ = fingerprint(
        upload_id=None, upload_sha256=None, since=DAY, until=NEXT, strategy="one_to_one", tolerance=Tolerance()
    )
    assert one == same
    assert one != other
    assert params["since"] == "2026-11-05T00:00:00Z"
    assert params["tolerance"]["tokens_pct"] == "1"


def _scope(**fields: Any) -> Scope:
    return Scope(**{"placed": [], "covered": {}, "uncovered": {}, **fields})


KEY = Key(1, "gpt-4o", DAY, NEXT)


@pytest.mark.parametrize(
    ("strategy", "records", "covered", "classes"),
    [
        # many_to_one: two api keys of one channel are summed, then compared
        (
            "many_to_one",
            [
                rec(1, api_key_id="a", input_tokens=60, output_tokens=20, requests=1),
                rec(2, api_key_id="b", input_tokens=40, output_tokens=30, requests=1),
            ],
            {KEY: LEDGER},
            ["matched"],
        ),
        # one_to_one: the same records, each against the whole key: both differ, telling to use many_to_one
        (
            "one_to_one",
            [
                rec(1, api_key_id="a", input_tokens=60, output_tokens=20, requests=1),
                rec(2, api_key_id="b", input_tokens=40, output_tokens=30, requests=1),
            ],
            {KEY: LEDGER},
            ["differs", "differs"],
        ),
        ("one_to_one", [rec(1, api_key_id="a")], {KEY: LEDGER}, ["matched"]),
        ("many_to_one", [rec(1, api_key_id="a")], {}, ["only_provider"]),
        ("many_to_one", [rec(1, api_key_id="unmapped")], {}, ["only_provider"]),
    ],
)
def test_plan_items(
    strategy: str, records: list[ProviderRecord], covered: dict[Key, LedgerUsage], classes: list[str]
) -> None:
    placed = [resolve_channel(r, {("openai_usage", "a"): 1, ("openai_usage", "b"): 1}) for r in records]
    items = plan_items(_scope(placed=placed, covered=covered), strategy=strategy, tolerance=EXACT)
    assert [item.klass for item in items] == classes
    assert [item.id for item in items] == list(range(1, len(items) + 1))


def test_plan_items_only_ledger_drift_and_order() -> None:
    later = Key(1, "gpt-4o", NEXT, NEXT + timedelta(days=1))
    scope = _scope(
        placed=[resolve_channel(rec(1, channel_id=1, input_tokens=90), {})],
        covered={KEY: LEDGER},
        uncovered={later: LedgerUsage(input_tokens=5, output_tokens=5, cached_tokens=None, requests=1, quota=10)},
        prices={"gpt-4o": PRICE},
    )
    items = plan_items(scope, strategy="many_to_one", tolerance=EXACT)
    assert [(item.id, item.klass, item.key.bucket_start) for item in items] == [
        (1, "differs", DAY),
        (2, "only_ledger", NEXT),
    ]
    assert counts(items) == {"matched": 0, "differs": 1, "only_provider": 0, "only_ledger": 1}
    (channel,) = drift(items)
    assert channel["channel_id"] == 1
    assert channel["ledger"]["input_tokens"] == 105
    assert channel["provider"]["input_tokens"] == 90
    assert channel["difference"] == {"input_tokens": 15, "output_tokens": 5, "requests": 1, "cost_usd": "0.000812"}


@pytest.mark.parametrize(
    ("widths", "hours"),
    [([3600], True), ([3600, 1800], True), ([3600, 86400], False), ([], False)],
)
def test_grid(widths: list[int], hours: bool) -> None:
    records = [rec(bucket_end=DAY + timedelta(seconds=w)) for w in widths]
    assert grid_hours(records) is hours


@pytest.mark.parametrize(
    ("usage", "recorded", "price", "expected"),
    [
        # a cost record: not estimated
        (
            LedgerUsage(quota=1_000_000),
            Decimal("1.25"),
            PRICE,
            (Decimal("2.000000"), Decimal("1.250000"), False, Decimal("0.750000")),
        ),
        # no cost record: usage at provider prices, estimated
        (
            LedgerUsage(quota=500_000, input_tokens=1_000_000),
            None,
            PRICE,
            (Decimal("1.000000"), Decimal("2.500000"), True, Decimal("-1.500000")),
        ),
        # neither: unknown cost, no margin
        (LedgerUsage(quota=1), None, None, (Decimal("0.000002"), None, True, None)),
        (LedgerUsage(quota=3), None, None, (Decimal("0.000006"), None, True, None)),
    ],
)
def test_margin_row(
    usage: LedgerUsage, recorded: Decimal | None, price: Price | None, expected: tuple[Any, ...]
) -> None:
    row = margin_row(
        channel_id=1, model="gpt-4o", usage=usage, recorded_cost=recorded, price=price, quota_per_usd=500_000
    )
    assert (row.charged_usd, row.provider_cost_usd, row.cost_estimated, row.margin_usd) == expected


@pytest.mark.parametrize(
    ("quota", "per_usd", "usd"),
    [(1, 2_000_000, Decimal("0.000000")), (3, 2_000_000, Decimal("0.000002")), (5, 2_000_000, Decimal("0.000002"))],
)
def test_quota_usd_rounds_half_to_even(quota: int, per_usd: int, usd: Decimal) -> None:
    row = margin_row(
        channel_id=1, model="m", usage=LedgerUsage(quota=quota), recorded_cost=None, price=None, quota_per_usd=per_usd
    )
    assert row.charged_usd == usd
