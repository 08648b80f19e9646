"""GET /v1/reports/margin: charges against provider costs per channel and model, and the tie-out of its charged
quota with the usage report and the channel accounts. Real PostgreSQL, no mocks."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from ledger_service.services.ledger import LedgerService
from tests.external_support import charge_entry, consume, insert_upload, map_channel, record, reverse, set_price
from tests.support import LedgerClient

PATH = "/v1/reports/margin"


def _z(instant: datetime) -> str:
    return instant.isoformat().replace("+00:00", "Z")


async def traffic(ledger: LedgerClient, service: LedgerService) -> tuple[str, datetime, datetime]:
    """Charges this month on three channels, with a reversal and a late settlement; cost records for channel 1.
    The month (YYYY-MM) and its bounds."""
    now: datetime = await ledger.conn.fetchval("SELECT now()")
    start = datetime(now.year, now.month, 1, tzinfo=UTC)
    end = datetime(now.year + now.month // 12, now.month % 12 + 1, 1, tzinfo=UTC)
    await ledger.fund(1, 10**12)
    await ledger.token(1, 1)
    await consume(ledger, 1, "gpt-4o", 1000, 500)
    await consume(ledger, 1, "gpt-4o", 2000, 100)
    await consume(ledger, 2, "gpt-4o-mini", 10_000, 5000)
    await reverse(ledger, (await consume(ledger, 2, "gpt-4o-mini", 7000, 7000))["id"])
    # a late settlement: the hold expired, then the settlement came and is charged as a consumption
    assert (await ledger.hold(request_id="late-1", model="gpt-4o-mini", max_tokens=10)).status_code == 201
    await ledger.backdate("late-1")
    assert await service.lifecycle.expire_due_holds() == 1
    late = await ledger.post(
        "/v1/holds/late-1/settle", {"channel_id": 2, "prompt_tokens": 300, "completion_tokens": 30}
    )
    assert (late.status_code, late.json()["late"]) == (200, True), late.text
    assert (await charge_entry(ledger, "late-1"))["details"]["late"] is True
    hold = await ledger.hold(request_id="s-1", model="deepseek-chat", max_tokens=10)
    assert hold.status_code == 201
    settle = await ledger.post("/v1/holds/s-1/settle", {"channel_id": 3, "prompt_tokens": 400, "completion_tokens": 40})
    assert settle.status_code == 200
    # channel 1's provider costs this month: two line items of project p1 (and one of last month, not counted)
    await map_channel(ledger.conn, "openai_costs", "p1", 1)
    day = datetime(now.year, now.month, now.day, tzinfo=UTC)
    before = start - timedelta(days=1)
    await insert_upload(
        ledger.conn,
        "openai_costs",
        [
            record(day, day + timedelta(days=1), "gpt-4o", project_id="p1", cost_usd=Decimal("0.0125"), line_item="in"),
            record(day, day + timedelta(days=1), "gpt-4o", project_id="p1", cost_usd=Decimal("0.006"), line_item="out"),
            record(before, start, "gpt-4o", project_id="p1", cost_usd=Decimal("99"), line_item="in"),
            # a cost no channel is mapped to: a row of its own, with channel null
            record(day, day + timedelta(days=1), "gpt-4o", project_id="p-unknown", cost_usd=Decimal("0.5")),
        ],
    )
    # channel 2's model has provider prices (estimated); channel 3's has none (unknown)
    await set_price(ledger.conn, "gpt-4o-mini", "0.15", "0.6")
    return f"{now.year:04d}-{now.month:02d}", start, end


async def test_margin_rows_and_the_tie_out(ledger: LedgerClient, service: LedgerService) -> None:
    month, start, end = await traffic(ledger, service)
    response = await ledger.get(f"{PATH}?month={month}", as_="auditor")
    assert response.status_code == 200, response.text
    report = response.json()
    assert (report["month"], report["quota_per_usd"]) == (month, 500_000)
    rows = {(row["channel_id"], row["model"]): row for row in report["rows"]}
    assert list(rows) == [(1, "gpt-4o"), (2, "gpt-4o-mini"), (3, "deepseek-chat"), (None, "gpt-4o")]

    usage = (
        await ledger.get(f"/v1/reports/usage?group_by=channel&bucket=none&from={_z(start)}&to={_z(end)}", as_="auditor")
    ).json()
    by_channel = {int(row["key"]): row["quota"] for row in usage["rows"]}
    for (channel, _), row in rows.items():
        if channel is not None:
            assert row["charged_quota"] == by_channel[channel]
            assert Decimal(row["charged_usd"]) == (Decimal(row["charged_quota"]) / 500_000).quantize(
                Decimal("0.000001")
            )

    # The tie-out: rows == the usage report == the month's movement of the channel accounts
    total = sum(row["charged_quota"] for row in report["rows"])
    assert total == sum(by_channel.values()) == report["totals"]["charged_quota"]
    now: datetime = await ledger.conn.fetchval("SELECT now()")
    movement = 0
    for channel in (1, 2, 3):
        closing = (await ledger.get(f"/v1/accounts/channel:{channel}?as_of={_z(now)}", as_="auditor")).json()
        opening = (await ledger.get(f"/v1/accounts/channel:{channel}?as_of={_z(start)}", as_="auditor")).json()
        movement += closing["balances"]["quota"] - opening["balances"]["quota"]
    assert movement == total
    trial = (await ledger.get("/v1/reports/trial-balance", as_="auditor")).json()
    assert trial["ledgers"]["quota"]["by_kind"]["channel"] == total

    # The reversal and the late settlement are in channel 2's figure
    reversed_entries = await ledger.count("SELECT count(*) FROM entries WHERE kind = 'reversal' AND channel_id = 2")
    assert reversed_entries == 1
    charged_2 = await ledger.count("SELECT sum(charged) FROM entries WHERE channel_id = 2 AND charged IS NOT NULL")
    assert rows[(2, "gpt-4o-mini")]["charged_quota"] == charged_2

    one = rows[(1, "gpt-4o")]
    assert (one["provider_cost_usd"], one["cost_estimated"]) == ("0.018500", False)
    assert Decimal(one["margin_usd"]) == Decimal(one["charged_usd"]) - Decimal("0.0185")
    two = rows[(2, "gpt-4o-mini")]
    # 10,300 input and 5,030 output tokens, net of the reversal, at 0.15 and 0.6 USD per million
    expected = (Decimal(10_300) * Decimal("0.15") + Decimal(5030) * Decimal("0.6")) / 1_000_000
    assert (Decimal(two["provider_cost_usd"]), two["cost_estimated"]) == (expected.quantize(Decimal("0.000001")), True)
    three = rows[(3, "deepseek-chat")]
    assert (three["provider_cost_usd"], three["cost_estimated"], three["margin_usd"]) == (None, True, None)
    unmapped = rows[(None, "gpt-4o")]
    assert (unmapped["charged_quota"], unmapped["provider_cost_usd"], unmapped["margin_usd"]) == (
        0,
        "0.500000",
        "-0.500000",
    )
    totals = report["totals"]
    assert totals["rows_without_cost"] == 1
    assert Decimal(totals["provider_cost_usd"]) == Decimal("0.0185") + Decimal(two["provider_cost_usd"]) + Decimal(
        "0.5"
    )

    # CSV: the same rows
    response = await ledger.client.get(
        f"{PATH}?month={month}", headers={**ledger.headers("auditor"), "Accept": "text/csv"}
    )
    assert response.headers["content-type"].startswith("text/csv")
    lines = list(csv.DictReader(io.StringIO(response.text)))
    assert [(line["channel_id"], line["model"], line["charged_quota"]) for line in lines] == [
        (str(c or ""), m, str(row["charged_quota"])) for (c, m), row in rows.items()
    ]
    assert lines[-1]["margin_usd"] == "-0.500000"  # a negative amount stays a number
    assert lines[2]["provider_cost_usd"] == ""


async def test_an_empty_month(ledger: LedgerClient) -> None:
    report = (await ledger.get(f"{PATH}?month=2001-02", as_="admin")).json()
    assert report["rows"] == []
    assert report["totals"] == {
        "charged_quota": 0,
        "charged_usd": "0.000000",
        "provider_cost_usd": "0.000000",
        "margin_usd": "0.000000",
        "rows_without_cost": 0,
    }


@pytest.mark.parametrize(
    "query", ["", "?month=2026-13", "?month=2026-1", "?month=december", "?month=0000-01", "?month=9999-12", "?x=1"]
)
async def test_bad_months_are_refused(ledger: LedgerClient, query: str) -> None:
    response = await ledger.get(PATH + query, as_="auditor")
    assert (response.status_code, response.json()["code"]) == (400, "validation_error")


async def test_roles(ledger: LedgerClient) -> None:
    assert (await ledger.get(f"{PATH}?month=2026-01", as_="relay")).status_code == 403
    assert (await ledger.get(f"{PATH}?month=2026-01", as_=None)).status_code == 401
    assert (await ledger.get(f"{PATH}?month=2026-01", as_="auditor")).status_code == 200


def test_month_bounds() -> None:
    from ledger_service.services.margin import month_bounds

    cases: list[tuple[str, Any]] = [
        ("2026-12", (datetime(2026, 12, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC))),
        ("2026-01", (datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 2, 1, tzinfo=UTC))),
    ]
    for month, bounds in cases:
        assert month_bounds(month) == bounds
