"""Balances from materialized snapshots: correct under out-of-order commits, equal to a full recomputation."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from typing import Any, TypeAlias

import asyncpg

from ledger_service.db import journal
from ledger_service.domain.accounts import SubLedger as LedgerKind
from ledger_service.services.housekeeping import refresh_snapshots
from ledger_service.services.ledger import LedgerService
from tests.support import LedgerClient

Conn: TypeAlias = "asyncpg.Connection[Any]"


async def topup_sql(conn: Conn, user_id: int, amount: int) -> int:
    """A balanced top-up written with raw SQL (so the test controls exactly when it commits)."""
    entry_id: int = await conn.fetchval(
        "INSERT INTO entries (kind, user_id, hash) VALUES ('topup', $1, decode(repeat('00', 32), 'hex')) RETURNING id",
        user_id,
    )
    await conn.execute(
        "INSERT INTO postings (entry_id, ledger, account, amount)"
        " VALUES ($1, 'quota', 'system:issuance', $2), ($1, 'quota', $3, $4)",
        entry_id,
        -amount,
        f"user:{user_id}",
        amount,
    )
    return entry_id


async def read_balance(service: LedgerService, account: str) -> int:
    async with service.engine.connect() as conn:
        return await journal.balance(conn, account, LedgerKind.QUOTA)


async def assert_snapshots_match_postings(conn: Conn) -> None:
    """Every snapshot row equals the sum of its account's postings below the row's horizon."""
    mismatches = await conn.fetch(
        """
        SELECT s.account, s.ledger, s.balance, coalesce(sum(p.amount), 0) AS recomputed
          FROM balance_snapshots s
          LEFT JOIN postings p ON p.account = s.account AND p.ledger = s.ledger AND p.txid < s.horizon
         GROUP BY s.account, s.ledger, s.balance
        HAVING s.balance <> coalesce(sum(p.amount), 0)
        """
    )
    assert mismatches == []


async def assert_reads_match_postings(service: LedgerService, conn: Conn) -> None:
    """Snapshot + later postings = sum of all postings, for every account that has any."""
    rows = await conn.fetch("SELECT account, ledger, sum(amount)::bigint AS total FROM postings GROUP BY 1, 2")
    async with service.engine.connect() as sa:
        read = await journal.balances(sa, [(r["account"], LedgerKind(r["ledger"])) for r in rows])
    assert {(r["account"], r["ledger"]): r["total"] for r in rows} == {(a, str(k)): v for (a, k), v in read.items()}


async def test_a_posting_that_commits_late_is_never_missed(service: LedgerService, database_url: str) -> None:
    early = await asyncpg.connect(database_url)
    late = await asyncpg.connect(database_url)
    try:
        await topup_sql(early, 2, 7)  # committed before anything else: the first snapshot must include it

        slow = late.transaction()
        await slow.start()
        slow_entry = await topup_sql(late, 1, 100)  # lower entry id, lower txid, still uncommitted

        fast_entry = await topup_sql(early, 1, 50)  # higher id, commits first
        assert fast_entry > slow_entry

        first = await refresh_snapshots(service.engine)
        assert first is not None
        # The horizon stops at the slow writer: nothing at or above it is in the snapshot yet.
        rows = {r["account"]: r["balance"] for r in await early.fetch("SELECT account, balance FROM balance_snapshots")}
        assert rows.get("user:2") == 7
        assert "user:1" not in rows
        assert await read_balance(service, "user:1") == 50

        await slow.commit()  # the low id becomes visible only now, after the snapshot
        assert await read_balance(service, "user:1") == 150

        second = await refresh_snapshots(service.engine)
        assert second is not None
        assert second.horizon > first.horizon
        assert await early.fetchval("SELECT balance FROM balance_snapshots WHERE account = 'user:1'") == 150
        assert await read_balance(service, "user:1") == 150
        await assert_snapshots_match_postings(early)
    finally:
        await early.close()
        await late.close()


async def test_a_snapshot_by_highest_id_would_have_missed_it(database_url: str) -> None:
    """Control: the naive boundary ("every posting up to the highest committed id") loses the late commit."""
    a = await asyncpg.connect(database_url)
    b = await asyncpg.connect(database_url)
    try:
        slow = b.transaction()
        await slow.start()
        await topup_sql(b, 1, 100)
        await topup_sql(a, 1, 50)
        naive_boundary = await a.fetchval("SELECT max(entry_id) FROM postings")
        naive_snapshot = await a.fetchval("SELECT sum(amount) FROM postings WHERE account = 'user:1'")
        await slow.commit()
        after_boundary = await a.fetchval(
            "SELECT coalesce(sum(amount), 0) FROM postings WHERE account = 'user:1' AND entry_id > $1", naive_boundary
        )
        assert naive_snapshot + after_boundary == 50  # 100 went missing
        assert await a.fetchval("SELECT sum(amount) FROM postings WHERE account = 'user:1'") == 150
    finally:
        await a.close()
        await b.close()


async def test_snapshots_equal_a_full_recomputation_after_a_mixed_workload(
    ledger: LedgerClient, service: LedgerService
) -> None:
    for user in (1, 2, 3):
        await ledger.fund(user, 1_000_000)
        await ledger.token(user, user, remaining=500_000 if user != 3 else None)
    for round_ in range(4):
        calls = []
        for i in range(12):
            user = i % 3 + 1
            calls.append(ledger.hold(request_id=f"w{round_}-{i}", user_id=user, token_id=user, max_tokens=i * 10))
        await asyncio.gather(*calls, refresh_snapshots(service.engine))
        resolutions = []
        for i in range(12):
            rid = f"w{round_}-{i}"
            if i % 4 == 0:
                resolutions.append(ledger.post(f"/v1/holds/{rid}/refund", {}))
            else:
                body = {"channel_id": i % 2 + 1, "prompt_tokens": 100, "completion_tokens": i * 7}
                resolutions.append(ledger.post(f"/v1/holds/{rid}/settle", body))
        await asyncio.gather(*resolutions, refresh_snapshots(service.engine))
    await refresh_snapshots(service.engine)
    await ledger.fund(1, 5)  # a posting after the last snapshot, read from the delta
    await assert_snapshots_match_postings(ledger.conn)
    await assert_reads_match_postings(service, ledger.conn)
    assert await ledger.count("SELECT count(*) FROM balance_snapshots") > 0
    # Usage snapshots agree with the entries too.
    used = await ledger.conn.fetchval("SELECT sum(charged) FROM entries WHERE kind IN ('settle', 'consume')")
    channels = [(await ledger.get(f"/v1/channels/{c}")).json() for c in (1, 2)]
    assert sum(c["used"] for c in channels) == used
    assert sum(c["request_count"] for c in channels) == 4 * 9
    await ledger.assert_books_balance()


async def test_settlements_write_no_row_of_the_channel(ledger: LedgerClient, service: LedgerService) -> None:
    """A hot channel is credited by inserting postings only: no row is updated per settlement."""
    await ledger.fund(1, 10_000_000)
    await ledger.token(1, 1)
    await refresh_snapshots(service.engine)
    before = await ledger.conn.fetchval("SELECT count(*) FROM balance_snapshots")
    for i in range(20):
        await ledger.hold(request_id=f"hot{i}", max_tokens=10)
    await asyncio.gather(
        *(ledger.post(f"/v1/holds/hot{i}/settle", {"channel_id": 1, "prompt_tokens": 10, "completion_tokens": 0})
          for i in range(20))
    )  # fmt: skip
    assert await ledger.conn.fetchval("SELECT count(*) FROM balance_snapshots") == before
    assert (await ledger.get("/v1/channels/1")).json() == {"channel_id": 1, "used": 500, "request_count": 20}


async def test_hold_accounts_are_not_snapshotted(ledger: LedgerClient, service: LedgerService) -> None:
    await ledger.fund(1, 100_000)
    await ledger.token(1, 1)
    await ledger.hold(request_id="open", max_tokens=10)
    await refresh_snapshots(service.engine)
    assert await ledger.count("SELECT count(*) FROM balance_snapshots WHERE account LIKE 'hold:%'") == 0
    async with service.engine.connect() as conn:
        assert await journal.balance(conn, "hold:open", LedgerKind.QUOTA) == 1525


async def test_concurrent_refreshes_count_nothing_twice(ledger: LedgerClient, service: LedgerService) -> None:
    for user in range(1, 6):
        await ledger.fund(user, 1000 * user)
    runs = await asyncio.gather(*(refresh_snapshots(service.engine) for _ in range(6)))
    assert any(run is not None and run.accounts_changed > 0 for run in runs)
    await assert_snapshots_match_postings(ledger.conn)
    assert await ledger.conn.fetchval("SELECT balance FROM balance_snapshots WHERE account = 'user:5'") == 5000


async def test_snapshot_command(ledger: LedgerClient, database_url: str) -> None:
    await ledger.fund(1, 42)
    env = {**os.environ, "LEDGER_DATABASE_URL": database_url}
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "ledger_service", "snapshot"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "snapshots at horizon" in result.stdout
    assert await ledger.conn.fetchval("SELECT balance FROM balance_snapshots WHERE account = 'user:1'") == 42
