"""The benchmark's helpers, and its in-process batch driver on a tiny workload (the benchmark itself runs with
`make bench`, not in the test suite)."""

from __future__ import annotations

import asyncpg
import pytest

from ledger_service.bench.cpu import profile_breakdown
from ledger_service.bench.direct import InProcessBatches
from ledger_service.bench.floor import FLOORS, FloorBatches, postings_of
from ledger_service.bench.load import BATCH_SIZE, Relay, Workload
from ledger_service.bench.measurement import Tally, measure
from tests.support import LedgerClient


def test_profile_breakdown_groups_samples_by_the_innermost_library() -> None:
    raw = "\n".join(
        [
            "handle (litestar/routes/http.py:81);execute (sqlalchemy/engine/base.py:1494) 6",
            "handle (litestar/routes/http.py:81);__do_execute (asyncpg/prepared_stmt.py:257) 3",
            "open_hold (ledger_service/services/ledger.py:193) 1",
            "garbage line without a count",
        ]
    )
    assert profile_breakdown(raw) == {"sqlalchemy": 0.6, "asyncpg": 0.3, "ledger_service": 0.1}


def test_measure_counts_only_successes_and_takes_percentiles() -> None:
    tally = Tally()
    for i in range(100):
        tally.record(200 if i < 98 else 503, seconds=(i + 1) / 1000)
    result = measure(tally, seconds=2.0)
    assert (result.ops_per_second, result.errors) == (49.0, 2)
    assert result.p50_ms == 51.0
    assert result.p99_ms == 100.0


def test_each_batch_resolves_the_previous_batchs_holds_and_fills_up_with_new_ones() -> None:
    relay = Relay(None, 0, Workload(clients=1, users=5, channels=3, duration=1.0), "t")
    pending: list[tuple[str, int]] = []
    first = relay.next_batch(pending)
    opened = [operation["request_id"] for operation in first if operation["op"] == "hold"]
    assert len(first) == BATCH_SIZE
    assert {operation["op"] for operation in first} <= {"hold", "consume"}
    assert [request_id for request_id, _ in pending] == opened
    second = relay.next_batch(pending)
    assert len(second) == BATCH_SIZE
    assert [op["request_id"] for op in second[: len(opened)]] == opened
    assert {op["op"] for op in second[: len(opened)]} <= {"settle", "refund"}
    assert all(op["op"] in ("hold", "consume") for op in second[len(opened) :])


async def test_the_direct_scenario_plans_and_applies_batches_in_process(
    ledger: LedgerClient, database_url: str
) -> None:
    for user in (1, 2):
        await ledger.fund(user, 10**12)
        await ledger.token(user, user)
    direct = await InProcessBatches.open(database_url, clients=2)
    try:
        measured = await direct.drive(Workload(clients=2, users=2, channels=2, duration=0.3), "t")
    finally:
        await direct.close()
    assert measured.errors == 0
    assert measured.ops_per_second > 0
    assert await ledger.count("SELECT count(*) FROM requests") > 0
    await ledger.assert_books_balance()


@pytest.mark.parametrize("kind", ["hold", "settle", "refund", "consume"])
@pytest.mark.parametrize("user", [1, 2])
def test_the_floor_posts_what_the_service_posts_and_each_ledger_balances(kind: str, user: int) -> None:
    postings = postings_of(kind, "r1", user, 7, held=2500, charge=900)
    ledgers = {ledger for ledger, _, _ in postings}
    assert ledgers == ({"quota", "allowance"} if user % 2 == 1 else {"quota"})  # odd users' tokens are limited
    for ledger in ledgers:
        assert sum(amount for posted_to, _, amount in postings if posted_to == ledger) == 0
    assert all(amount != 0 for _, _, amount in postings)
    accounts = {account for _, account, _ in postings}
    assert ("channel:7" in accounts) == (kind in ("settle", "consume"))
    assert ("hold:r1" in accounts) == (kind != "consume")


@pytest.mark.parametrize("floor", FLOORS)
async def test_the_floor_scenarios_write_each_batchs_rows_in_one_statement(floor: str, database_url: str) -> None:
    scenario = await FloorBatches.open(floor, database_url, clients=2)
    try:
        relay = Relay(None, 0, Workload(clients=1, users=2, channels=2, duration=1.0), "t")
        pending: list[tuple[str, int]] = []
        holds: dict[str, tuple[int, int]] = {}
        first = relay.next_batch(pending)
        opened = len(pending)
        async with scenario.pool.acquire() as pooled:
            await pooled.execute(scenario.statement, *FloorBatches.rows(first, holds))
            await pooled.execute(scenario.statement, *FloorBatches.rows(relay.next_batch(pending), holds))
        measured = await scenario.drive(Workload(clients=2, users=2, channels=2, duration=0.2), "d")
    finally:
        await scenario.close()
    assert (measured.errors, measured.ops_per_second > 0) == (0, True)
    schema = "floor." if floor == "bare" else ""
    conn = await asyncpg.connect(database_url)
    try:
        entries = await conn.fetchval(f"SELECT count(*) FROM {schema}entries WHERE request_id LIKE 't-%'")
        resolved = await conn.fetchval(
            f"SELECT count(*) FROM {schema}requests WHERE request_id LIKE 't-%' AND status IN ('settled', 'refunded')"
        )
        consumed = sum(1 for operation in first if operation["op"] == "consume")
        unbalanced = await conn.fetchval(
            f"SELECT count(*) FROM (SELECT 1 FROM {schema}postings GROUP BY entry_id, ledger HAVING sum(amount) <> 0) u"
        )
    finally:
        await conn.close()
    assert entries == 2 * BATCH_SIZE  # an entry per operation
    assert resolved == opened + consumed  # the second batch settled or refunded every hold of the first
    assert unbalanced == 0
    assert set(holds) == {request_id for request_id, _ in pending}  # only the open holds are remembered
