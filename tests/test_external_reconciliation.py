"""External reconciliation runs over HTTP and through the service: planted differences of each kind, idempotency,
resumption after an interrupted run, explanations (append-only), CSV, roles. Real PostgreSQL, no mocks."""

from __future__ import annotations

import asyncio
import csv
import io
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger_service.db.engine import create_engine
from ledger_service.schemas import ReconciliationCommand, ToleranceBody
from ledger_service.services.api_keys import Principal
from ledger_service.services.external_reconciliation import ExternalReconciliationService
from ledger_service.settings import Settings
from tests.external_support import consume, insert_upload, map_channel, record, reverse, set_price
from tests.support import LedgerClient, unique

PATH = "/v1/external/reconciliations"


async def today(ledger: LedgerClient) -> datetime:
    value: datetime = await ledger.conn.fetchval("SELECT date_trunc('day', now(), 'UTC')")
    return value


async def plant(ledger: LedgerClient) -> tuple[int, datetime]:
    """Ledger traffic today and one provider upload, with exactly one difference of each kind (the comments say
    which item each makes); the upload's id and today's UTC midnight."""
    day = await today(ledger)
    end, yesterday = day + timedelta(days=1), day - timedelta(days=1)
    await ledger.fund(1, 10**12)
    await ledger.token(1, 1)
    # channel 1, gpt-4o: a hold settled and a consumption; two api keys of one project, both mapped to channel 1
    hold = await ledger.hold(request_id="h1", max_tokens=100)
    assert hold.status_code == 201, hold.text
    settled = await ledger.post("/v1/holds/h1/settle", {"channel_id": 1, "prompt_tokens": 100, "completion_tokens": 50})
    assert settled.status_code == 200, settled.text
    await consume(ledger, 1, "gpt-4o", 200, 100)
    # channel 2, gpt-4o-mini: three consumptions, one reversed: 2 requests, 2000 / 1000 tokens
    await consume(ledger, 2, "gpt-4o-mini", 1000, 500)
    await consume(ledger, 2, "gpt-4o-mini", 1000, 500)
    await reverse(ledger, (await consume(ledger, 2, "gpt-4o-mini", 1000, 500))["id"])
    await consume(ledger, 3, "gpt-4o", 100, 50)  # channel 3: one request
    await consume(ledger, 4, "deepseek-chat", 1000, 500)  # channel 4: costs 0.002 USD at provider prices
    await consume(ledger, 5, "gpt-4o", 1000, 1000)  # channel 5
    await consume(ledger, 6, "gpt-4o", 10, 10)  # channel 6: the provider has no record of it
    await set_price(ledger.conn, "deepseek-chat", "1", "2")
    for key in ("key-1a", "key-1b"):
        await map_channel(ledger.conn, "openai_usage", key, 1)
    await map_channel(ledger.conn, "openai_usage", "proj-2", 2)
    await map_channel(ledger.conn, "openai_usage", "key-3", 3)
    await map_channel(ledger.conn, "openai_usage", "key-5", 5)
    usage = await insert_upload(
        ledger.conn,
        "openai_usage",
        [
            # matched: two keys summed against channel 1's usage (many_to_one)
            record(day, end, "gpt-4o", api_key_id="key-1a", input_tokens=120, output_tokens=60, requests=1),
            record(day, end, "gpt-4o", api_key_id="key-1b", input_tokens=180, output_tokens=90, requests=1),
            # differs: input tokens 5 % under the ledger's (tolerance 1 %), through the project's map entry
            record(day, end, "gpt-4o-mini", project_id="proj-2", input_tokens=1900, output_tokens=1000, requests=2),
            # differs: requests (2 against 1)
            record(day, end, "gpt-4o", api_key_id="key-3", input_tokens=100, output_tokens=50, requests=2),
            # matched: 0.5 % apart, within the 1 % tolerance
            record(day, end, "gpt-4o", api_key_id="key-5", input_tokens=1005, output_tokens=1000, requests=1),
            # only_provider: a day with no ledger usage
            record(yesterday, day, "gpt-4o", api_key_id="key-1a", input_tokens=10, output_tokens=10, requests=1),
            # only_provider: an api key no channel is mapped to
            record(day, end, "gpt-4o", api_key_id="key-unknown", input_tokens=10, output_tokens=10, requests=1),
        ],
    )
    return usage, day


async def plant_cost(ledger: LedgerClient, day: datetime) -> int:
    # differs: cost (a CSV record names its channel; 1.00 USD against the 0.002 USD estimate)
    rows = [
        record(day, day + timedelta(days=1), "deepseek-chat", channel_id=4, input_tokens=1000, output_tokens=500,
               requests=1, cost_usd="1.00")
    ]  # fmt: skip
    for row in rows:
        row["cost_usd"] = Decimal(row["cost_usd"])
    return await insert_upload(ledger.conn, "csv", rows)


def summary(items: list[dict[str, Any]]) -> set[tuple[Any, ...]]:
    return {(i["class"], i["channel_id"], i["model"], i["bucket_start"][:10]) for i in items}


TOLERANCE = {"tokens_pct": 1, "requests": 0, "cost_pct": "1"}


async def test_a_run_finds_exactly_the_planted_differences(ledger: LedgerClient) -> None:
    upload, day = await plant(ledger)
    d, y = day.date().isoformat(), (day - timedelta(days=1)).date().isoformat()
    response = await ledger.post(
        PATH, {"upload_id": upload, "strategy": "many_to_one", "tolerance": TOLERANCE}, as_="admin"
    )
    assert response.status_code == 201, response.text
    run = response.json()
    assert run["status"] == "completed"
    assert summary(run["items"]) == {
        ("matched", 1, "gpt-4o", d),
        ("differs", 2, "gpt-4o-mini", d),
        ("differs", 3, "gpt-4o", d),
        ("matched", 5, "gpt-4o", d),
        ("only_provider", 1, "gpt-4o", y),
        ("only_provider", None, "gpt-4o", d),
        # channel 4's usage has no record in this (usage) upload, and channel 6's none at all
        ("only_ledger", 4, "deepseek-chat", d),
        ("only_ledger", 6, "gpt-4o", d),
    }
    assert (run["matched"], run["differs"], run["only_provider"], run["only_ledger"]) == (2, 2, 2, 2)
    by_channel = {(i["channel_id"], i["bucket_start"][:10]): i for i in run["items"]}
    channel_1 = by_channel[(1, d)]
    assert channel_1["ledger"]["input_tokens"] == channel_1["provider"]["input_tokens"] == 300
    assert channel_1["provider"]["api_key_ids"] == ["key-1a", "key-1b"]
    channel_2 = by_channel[(2, d)]
    assert (channel_2["ledger"]["requests"], channel_2["ledger"]["input_tokens"]) == (2, 2000)  # net of the reversal
    assert channel_2["difference"]["input_tokens"] == 100
    assert channel_2["difference"]["reasons"] == ["input_tokens differ by 100 (tolerance 1%)"]
    assert by_channel[(3, d)]["difference"]["requests"] == -1
    assert by_channel[(None, d)]["difference"]["reasons"] == ["no channel for api key key-unknown"]
    assert run["items"][0]["bucket_start"] == f"{y}T00:00:00Z"  # items in bucket order
    drift = {row["channel_id"]: row for row in run["drift"]}
    assert drift[2]["difference"]["input_tokens"] == 100
    assert drift[6]["ledger"]["requests"] == 1
    assert drift[6]["provider"]["requests"] == 0

    # The cost upload: channel 4's record has a cost, compared with the usage at provider prices
    cost_upload = await plant_cost(ledger, day)
    response = await ledger.post(PATH, {"upload_id": cost_upload, "tolerance": TOLERANCE}, as_="admin")
    assert response.status_code == 201, response.text
    items = {(i["class"], i["channel_id"]): i for i in response.json()["items"]}
    cost = items[("differs", 4)]
    assert cost["ledger"]["estimated_cost_usd"] == "0.002000"
    assert cost["provider"]["cost_usd"] == "1.00"
    assert cost["difference"]["cost_usd"] == "-0.998000"
    assert [reason.split(" by ")[0] for reason in cost["difference"]["reasons"]] == ["estimated cost differs"]
    assert {key[0] for key in items if key != ("differs", 4)} == {"only_ledger"}  # the rest of today's usage


async def test_one_to_one_and_the_window_scope(ledger: LedgerClient) -> None:
    upload, day = await plant(ledger)
    response = await ledger.post(
        PATH, {"upload_id": upload, "strategy": "one_to_one", "tolerance": TOLERANCE}, as_="admin"
    )
    run = response.json()
    channel_1 = [i for i in run["items"] if i["channel_id"] == 1 and i["class"] == "differs"]
    assert len(channel_1) == 2  # each of the two keys against the whole channel
    assert all("use many_to_one" in i["difference"]["reasons"][-1] for i in channel_1)

    # A window: the same record downloaded again later replaces the earlier (channel 2 now matches)
    again = await insert_upload(
        ledger.conn,
        "openai_usage",
        [record(day, day + timedelta(days=1), "gpt-4o-mini", project_id="proj-2", input_tokens=2000,
                output_tokens=1000, requests=2)],
    )  # fmt: skip
    assert again > upload
    window = {"since": (day - timedelta(days=1)).isoformat(), "until": (day + timedelta(days=1)).isoformat()}
    response = await ledger.post(PATH, {**window, "strategy": "many_to_one", "tolerance": TOLERANCE}, as_="admin")
    assert response.status_code == 201, response.text
    classes = {(i["class"], i["channel_id"]) for i in response.json()["items"]}
    assert ("matched", 2) in classes
    assert ("differs", 2) not in classes


async def test_the_same_input_is_the_same_run(ledger: LedgerClient) -> None:
    upload, _ = await plant(ledger)
    body = {"upload_id": upload, "strategy": "many_to_one", "tolerance": {"tokens_pct": "1.0", "cost_pct": 1}}
    first = await ledger.post(PATH, body, as_="admin")
    assert first.status_code == 201, first.text
    # the same input, written differently (defaults, 1.0 for 1): 200 with the same run, nothing recomputed
    await consume(ledger, 6, "gpt-4o", 10, 10)
    same = await ledger.post(
        PATH, {"upload_id": upload, "tolerance": {"tokens_pct": 1, "cost_pct": "1", "requests": 0}}, as_="admin"
    )
    assert (same.status_code, same.json()["id"]) == (200, first.json()["id"])
    assert same.json()["items"] == first.json()["items"]
    other = await ledger.post(PATH, {"upload_id": upload, "tolerance": {"tokens_pct": 10}}, as_="admin")
    assert other.status_code == 201
    assert other.json()["id"] != first.json()["id"]
    listed = (await ledger.get(PATH, as_="auditor")).json()
    assert [run["id"] for run in listed["items"]] == [other.json()["id"], first.json()["id"]]
    page = (await ledger.get(f"{PATH}?limit=1", as_="auditor")).json()
    assert [run["id"] for run in page["items"]] == [other.json()["id"]]
    rest = (await ledger.get(f"{PATH}?limit=1&cursor={page['next_cursor']}", as_="auditor")).json()
    assert [run["id"] for run in rest["items"]] == [first.json()["id"]]


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"upload_id": 1, "since": "2026-01-01T00:00:00Z", "until": "2026-01-02T00:00:00Z"},
        {"since": "2026-01-01T00:00:00Z"},
        {"since": "2026-01-02T00:00:00Z", "until": "2026-01-01T00:00:00Z"},
        {"since": "2026-01-01T00:00:00", "until": "2026-01-02T00:00:00"},
        {"upload_id": 1, "strategy": "all"},
        {"upload_id": 1, "tolerance": {"tokens_pct": -1}},
        {"upload_id": 1, "tolerance": {"bogus": 1}},
        {"upload_id": 1, "tolerance": {"cost_usd": "1e-999999999"}},
        {"upload_id": 1, "tolerance": {"cost_pct": "NaN"}},
        {"upload_id": 1, "tolerance": {"tokens_pct": "1e12"}},
        {"upload_id": 0},
        {"since": "9999-12-31T23:00:00-05:00", "until": "9999-12-31T23:30:00-05:00"},
    ],
)
async def test_bad_input_is_refused(ledger: LedgerClient, body: dict[str, Any]) -> None:
    response = await ledger.post(PATH, body, as_="admin")
    assert (response.status_code, response.json()["code"]) == (400, "validation_error"), response.text
    assert await ledger.count("SELECT count(*) FROM external_reconciliations") == 0


async def test_unknown_upload_run_and_item(ledger: LedgerClient) -> None:
    response = await ledger.post(PATH, {"upload_id": 99}, as_="admin")
    assert (response.status_code, response.json()["code"]) == (404, "upload_not_found")
    response = await ledger.get(f"{PATH}/99", as_="auditor")
    assert (response.status_code, response.json()["code"]) == (404, "reconciliation_not_found")
    upload, _ = await plant(ledger)
    run = (await ledger.post(PATH, {"upload_id": upload}, as_="admin")).json()
    response = await ledger.post(f"{PATH}/{run['id']}/items/999/explain", {"note": "x"}, as_="auditor")
    assert (response.status_code, response.json()["code"]) == (404, "item_not_found")


# Resumption ------------------------------------------------------------------------------------------------------


class Crash(BaseException):
    """The process dying mid-run: not an error the run could record."""


@pytest.fixture
async def engine(settings: Settings) -> Any:
    engine = create_engine(settings.database_url or "", pool_size=5)
    try:
        yield engine
    finally:
        await engine.dispose()


AUTHOR = Principal(key_id=1, name="bootstrap admin", role="admin")


async def test_an_interrupted_run_continues_from_its_cursor(
    ledger: LedgerClient, engine: AsyncEngine, settings: Settings
) -> None:
    upload, _ = await plant(ledger)
    command = ReconciliationCommand(upload_id=upload, tolerance=ToleranceBody(tokens_pct=Decimal(1)))

    async def die_after_first_chunk(written: int) -> None:
        raise Crash

    crashing = ExternalReconciliationService(engine, settings, chunk_size=1, after_chunk=die_after_first_chunk)
    with pytest.raises(Crash):
        await crashing.start(command, AUTHOR)
    row = await ledger.conn.fetchrow("SELECT id, status, progress FROM external_reconciliations")
    assert row is not None
    run_id, status, progress = row["id"], row["status"], row["progress"]
    assert status == "running"
    assert await ledger.count("SELECT count(*) FROM external_reconciliation_items") == 1
    first_item = await ledger.conn.fetchrow("SELECT * FROM external_reconciliation_items WHERE id = 1")

    # Ledger traffic after the run started is not in it, even when it is continued later
    await consume(ledger, 6, "gpt-4o", 10, 10)

    # A POST while its heartbeat is fresh finds it running and leaves it to its process
    body = {"upload_id": upload, "tolerance": {"tokens_pct": 1}}
    response = await ledger.post(PATH, body, as_="admin")
    assert (response.status_code, response.json()["status"]) == (200, "running")
    assert await ledger.count("SELECT count(*) FROM external_reconciliation_items") == 1

    # Its heartbeat goes stale (the process is gone): the same input takes it over and continues
    await ledger.conn.execute("UPDATE external_reconciliations SET heartbeat_at = now() - interval '2 minutes'")
    response = await ledger.post(PATH, body, as_="admin")
    assert response.status_code == 200, response.text
    resumed = response.json()
    assert (resumed["id"], resumed["status"]) == (run_id, "completed")
    assert await ledger.conn.fetchrow("SELECT * FROM external_reconciliation_items WHERE id = 1") == first_item

    # The same items as a run never interrupted (a new input: other tolerance, same effect), no duplicates
    fresh = await ledger.post(
        PATH, {**body, "tolerance": {"tokens_pct": "1", "requests": 0, "cost_usd": "0"}}, as_="admin"
    )
    assert fresh.json()["id"] == run_id  # normalised: that is the same input
    whole = (await ledger.get(f"{PATH}/{run_id}?limit=1000", as_="auditor")).json()
    assert [i["id"] for i in whole["items"]] == list(range(1, 9))
    assert (whole["matched"], whole["differs"], whole["only_provider"], whole["only_ledger"]) == (2, 2, 2, 2)
    channel_6 = next(i for i in whole["items"] if i["channel_id"] == 6)
    assert channel_6["ledger"]["requests"] == 1  # as of the run's start
    assert progress is not None


async def test_a_failed_run_records_its_error_and_is_retried(
    ledger: LedgerClient, engine: AsyncEngine, settings: Settings
) -> None:
    upload, _ = await plant(ledger)

    async def fail_on_third(written: int) -> None:
        if written == 3:
            raise RuntimeError("disk full")

    failing = ExternalReconciliationService(engine, settings, chunk_size=1, after_chunk=fail_on_third)
    view, created = await failing.start(ReconciliationCommand(upload_id=upload), AUTHOR)
    assert (created, view.status, view.error) == (True, "failed", "RuntimeError: disk full")
    assert await ledger.count("SELECT count(*) FROM external_reconciliation_items") == 3
    response = await ledger.post(PATH, {"upload_id": upload}, as_="admin")
    assert (response.status_code, response.json()["status"], response.json()["error"]) == (200, "completed", None)
    assert await ledger.count("SELECT count(*) FROM external_reconciliation_items") == 8


# Explanations, paging, CSV, roles ----------------------------------------------------------------------------------


async def test_explanations_are_kept_and_never_changed(ledger: LedgerClient, raw: asyncpg.Connection[Any]) -> None:
    upload, _ = await plant(ledger)
    run = (await ledger.post(PATH, {"upload_id": upload, "tolerance": TOLERANCE}, as_="admin")).json()
    item = next(i for i in run["items"] if i["class"] == "differs")
    url = f"{PATH}/{run['id']}/items/{item['id']}/explain"
    first = await ledger.post(url, {"note": "provider counts cached tokens twice"}, as_="auditor")
    assert first.status_code == 201, first.text
    assert (first.json()["author"], first.json()["note"]) == ("test auditor", "provider counts cached tokens twice")
    second = await ledger.post(url, {"note": "confirmed with the provider"}, as_="admin")
    assert second.status_code == 201
    for bad in ({"note": ""}, {"note": "   "}, {"note": "x" * 2001}, {}, {"note": "a", "extra": 1}):
        response = await ledger.post(url, bad, as_="auditor")
        assert (response.status_code, response.json()["code"]) == (400, "validation_error")
    view = (await ledger.get(f"{PATH}/{run['id']}?class=differs", as_="auditor")).json()
    explained = next(i for i in view["items"] if i["id"] == item["id"])
    notes = explained["explanations"]
    assert [(e["note"], e["author"]) for e in notes] == [
        ("provider counts cached tokens twice", "test auditor"),
        ("confirmed with the provider", notes[1]["author"]),
    ]
    assert notes[1]["author"]
    assert notes[0]["author_key_id"] != notes[1]["author_key_id"]
    assert explained["explanations"][0]["author_key_id"] is not None
    assert explained["explanations"][0]["created_at"] <= explained["explanations"][1]["created_at"]
    assert explained["difference"] == item["difference"]
    for sql in (
        "UPDATE external_explanations SET note = 'nothing to see'",
        "DELETE FROM external_explanations",
        "UPDATE external_reconciliation_items SET class = 'matched'",
        "DELETE FROM external_reconciliation_items",
    ):
        with pytest.raises(asyncpg.PostgresError):
            await raw.execute(sql)
    assert await ledger.count("SELECT count(*) FROM external_explanations") == 2


async def test_items_by_class_in_pages_and_as_csv(ledger: LedgerClient) -> None:
    upload, day = await plant(ledger)
    run = (await ledger.post(PATH, {"upload_id": upload, "tolerance": TOLERANCE}, as_="admin")).json()
    url = f"{PATH}/{run['id']}"
    page = (await ledger.get(f"{url}?class=only_provider&limit=1", as_="auditor")).json()
    assert [i["class"] for i in page["items"]] == ["only_provider"]
    rest = (await ledger.get(f"{url}?class=only_provider&limit=1&cursor={page['next_cursor']}", as_="auditor")).json()
    assert [i["class"] for i in rest["items"]] == ["only_provider"]
    assert rest["items"][0]["id"] > page["items"][0]["id"]
    for query in ("?class=weird", "?limit=0", "?cursor=abc", "?cursor=%C2%B2", "?colour=red"):
        response = await ledger.get(url + query, as_="auditor")
        assert (response.status_code, response.json()["code"]) == (400, "validation_error"), query

    response = await ledger.client.get(
        f"{url}?class=differs", headers={**ledger.headers("auditor"), "Accept": "text/csv"}
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert [(row["class"], row["channel_id"]) for row in rows] == [("differs", "2"), ("differs", "3")]
    assert rows[0]["difference_input_tokens"] == "100"
    assert rows[0]["bucket_start"] == f"{day.date().isoformat()}T00:00:00Z"
    everything = await ledger.client.get(url, headers={**ledger.headers("auditor"), "Accept": "text/csv"})
    assert len(list(csv.DictReader(io.StringIO(everything.text)))) == 8


async def test_roles(ledger: LedgerClient) -> None:
    upload, _ = await plant(ledger)
    body = {"upload_id": upload}
    for role in ("relay", "auditor"):
        response = await ledger.post(PATH, body, as_=role)
        assert (response.status_code, response.json()["code"]) == (403, "forbidden")
    assert (await ledger.post(PATH, body, as_=None)).status_code == 401
    run = (await ledger.post(PATH, body, as_="admin")).json()
    assert (await ledger.get(PATH, as_="relay")).status_code == 403
    assert (await ledger.get(f"{PATH}/{run['id']}", as_="relay")).status_code == 403
    assert (await ledger.get(f"{PATH}/{run['id']}", as_="auditor")).status_code == 200
    explain = f"{PATH}/{run['id']}/items/1/explain"
    assert (await ledger.post(explain, {"note": unique("n")}, as_="relay")).status_code == 403
    assert (await ledger.post(explain, {"note": unique("n")}, as_="auditor")).status_code == 201
    assert (await ledger.post(explain, {"note": unique("n")}, as_="admin")).status_code == 201


async def test_concurrent_posts_of_one_input_make_one_run(ledger: LedgerClient) -> None:
    upload, _ = await plant(ledger)
    body = {"upload_id": upload, "tolerance": TOLERANCE}
    responses = await asyncio.gather(*(ledger.post(PATH, body, as_="admin") for _ in range(4)))
    assert sorted(r.status_code for r in responses) == [200, 200, 200, 201]
    assert len({r.json()["id"] for r in responses}) == 1
    assert await ledger.count("SELECT count(*) FROM external_reconciliations") == 1
    assert await ledger.count("SELECT count(*) FROM external_reconciliation_items") == 8


async def test_hourly_records_give_hourly_only_ledger_buckets(ledger: LedgerClient) -> None:
    await ledger.fund(1, 10**9)
    await ledger.token(1, 1)
    await consume(ledger, 1, "gpt-4o", 100, 10)
    await consume(ledger, 6, "gpt-4o", 100, 10)
    hour: datetime = await ledger.conn.fetchval("SELECT date_trunc('hour', now(), 'UTC')")
    await insert_upload(
        ledger.conn,
        "csv",
        [
            record(
                hour, hour + timedelta(hours=1), "gpt-4o", channel_id=1, input_tokens=100, output_tokens=10, requests=1
            )
        ],
    )
    window = {"since": _iso(hour - timedelta(hours=2)), "until": _iso(hour + timedelta(hours=2))}
    response = await ledger.post(PATH, window, as_="admin")
    assert response.status_code == 201, response.text
    items = response.json()["items"]
    assert [(i["class"], i["channel_id"], i["bucket_start"], i["bucket_end"]) for i in items] == [
        ("matched", 1, _iso(hour), _iso(hour + timedelta(hours=1))),
        ("only_ledger", 6, _iso(hour), _iso(hour + timedelta(hours=1))),
    ]


def _iso(instant: datetime) -> str:
    return instant.isoformat().replace("+00:00", "Z")
