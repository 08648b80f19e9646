"""Audit features over HTTP: the entry feed, reversals, balances at past instants, statements, reports."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from sqlalchemy import text

from ledger_service.db import reconciliation
from ledger_service.services.audit import AuditService
from ledger_service.services.housekeeping import refresh_snapshots
from ledger_service.services.ledger import LedgerService
from tests.support import LedgerClient, unique
from tests.test_snapshots import topup_sql


async def feed(ledger: LedgerClient, query: str = "") -> dict[str, Any]:
    response = await ledger.get(f"/v1/entries{query}", as_="auditor")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def follow(ledger: LedgerClient, cursor: str | None, limit: int = 2) -> tuple[list[int], str | None]:
    """Follow the feed from `cursor` to its current end; the ids seen and the cursor to poll with later."""
    seen: list[int] = []
    while True:
        query = f"?limit={limit}" + (f"&cursor={cursor}" if cursor else "")
        page = await feed(ledger, query)
        seen += [entry["id"] for entry in page["items"]]
        cursor = page["next_cursor"]
        if len(page["items"]) < limit:
            return seen, cursor


async def workload(ledger: LedgerClient) -> None:
    await ledger.fund(1, 1_000_000)
    await ledger.fund(2, 500_000)
    await ledger.token(1, 1, remaining=100_000)
    await ledger.token(2, 2)
    for i in range(4):
        await ledger.hold(request_id=f"w{i}", user_id=1 + i % 2, token_id=1 + i % 2, max_tokens=100)
    await ledger.post("/v1/holds/w0/settle", {"channel_id": 1, "prompt_tokens": 100, "completion_tokens": 80})
    await ledger.post("/v1/holds/w1/settle", {"channel_id": 2, "prompt_tokens": 5000, "completion_tokens": 900})
    await ledger.post("/v1/holds/w2/refund", {"reason": "upstream 500"})
    consumption = {"request_id": "c1", "user_id": 2, "token_id": 2, "channel_id": 2, "model": "gpt-4o-mini",
                   "prompt_tokens": 1000, "completion_tokens": 1000}  # fmt: skip
    await ledger.post("/v1/consumptions", consumption)


# The feed ------------------------------------------------------------------------------------------------------


async def test_the_feed_pages_through_every_entry_once(ledger: LedgerClient) -> None:
    await workload(ledger)
    seen, cursor = await follow(ledger, None, limit=3)
    all_ids = [row["id"] for row in await ledger.conn.fetch("SELECT id FROM entries ORDER BY txid, id")]
    assert seen == all_ids
    assert cursor is not None
    # Polling again from the end gives nothing new, and the same cursor to keep polling with.
    again = await feed(ledger, f"?cursor={cursor}")
    assert (again["items"], again["next_cursor"]) == ([], cursor)
    await ledger.fund(3, 10)
    more, _ = await follow(ledger, cursor)
    assert len(more) == 1


async def test_an_entry_that_commits_late_is_not_skipped_by_a_reader(ledger: LedgerClient, database_url: str) -> None:
    await ledger.fund(1, 1)
    seen, cursor = await follow(ledger, None)
    assert len(seen) == 1
    slow = await asyncpg.connect(database_url)
    try:
        transaction = slow.transaction()
        await transaction.start()
        late_id = await topup_sql(slow, 5, 100)  # lower id, not committed yet
        early = await ledger.fund(6, 50)  # higher id, committed now
        assert early["entry"]["id"] > late_id

        page, cursor = await follow(ledger, cursor)
        assert page == []  # the committed entry waits behind the open transaction: nothing is skipped

        await transaction.commit()
        page, cursor = await follow(ledger, cursor)
        assert sorted(page) == sorted([late_id, early["entry"]["id"]])
    finally:
        await slow.close()


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("?user_id=1", "SELECT id FROM entries WHERE user_id = 1"),
        ("?token_id=2", "SELECT id FROM entries WHERE token_id = 2"),
        ("?channel_id=2", "SELECT id FROM entries WHERE channel_id = 2"),
        ("?request_id=w1", "SELECT id FROM entries WHERE request_id = 'w1'"),
        ("?kind=settle", "SELECT id FROM entries WHERE kind = 'settle'"),
        ("?kind=settle&user_id=2", "SELECT id FROM entries WHERE kind = 'settle' AND user_id = 2"),
    ],
)
async def test_feed_filters(ledger: LedgerClient, query: str, expected: str) -> None:
    await workload(ledger)
    page = await feed(ledger, query + "&limit=1000")
    wanted = {row["id"] for row in await ledger.conn.fetch(expected)}
    assert wanted
    assert {entry["id"] for entry in page["items"]} == wanted


async def test_feed_time_window(ledger: LedgerClient) -> None:
    await workload(ledger)
    times = sorted(row["created_at"] for row in await ledger.conn.fetch("SELECT created_at FROM entries"))
    middle = times[len(times) // 2]
    after = await feed(ledger, f"?limit=1000&from={middle.isoformat().replace('+00:00', 'Z')}")
    before = await feed(ledger, f"?limit=1000&to={middle.isoformat().replace('+00:00', 'Z')}")
    assert all(entry["created_at"] >= middle.isoformat().replace("+00:00", "Z") for entry in after["items"])
    assert len(after["items"]) + len(before["items"]) == len(times)


@pytest.mark.parametrize(
    "query",
    ["?cursor=nonsense", "?cursor=MTIz", "?limit=0", "?limit=1001", "?limit=ten", "?kind=payout", "?user_id=0",
     "?from=yesterday", "?from=2026-01-01T00:00:00", "?request_id=a%20b"],
)  # fmt: skip
async def test_feed_refuses_bad_parameters(ledger: LedgerClient, query: str) -> None:
    response = await ledger.get(f"/v1/entries{query}", as_="auditor")
    assert (response.status_code, response.json()["code"]) == (400, "validation_error")


# Reversals -----------------------------------------------------------------------------------------------------


async def test_a_reversal_negates_an_entry_once(ledger: LedgerClient) -> None:
    funded = await ledger.fund(1, 700)
    entry_id = funded["entry"]["id"]
    body = {"reference": "rev-1", "note": "paid twice"}
    response = await ledger.post(f"/v1/entries/{entry_id}/reverse", body, as_="admin")
    assert response.status_code == 201, response.text
    reversal = response.json()
    assert (reversal["kind"], reversal["reverses"], reversal["reference"]) == ("reversal", entry_id, "rev-1")
    assert {(p["account"], p["amount"]) for p in reversal["postings"]} == {("system:issuance", 700), ("user:1", -700)}
    assert (await ledger.user(1))["available"] == 0

    replay = await ledger.post(f"/v1/entries/{entry_id}/reverse", body, as_="admin")
    assert (replay.status_code, replay.headers["idempotent-replayed"], replay.json()) == (200, "true", reversal)
    again = await ledger.post(f"/v1/entries/{entry_id}/reverse", {"reference": "rev-2"}, as_="admin")
    assert (again.status_code, again.json()["code"]) == (409, "already_reversed")
    other = await ledger.post(f"/v1/entries/{reversal['id']}/reverse", {"reference": "rev-3"}, as_="admin")
    assert (other.status_code, other.json()["code"]) == (409, "entry_not_reversible")
    missing = await ledger.post("/v1/entries/999999/reverse", {"reference": "rev-4"}, as_="admin")
    assert (missing.status_code, missing.json()["code"]) == (404, "entry_not_found")
    conflict = await ledger.post(f"/v1/entries/{entry_id}/reverse", {"reference": "rev-1", "note": "x"}, as_="admin")
    assert (conflict.status_code, conflict.json()["code"]) == (409, "idempotency_conflict")
    await ledger.assert_books_balance()


async def test_entries_through_a_hold_account_cannot_be_reversed(ledger: LedgerClient) -> None:
    await ledger.fund(1, 100_000)
    await ledger.token(1, 1)
    await ledger.hold(request_id="h", max_tokens=10)
    hold_entry = await ledger.conn.fetchval("SELECT id FROM entries WHERE kind = 'hold'")
    response = await ledger.post(f"/v1/entries/{hold_entry}/reverse", {"reference": "r"}, as_="admin")
    assert (response.status_code, response.json()["code"]) == (409, "entry_not_reversible")
    assert await ledger.count("SELECT count(*) FROM entries WHERE kind = 'reversal'") == 0


async def test_reversing_a_charge_takes_its_usage_with_it(ledger: LedgerClient) -> None:
    await workload(ledger)
    consume = await ledger.conn.fetchval("SELECT id FROM entries WHERE kind = 'consume'")
    channel_before = (await ledger.get("/v1/channels/2")).json()
    response = await ledger.post(f"/v1/entries/{consume}/reverse", {"reference": "undo-c1"}, as_="admin")
    assert response.status_code == 201, response.text
    channel_after = (await ledger.get("/v1/channels/2")).json()
    charged = await ledger.conn.fetchval("SELECT charged FROM entries WHERE id = $1", consume)
    assert channel_after["used"] == channel_before["used"] - charged
    assert channel_after["request_count"] == channel_before["request_count"] - 1
    assert channel_after["used"] == await ledger.raw_balance("channel:2")
    usage = (await ledger.get("/v1/reports/usage?group_by=model&bucket=none", as_="auditor")).json()
    mini = next(row for row in usage["rows"] if row["key"] == "gpt-4o-mini")
    assert (mini["requests"], mini["prompt_tokens"], mini["completion_tokens"], mini["quota"]) == (0, 0, 0, 0)
    reconciliation = (await ledger.get("/v1/reports/reconciliation", as_="auditor")).json()
    assert reconciliation["ok"], reconciliation


async def test_concurrent_reversals_of_one_entry_post_one(ledger: LedgerClient) -> None:
    entry_id = (await ledger.fund(1, 700))["entry"]["id"]
    responses = await asyncio.gather(
        *(ledger.post(f"/v1/entries/{entry_id}/reverse", {"reference": f"r{i}"}, as_="admin") for i in range(8))
    )
    assert sorted(r.status_code for r in responses) == [201] + [409] * 7
    assert {r.json()["code"] for r in responses if r.status_code == 409} == {"already_reversed"}
    assert await ledger.count("SELECT count(*) FROM entries WHERE kind = 'reversal'") == 1


# Balances at past instants and statements ----------------------------------------------------------------------


async def replayed_balance(ledger: LedgerClient, account: str, ledger_name: str, moment: datetime) -> int:
    return int(
        await ledger.conn.fetchval(
            """SELECT coalesce(sum(p.amount), 0) FROM postings p JOIN entries e ON e.id = p.entry_id
                WHERE p.account = $1 AND p.ledger = $2 AND e.created_at <= $3""",
            account,
            ledger_name,
            moment,
        )
    )


@pytest.mark.parametrize("checkpoints", [False, True])
async def test_balances_as_of_any_instant_agree_with_replaying_the_entries(
    ledger: LedgerClient, service: LedgerService, checkpoints: bool
) -> None:
    for round_ in range(3):
        await workload_round(ledger, round_)
        if checkpoints:
            await refresh_snapshots(service.engine, checkpoint_every=0)
    instants = [row["created_at"] for row in await ledger.conn.fetch("SELECT created_at FROM entries ORDER BY id")]
    instants.append(instants[0] - timedelta(seconds=1))
    for account, ledger_name in (("user:1", "quota"), ("token:1", "allowance"), ("channel:1", "quota")):
        for moment in instants[::3]:
            stamp = moment.astimezone(UTC).isoformat().replace("+00:00", "Z")
            response = await ledger.get(f"/v1/accounts/{account}?as_of={stamp}", as_="auditor")
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["balances"] == {ledger_name: await replayed_balance(ledger, account, ledger_name, moment)}
            assert datetime.fromisoformat(body["as_of"]) == moment
    if checkpoints:
        assert await ledger.count("SELECT count(*) FROM balance_history") > 0


async def workload_round(ledger: LedgerClient, round_: int) -> None:
    if round_ == 0:
        await ledger.fund(1, 100_000)
        await ledger.token(1, 1, remaining=50_000)
    for i in range(3):
        rid = unique(f"r{round_}")
        await ledger.hold(request_id=rid, max_tokens=10 * i)
        await ledger.post(f"/v1/holds/{rid}/settle", {"channel_id": 1, "prompt_tokens": 10, "completion_tokens": i})


async def test_current_account_balances_and_bad_addresses(ledger: LedgerClient) -> None:
    await workload(ledger)
    now = (await ledger.get("/v1/accounts/user:1", as_="auditor")).json()
    assert now["balances"] == {"quota": await ledger.raw_balance("user:1")}
    hold = (await ledger.get("/v1/accounts/hold:w3", as_="auditor")).json()
    assert set(hold["balances"]) == {"quota", "allowance"}
    issuance = (await ledger.get("/v1/accounts/system:issuance", as_="auditor")).json()
    assert issuance["balances"] == {"quota": -1_500_000}
    for bad in ("user:0", "user:abc", "wallet:1", "system:other", "user", "hold:", "token:01"):
        response = await ledger.get(f"/v1/accounts/{bad}", as_="auditor")
        assert (response.status_code, response.json()["code"]) == (400, "validation_error"), bad
    response = await ledger.get("/v1/accounts/user:1?as_of=2026-13-01T00:00:00Z", as_="auditor")
    assert response.status_code == 400


@pytest.mark.parametrize("snapshot_midway", [False, True])
async def test_statement_running_balances(ledger: LedgerClient, service: LedgerService, snapshot_midway: bool) -> None:
    await ledger.fund(1, 100_000)
    await ledger.token(1, 1)
    for i in range(5):
        await ledger.hold(request_id=f"s{i}", max_tokens=10)
        if snapshot_midway and i == 2:
            await refresh_snapshots(service.engine, checkpoint_every=0)
        await ledger.post(f"/v1/holds/s{i}/settle", {"channel_id": 1, "prompt_tokens": 10, "completion_tokens": i})
    lines: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        query = "?limit=3" + (f"&cursor={cursor}" if cursor else "")
        response = await ledger.get(f"/v1/accounts/user:1/postings{query}", as_="auditor")
        assert response.status_code == 200, response.text
        page = response.json()
        lines += page["items"]
        cursor = page["next_cursor"]
        if len(page["items"]) < 3:
            break
    assert len(lines) == 11  # the top-up, then a hold and a settlement per request
    running = 0
    for line in lines:
        running += line["amount"]
        assert line["balance_after"] == running
        assert line["ledger"] == "quota"
    assert running == await ledger.raw_balance("user:1")
    assert [line["kind"] for line in lines[:3]] == ["topup", "hold", "settle"]


# Reports -------------------------------------------------------------------------------------------------------


async def test_trial_balance(ledger: LedgerClient, service: LedgerService) -> None:
    await workload(ledger)
    for refresh_first in (False, True):
        if refresh_first:
            await refresh_snapshots(service.engine)
            await ledger.fund(1, 3)  # and a posting after the snapshot
        report = (await ledger.get("/v1/reports/trial-balance", as_="auditor")).json()
        for name in ("quota", "allowance"):
            raw = await ledger.conn.fetch(
                "SELECT split_part(account, ':', 1) AS kind, sum(amount)::bigint AS total"
                " FROM postings WHERE ledger = $1 GROUP BY 1",
                name,
            )
            assert report["ledgers"][name]["total"] == 0
            assert report["ledgers"][name]["by_kind"] == {row["kind"]: row["total"] for row in raw}
    assert report["ledgers"]["quota"]["by_kind"]["system"] == -1_500_003
    past = (await ledger.get("/v1/reports/trial-balance?as_of=2000-01-01T00:00:00Z", as_="auditor")).json()
    assert past["ledgers"]["quota"] == {"total": 0, "by_kind": {}}


async def test_usage_report_agrees_with_channel_balances(ledger: LedgerClient) -> None:
    await workload(ledger)
    report = (await ledger.get("/v1/reports/usage?group_by=channel&bucket=none", as_="auditor")).json()
    assert {row["key"]: row["quota"] for row in report["rows"]} == {
        "1": await ledger.raw_balance("channel:1"),
        "2": await ledger.raw_balance("channel:2"),
    }
    assert sum(row["requests"] for row in report["rows"]) == 3
    by_user = (await ledger.get("/v1/reports/usage?group_by=user&bucket=day", as_="auditor")).json()
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    assert {datetime.fromisoformat(row["bucket_start"]) for row in by_user["rows"]} <= {
        today,
        today - timedelta(days=1),
    }
    assert sum(row["quota"] for row in by_user["rows"]) == sum(row["quota"] for row in report["rows"])
    by_model = (await ledger.get("/v1/reports/usage?group_by=model&bucket=hour", as_="auditor")).json()
    assert {row["key"] for row in by_model["rows"]} == {"gpt-4o", "gpt-4o-mini"}
    assert sum(row["prompt_tokens"] for row in by_model["rows"]) == 100 + 5000 + 1000
    future = (await ledger.get("/v1/reports/usage?from=2999-01-01T00:00:00Z", as_="auditor")).json()
    assert future["rows"] == []


async def test_usage_report_as_csv(ledger: LedgerClient) -> None:
    await workload(ledger)
    response = await ledger.client.get(
        "/v1/reports/usage?group_by=token&bucket=none",
        headers={**ledger.headers("auditor"), "Accept": "text/csv"},
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert list(rows[0]) == ["key", "bucket_start", "requests", "prompt_tokens", "completion_tokens", "quota"]
    as_json = (await ledger.get("/v1/reports/usage?group_by=token&bucket=none", as_="auditor")).json()["rows"]
    assert [(r["key"], int(r["quota"])) for r in rows] == [(r["key"], r["quota"]) for r in as_json]


@pytest.mark.parametrize("query", ["?group_by=planet", "?bucket=week", "?to=soon"])
async def test_usage_report_refuses_bad_parameters(ledger: LedgerClient, query: str) -> None:
    response = await ledger.get(f"/v1/reports/usage{query}", as_="auditor")
    assert (response.status_code, response.json()["code"]) == (400, "validation_error")


async def test_a_clean_ledger_reconciles_and_seals(ledger: LedgerClient, service: LedgerService) -> None:
    await workload(ledger)
    audit = AuditService(service.engine, sweep_interval_seconds=5)
    await refresh_snapshots(service.engine)
    sealed = await audit.seal()
    assert sealed == await ledger.count("SELECT count(*) FROM entries")
    assert await audit.seal() == 0
    await ledger.fund(1, 1)  # one more, unsealed
    report = (await ledger.get("/v1/reports/reconciliation", as_="auditor")).json()
    assert report["ok"], report
    names = [check["name"] for check in report["checks"]]
    for required in ("entries_balanced", "snapshots_match_entries", "holds_cleared", "no_overdue_holds",
                     "hash_chain_intact"):  # fmt: skip
        assert required in names
    assert all(check["ok"] and check["offenders"] == [] for check in report["checks"])
    chain = next(check for check in report["checks"] if check["name"] == "hash_chain_intact")
    assert chain["detail"].startswith(f"{sealed + 1} entries and 1 blocks")


async def test_a_statement_paged_one_posting_at_a_time_misses_none(ledger: LedgerClient) -> None:
    """A hold account is posted in both ledgers by one entry: a page may end between the two postings."""
    await ledger.fund(1, 100_000)
    await ledger.token(1, 1, remaining=50_000)
    await ledger.hold(request_id="split", max_tokens=10)
    await ledger.post("/v1/holds/split/settle", {"channel_id": 1, "prompt_tokens": 1, "completion_tokens": 1})
    lines: list[dict[str, Any]] = []
    cursor: str | None = None
    for _ in range(10):
        query = "?limit=1" + (f"&cursor={cursor}" if cursor else "")
        page = (await ledger.get(f"/v1/accounts/hold:split/postings{query}", as_="auditor")).json()
        if not page["items"]:
            break
        lines += page["items"]
        cursor = page["next_cursor"]
    assert [(line["ledger"], line["amount"], line["balance_after"]) for line in lines] == [
        ("allowance", 1525, 1525),
        ("quota", 1525, 1525),
        ("allowance", -1525, 0),
        ("quota", -1525, 0),
    ]


def _rows_read_from(plan: dict[str, Any], relation: str) -> float:
    """Rows an EXPLAIN ANALYZE plan node tree read from `relation`, over all loops."""
    own = plan.get("Actual Rows", 0) * plan.get("Actual Loops", 1) if plan.get("Relation Name") == relation else 0
    return own + sum(_rows_read_from(child, relation) for child in plan.get("Plans", []))


async def test_each_page_of_the_journal_walk_reads_only_its_page(
    service: LedgerService, raw: asyncpg.Connection[Any]
) -> None:
    """The reconciliation rehashes every entry, a page at a time. A page must cost its own size, not the rest of
    the journal's: otherwise the walk grows with the square of the journal."""
    await raw.execute(
        "INSERT INTO entries (kind, user_id, hash, reference)"
        " SELECT 'topup', 1, decode(repeat('00', 32), 'hex'), 'page-' || g FROM generate_series(1, 3000) g"
    )
    await raw.execute(
        "INSERT INTO postings (entry_id, ledger, account, amount)"
        " SELECT id, 'quota', 'user:1', 1 FROM entries WHERE reference LIKE 'page-%'"
        " UNION ALL SELECT id, 'quota', 'system:issuance', -1 FROM entries WHERE reference LIKE 'page-%'"
    )
    await raw.execute("ANALYZE entries, postings")
    async with service.engine.connect() as conn:
        explained = await conn.scalar(
            text("EXPLAIN (ANALYZE, FORMAT JSON) " + reconciliation.ENTRY_PAGE.text),
            {"txid": 0, "entry_id": 0, "limit": 100},
        )
    plan = (json.loads(explained) if isinstance(explained, str) else explained)[0]["Plan"]
    assert _rows_read_from(plan, "entries") <= 100
    assert _rows_read_from(plan, "postings") == 200
